"""ModelCheckpoint: Keras's, plus kreg's callbacks' state beside each file."""

import os

import keras
import numpy as np

from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg.callbacks.backup_and_restore import check_path
from kreg.callbacks.backup_and_restore import check_save_freq
from kreg.utils.distribute import worker_path
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_integer
from kreg.utils.validation import check_number
from kreg.utils.validation import check_one_of


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that also saves kreg's callbacks'
    state.

    Beside every file it saves, in the folder ``<file>.kreg``, it writes
    the state of kreg's callbacks in the same `fit`: the `EMA`'s shadow,
    raw weights and step count (the file holds the averaged weights),
    `EarlyStopping`'s best value, epoch, wait counter and best weights, and
    `RetrainOnFullData`'s plan and logs. Their ``resume_from=<file>``
    argument continues from it. The folder is not deleted (the checkpoint
    is not either). Which state is written when: ``docs/callbacks.md``.

    Arguments are Keras's (`filepath`, `monitor`, `save_best_only`,
    `save_weights_only`, `save_freq`, ...); `save_freq` is ``"epoch"`` or a
    positive number of batches. Without kreg's callbacks in the `fit` it
    behaves exactly as Keras's. Under a multi-worker distribution only the
    chief writes `filepath` (`kreg.utils.distribute.is_chief`); every other
    worker writes the same path under a temporary folder of its own (its
    `filepath` attribute).

    Example:

    >>> ema = kreg.callbacks.EMA(0.999)
    >>> ckpt = kreg.callbacks.ModelCheckpoint("ckpt/epoch{epoch:02d}.keras")
    >>> model.fit(x, y, epochs=10, callbacks=[ema, ckpt])
    >>> model = keras.models.load_model("ckpt/epoch05.keras")
    >>> ema = kreg.callbacks.EMA(0.999, resume_from="ckpt/epoch05.keras")
    >>> model.fit(x, y, initial_epoch=5, epochs=10, callbacks=[ema])
    """

    def __init__(self, filepath, monitor="val_loss", verbose=0,
                 save_best_only=False, save_weights_only=False, mode="auto",
                 save_freq="epoch", initial_value_threshold=None):
        if not isinstance(filepath, (str, os.PathLike)):
            raise TypeError(
                "Invalid value received for argument `filepath`. Expected a "
                f"path (str or os.PathLike). Received: filepath={filepath!r}")
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(
                "Invalid value received for argument `monitor`. Expected a "
                f"non-empty string. Received: monitor={monitor!r}")
        if initial_value_threshold is not None:
            initial_value_threshold = check_number(
                "initial_value_threshold", initial_value_threshold)
        super().__init__(
            worker_path(check_path("filepath", filepath)), monitor=monitor,
            verbose=check_integer("verbose", verbose, low=0),
            save_best_only=check_bool("save_best_only", save_best_only),
            save_weights_only=check_bool("save_weights_only",
                                         save_weights_only),
            mode=check_one_of("mode", mode, ("auto", "min", "max")),
            save_freq=check_save_freq(save_freq),
            initial_value_threshold=initial_value_threshold)

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch" or not self._has_states():
            super().on_train_batch_end(batch, logs)
            return
        best = self.best
        super().on_train_batch_end(batch, logs)
        path = self._saved_path(self._epoch, batch, logs, best)
        if path is not None:
            self._write_state(path, self._epoch, False)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq != "epoch" or not self._has_states():
            super().on_epoch_end(epoch, logs)
            return
        best = self.best
        super().on_epoch_end(epoch, logs)
        path = self._saved_path(epoch, None, logs, best)
        if path is not None:
            self._write_state(path, epoch, True)

    def _has_states(self):
        return bool(registry.stateful_callbacks(self))

    def _saved_path(self, epoch, batch, logs, best_before):
        """The file Keras's hook just wrote, or None if it wrote none.

        Keras fills `filepath` with ``epoch + 1`` (and ``batch + 1`` for a
        save within an epoch, unless the logs have a ``batch``) and the
        logs; with `save_best_only` it saves when the monitored value is
        missing or not a scalar, or when it improves (then it assigns
        `best`). See `kreg._keras_private` (5.)."""
        logs = logs or {}
        fields = dict(logs, epoch=epoch + 1)
        if batch is not None and "batch" not in logs:
            fields["batch"] = batch + 1
        path = self.filepath.format(**fields)
        if not self.save_best_only:
            return path
        current = logs.get(self.monitor)
        if current is None or np.ndim(current) > 0:
            return path
        return path if self.best is not best_before else None

    def _write_state(self, path, epoch, at_epoch_end):
        """Writes every stateful callback's state beside `path`: for a file
        saved at an epoch's end, once the callback has finished that epoch
        (it may be listed after this one); the resumed fit starts at the
        next epoch. Within an epoch, now: the resumed fit runs it again."""
        folder = state_files.checkpoint_folder(path)
        for callback in registry.stateful_callbacks(self):
            if at_epoch_end:
                registry.when_epoch_finished(
                    callback, epoch,
                    lambda c=callback: c.write_state(folder, epoch + 1))
            else:
                callback.write_state(folder, epoch)
