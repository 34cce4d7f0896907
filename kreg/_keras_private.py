"""Every use of private Keras API in kreg, in one place.

kreg uses Keras's public API. Where Keras offers no public way, the private
access lives here (or is named here with its module), with the reason and
the Keras versions it was checked on: 3.12.0 (the floor in setup.cfg) and
3.15.1. None of it is on the per-step path.

1. ``model._initial_epoch`` (`forget_resumed_epoch` and
   `resume_at_epoch`, below): Keras's ``BackupAndRestore`` resumes a
   ``fit`` by setting it after ``on_train_begin``, and nothing resets it,
   so every later ``fit`` of the model would skip as many epochs. kreg's
   ``BackupAndRestore`` and ``RetrainOnFullData`` clear it;
   ``RetrainOnFullData`` sets it to skip the epochs of a finished first
   phase when a resumed ``fit`` goes straight to the second.
2. ``Metric._direction = "down"`` in ``BrierScore`` and
   ``ExpectedCalibrationError`` (kreg/metrics/): how a Keras metric tells
   ``EarlyStopping(mode="auto")`` and ``ModelCheckpoint`` that lower is
   better (Keras's own metrics set it in their ``__init__``); without it
   ``mode="auto"`` on ``val_ece`` raises.
3. The `keras.callbacks.CallbackList` that calls a callback's hook
   (`calling_callback_list`, below), found as ``self`` of a calling frame:
   Keras tells a callback nothing about the others in its ``fit``.
   ``GradientMonitor.on_train_begin`` uses it (read only) to warn when a
   ``TensorBoard`` precedes it, since Keras hands one epoch-end logs dict
   to the callbacks in list order. Where the frame is not found, nothing
   is checked. Checked on Keras 3.15.1 (CallbackList.on_train_begin
   calls each callback's on_train_begin itself).
4. ``layer._inbound_nodes[i].input_tensors`` (`call_input_tensors`,
   below): the symbolic tensors a layer was called on in each graph.
   ``kreg.diagnose`` and ``kreg.initializers.lsuv`` need the input of a
   Functional model nested in another model: its public ``input`` returns
   its own ``keras.Input`` (Functional overrides it), not the tensor of the
   outer graph. Read only; checked on Keras 3.12.0 and 3.15.1.

Keras behaviours kreg relies on that Keras documents loosely or not at all
(public API, no private access; checked on 3.12.0 and 3.15.1):

5. ``keras.callbacks.ModelCheckpoint`` names a file by
   ``filepath.format(epoch=epoch + 1, **logs)`` (plus ``batch=batch + 1``
   for a save within an epoch, unless the logs have a ``batch``), and with
   ``save_best_only`` saves exactly when the monitored value is missing,
   not a scalar, or improves, assigning it to ``best``. kreg's
   ``ModelCheckpoint`` derives the path it saved from these rules.
6. ``keras.callbacks.CallbackList`` hands one ``params`` dict to every
   callback of a ``fit`` and calls ``set_model`` and ``set_params`` on each
   (in list order) before any hook: ``kreg/callbacks/_registry.py`` tells
   the callbacks of the running ``fit`` by that shared dict.
7. ``keras.callbacks.BackupAndRestore`` writes ``latest.weights.h5`` and
   ``training_metadata.json`` (``.bkp`` copies with
   ``double_checkpoint``) into ``backup_dir``: ``RetrainOnFullData``
   deletes them when its second phase begins, so that a resumed ``fit``
   does not train the first phase again.
"""

import inspect

import keras

# Keras's BackupAndRestore files (see 7. above).
KERAS_BACKUP_FILES = tuple(name + suffix for name in (
    "latest.weights.h5", "training_metadata.json") for suffix in ("", ".bkp"))


def forget_resumed_epoch(model):
    """Clears the epoch a resumed ``fit`` started from (see 1. above)."""
    if getattr(model, "_initial_epoch", None) is not None:
        model._initial_epoch = None


def resume_at_epoch(model, epoch):
    """Makes the running ``fit`` start at `epoch`, as Keras's
    ``BackupAndRestore`` does from ``on_train_begin`` (see 1. above)."""
    model._initial_epoch = epoch


def calling_callback_list(max_depth=8):
    """The `keras.callbacks.CallbackList` whose method called the caller
    (a callback hook), or None (see 3. above)."""
    frame = inspect.currentframe()
    try:
        frame = frame.f_back.f_back if frame is not None else None
        for _ in range(max_depth):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.callbacks.CallbackList):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def call_input_tensors(layer):
    """The flat input tensors of each of the layer's symbolic calls, oldest
    first (see 4. above); ``[]`` where Keras keeps none."""
    nodes = getattr(layer, "_inbound_nodes", None) or []
    return [list(getattr(node, "input_tensors", ()) or ()) for node in nodes]
