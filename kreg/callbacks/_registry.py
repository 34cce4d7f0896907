"""Which kreg callbacks run in the same ``fit``.

A per-model registry, so that callbacks passed to the same ``fit`` can find
each other (``RetrainOnFullData`` needs the ``EarlyStopping``;
``EarlyStopping`` asks the ``EMA`` which weights produced the validation
logs). Callbacks of one ``fit`` share the very same ``params`` dict (Keras's
``CallbackList`` hands one dict to every callback), which tells apart the
callbacks of the running ``fit`` from stale ones of an earlier call.
"""

import weakref

_REGISTRY = weakref.WeakKeyDictionary()
# Per stateful callback: the last epoch whose end it has finished in the
# running fit, and the writes waiting for an epoch's end.
_PROGRESS = weakref.WeakKeyDictionary()


def register(callback, role):
    """Records `callback` under `role` for its model's running ``fit``
    (after those of the same role registered before it in this ``fit``:
    the order of the callback list)."""
    try:
        entries = _REGISTRY.setdefault(callback.model, {})
    except TypeError:  # a model that cannot be weakly referenced
        return
    if not callback.params:
        # A CallbackList built without params (passed to `fit` as is): no
        # way to tell this fit's callbacks from an earlier fit's.
        entries[role] = [callback]
        return
    entries[role] = [
        other for other in entries.get(role, [])
        if other is not callback and other.params is callback.params
    ] + [callback]


def lookup_all(callback, role):
    """The callbacks registered under `role` in the same ``fit``."""
    try:
        others = _REGISTRY.get(callback.model, {}).get(role, [])
    except TypeError:
        return []
    return [
        other for other in others
        if other is callback or (other.params is callback.params
                                 and other.model is callback.model)
    ]


def lookup(callback, role):
    """The first callback registered under `role` in the same ``fit``, or
    None."""
    found = lookup_all(callback, role)
    return found[0] if found else None


def state_name(callback, role, base):
    """The name of `callback`'s saved state: `base` for the first callback
    of its `role` in the ``fit``, ``base_2``, ``base_3``, ... for the next
    ones (list order), so that several of them keep apart."""
    found = lookup_all(callback, role)
    index = next((i for i, c in enumerate(found) if c is callback), 0)
    return base if index == 0 else f"{base}_{index + 1}"


def backup_folder(callback, own):
    """`own` (a callback's ``backup_dir``), else the folder of a
    `kreg.callbacks.BackupAndRestore` in the same ``fit``, else None."""
    if own is not None:
        return own
    backup = lookup(callback, "backup_and_restore")
    return None if backup is None else backup.shared_backup_dir


def register_stateful(callback):
    """Records a callback with state (``state_name``, ``get_state``,
    ``set_state``, ``write_state(folder, epoch)``) for its model's running
    ``fit``: `kreg.callbacks.ModelCheckpoint` writes its state beside
    each file it saves."""
    register(callback, "stateful")
    _PROGRESS[callback] = {"finished": None, "waiting": []}


def stateful_callbacks(callback):
    """The callbacks with state in the same ``fit`` as `callback`."""
    return lookup_all(callback, "stateful")


def when_epoch_finished(callback, epoch, write):
    """Calls ``write()`` once `callback` has finished `epoch` (its
    ``on_epoch_end`` has run): now if it has, else from `finish_epoch`."""
    progress = _PROGRESS.get(callback)
    if progress is None or progress["finished"] == epoch:
        write()
    else:
        progress["waiting"].append((epoch, write))


def finish_epoch(callback, epoch):
    """Called by a callback with state at the end of its ``on_epoch_end``:
    runs the writes waiting for that epoch."""
    progress = _PROGRESS.setdefault(callback, {"finished": None,
                                               "waiting": []})
    progress["finished"] = epoch
    waiting, progress["waiting"] = progress["waiting"], []
    for waited, write in waiting:
        if waited == epoch:
            write()
