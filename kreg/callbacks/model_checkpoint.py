"""ModelCheckpoint: Keras's, plus kreg's callbacks' state beside each file."""

import keras

from kreg.callbacks import _shared


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that also saves kreg's callbacks'
    state.

    With kreg's `EMA` in the same `fit`, each checkpoint file holds the
    averaged weights (the model you keep: it loads into a plain model), and
    a file cannot hold the raw weights, the shadow and the step count too.
    This subclass writes those beside every file it saves, in the folder
    ``<file>.kreg`` (files ``kreg_ema.*``), so that training can go on from
    a checkpoint as from Keras's optimizer-based ``use_ema``: load the
    file, and give the new `fit` an ``EMA(..., resume_from=<file>)``; it puts
    back the raw weights and continues the average. Likewise kreg's
    `EarlyStopping` (best value and epoch, wait counter, best weights;
    ``EarlyStopping(..., resume_from=<file>)``), written once it has counted
    the epoch, whatever the order of the callbacks, and kreg's
    `RetrainOnFullData` (in phase 1: initial weights and optimizer values,
    phase-1 logs; passed to its ``callbacks=``, in phase 2: the plan, the
    phase-2 epoch and both phases' logs; ``RetrainOnFullData(...,
    resume_from=<file>)``). The
    folder is not deleted (the checkpoint is not either).

    Arguments are Keras's (`filepath`, `monitor`, `save_best_only`,
    `save_weights_only`, `save_freq`, ...). Without kreg's callbacks in the
    `fit` it behaves exactly as Keras's.

    Example:

    >>> ema = kreg.callbacks.EMA(0.999)
    >>> ckpt = kreg.callbacks.ModelCheckpoint("ckpt/epoch{epoch:02d}.keras")
    >>> model.fit(x, y, epochs=10, callbacks=[ema, ckpt])
    >>> model = keras.models.load_model("ckpt/epoch05.keras")
    >>> ema = kreg.callbacks.EMA(0.999, resume_from="ckpt/epoch05.keras")
    >>> model.fit(x, y, initial_epoch=5, epochs=10, callbacks=[ema])
    """

    def _should_save_model(self, epoch, batch, logs, filepath):
        saving = super()._should_save_model(epoch, batch, logs, filepath)
        self._saving_to = filepath if saving else None
        return saving

    def _save_model(self, epoch, batch, logs):
        self._saving_to = None
        super()._save_model(epoch, batch, logs)
        if self._saving_to is None:
            return
        folder = _shared.checkpoint_folder(self._saving_to)
        ema = _shared.lookup(self, "ema")
        if ema is not None and ema._shadows is not None:
            ema._flush()
            # At an epoch's end the resumed fit starts at the next epoch.
            ema._save_state(folder, epoch + 1 if batch is None else epoch)
        for role in ("early_stopping", "retrain_on_full_data"):
            for other in _shared.lookup_all(self, role):
                other._checkpoint_writes.request(folder, epoch,
                                                 at_epoch_end=batch is None)
