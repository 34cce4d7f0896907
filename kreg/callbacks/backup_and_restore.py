"""BackupAndRestore: Keras's, plus the state of kreg's callbacks."""

import os
import shutil

import keras

from kreg.callbacks import _registry as registry
from kreg import _keras_private as keras_private
from kreg.utils.distribute import worker_path
from kreg.utils.validation import check_bool, check_integer


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
    `delete_checkpoint`), checked when it is built: `save_freq` is
    ``"epoch"`` or a positive number of batches. kreg's callbacks save at the
    end of every epoch: resume from a backup taken at an epoch's end
    (`save_freq="epoch"`, the default). List it after kreg's callbacks: then
    their state is written before Keras's backup of the epoch, and a fit
    killed between the two resumes exactly (``docs/callbacks.md``).

    Under a multi-worker distribution only the chief writes to `backup_dir`
    (`kreg.utils.distribute.is_chief`); every other worker writes to a
    temporary folder of its own (its `backup_dir` attribute), and a resumed
    `fit` starts from the chief's backup on every worker.

    Example:

    >>> callbacks = [kreg.callbacks.EarlyStopping(patience=5),
    ...              kreg.callbacks.EMA(0.99),
    ...              kreg.callbacks.BackupAndRestore("/tmp/backup")]
    >>> model.fit(x, y, epochs=100, validation_split=0.2,
    ...           callbacks=callbacks)  # run again after an interruption
    """

    def __init__(self, backup_dir, save_freq="epoch", double_checkpoint=False,
                 delete_checkpoint=True):
        backup_dir = check_path("backup_dir", backup_dir)
        super().__init__(
            worker_path(backup_dir),
            save_freq=check_save_freq(save_freq),
            double_checkpoint=check_bool("double_checkpoint",
                                         double_checkpoint),
            delete_checkpoint=check_bool("delete_checkpoint",
                                         delete_checkpoint))
        # The folder the chief writes (kreg's callbacks read their state
        # there); `backup_dir` is where this worker writes.
        self.shared_backup_dir = backup_dir

    def set_params(self, params):
        # Keras's CallbackList gives every callback its params after
        # set_model and before any hook: the other callbacks of this fit
        # find the folder from their on_train_begin on.
        super().set_params(params)
        registry.register(self, "backup_and_restore")

    def on_train_begin(self, logs=None):
        if self.backup_dir != self.shared_backup_dir:
            # Another worker than the chief resumes from the chief's files.
            copy_files(self.shared_backup_dir, self.backup_dir)
        super().on_train_begin(logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        keras_private.forget_resumed_epoch(self.model)


def copy_files(source, target):
    """Copies the files directly in the folder `source` (if any) to the
    folder `target`."""
    if not os.path.isdir(source):
        return
    os.makedirs(target, exist_ok=True)
    for entry in os.scandir(source):
        if entry.is_file():
            shutil.copyfile(entry.path, os.path.join(target, entry.name))



def check_path(name, value):
    """A required path argument (str or os.PathLike, not empty), as str."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"Invalid value received for argument `{name}`. Expected a "
            f"path (str or os.PathLike). Received: {name}={value!r}")
    if value is None or not os.fspath(value):
        raise ValueError(
            f"Invalid value received for argument `{name}`. Expected a "
            f"non-empty path. Received: {name}={value!r}")
    return os.fspath(value)


def check_save_freq(value):
    """`save_freq` of Keras's BackupAndRestore and ModelCheckpoint:
    ``"epoch"`` or a positive number of batches, NumPy integers too (Keras
    takes 0, a negative number or ``False`` as "after every batch")."""
    if isinstance(value, str):
        if value != "epoch":
            raise ValueError(
                "Invalid value received for argument `save_freq`. Expected "
                "'epoch' or a positive integer (a number of batches). "
                f"Received: save_freq={value!r}")
        return value
    return check_integer("save_freq", value, low=1)
