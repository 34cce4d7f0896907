"""BackupAndRestore: Keras's, plus the state of kreg's callbacks."""

import keras

from kreg.callbacks import _registry as registry
from kreg import _keras_private as keras_private


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that also resumes kreg's callbacks.

    Keras's callback backs up the weights, the optimizer state and the epoch
    so that an interrupted `fit` can resume; callbacks keep their own state
    in memory, which an interruption loses. Passed to the same `fit`, this
    subclass lends its folder to kreg's `EarlyStopping` (best value, best
    epoch, wait counter, best weights), `EMA` (the shadow and the raw
    weights) and `RetrainOnFullData` (initial weights, phase, logs; phase 2
    keeps its own backup in a subfolder) when they were given no
    `backup_dir` of their own: they write their state there at the end of
    every epoch and read it back when the resumed `fit` begins, so it
    continues as if never interrupted. Their files (``kreg_*``) are deleted
    with the backup when training ends.

    Keras's callback resumes a `fit` at the saved epoch by leaving that epoch
    on the model, where it stays: the model's next `fit` would also skip
    that many epochs. This one clears it when training ends.

    Arguments are Keras's (`backup_dir`, `save_freq`, `double_checkpoint`,
    `delete_checkpoint`). kreg's callbacks save at the end of every epoch:
    resume from a backup taken at an epoch's end (`save_freq="epoch"`, the
    default).

    Example:

    >>> callbacks = [kreg.callbacks.BackupAndRestore("/tmp/backup"),
    ...              kreg.callbacks.EarlyStopping(patience=5),
    ...              kreg.callbacks.EMA(0.99)]
    >>> model.fit(x, y, epochs=100, validation_split=0.2,
    ...           callbacks=callbacks)  # run again after an interruption
    """

    def set_params(self, params):
        # Keras's CallbackList gives every callback its params after
        # set_model and before any hook: the other callbacks of this fit
        # find the folder from their on_train_begin on.
        super().set_params(params)
        registry.register(self, "backup_and_restore")

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        keras_private.forget_resumed_epoch(self.model)
