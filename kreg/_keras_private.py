"""Every use of private Keras API in kreg, in one place.

kreg uses Keras's public API. Where Keras offers no public way, the private
access lives here (or is named here with its module), with the reason and
the Keras versions it was checked on: 3.12.0 (the floor in setup.cfg) and
3.15.1. None of it is on the per-step path.

1. ``model._initial_epoch`` (`forget_resumed_epoch`, below): Keras's
   ``BackupAndRestore`` resumes a ``fit`` by setting it, and nothing resets
   it, so every later ``fit`` of the model would skip as many epochs.
   kreg's ``BackupAndRestore`` and ``RetrainOnFullData`` clear it.
2. ``Optimizer._variables``, ``_iterations``, ``_learning_rate`` in
   ``ClippedOptimizer.__init__`` (kreg/optimizers/clipped_optimizer.py):
   the base class creates an iteration counter and a learning rate that
   the wrapper never uses (both are the inner optimizer's); they are taken
   out of its variables, so that they are not saved nor passed through
   JAX's train step. ``LossScaleOptimizer`` keeps them.
3. ``Optimizer._trainable_variables`` in ``ClippedOptimizer.apply`` (when
   ``apply`` gets no variables, as Keras's own optimizers allow) and in
   ``GradientMonitor`` (the order of the per-variable gradient norms):
   the variables the optimizer was built with have no public accessor.
4. ``Metric._direction = "down"`` in ``BrierScore`` and
   ``ExpectedCalibrationError`` (kreg/metrics/): how a Keras metric tells
   ``EarlyStopping(mode="auto")`` and ``ModelCheckpoint`` that lower is
   better (Keras's own metrics set it in their ``__init__``); without it
   ``mode="auto"`` on ``val_ece`` raises.
"""


def forget_resumed_epoch(model):
    """Clears the epoch a resumed ``fit`` started from (see 1. above)."""
    if getattr(model, "_initial_epoch", None) is not None:
        model._initial_epoch = None
