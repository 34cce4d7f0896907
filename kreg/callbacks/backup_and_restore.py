"""BackupAndRestore: Keras's, plus the state of kreg's callbacks."""

import os
import shutil

import keras
import numpy as np

from kreg import _keras_private as keras_private
from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg.utils.distribute import worker_path
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_integer

# The model's random-generator states, beside Keras's backup.
_RANDOM_STATE = "kreg_random_state"


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
    that many epochs. This one clears it when training ends. Keras's
    backup holds the weights but not the states of the model's random
    generators (the seeded `Dropout`, `GaussianNoise` and `WeightNoise`
    streams): this one saves them too, so a `fit` resumed in a new process
    draws the noise of an uninterrupted run.

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
        self._random_state_resumed = False

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        if not self._random_state_resumed:
            # The first epoch: the one the fit resumes at.
            self._random_state_resumed = True
            saved = random_states(self.model) and state_files.resume_state(
                self.shared_backup_dir, _RANDOM_STATE, epoch)
            if saved:
                _set_random_states(self.model, saved[1],
                                   state_files.state_path(
                                       self.shared_backup_dir, _RANDOM_STATE))

    def on_epoch_end(self, epoch, logs=None):
        # Before Keras's backup of the epoch (the previous generation is
        # kept for a fit killed between the two).
        states = random_states(self.model)
        if states:
            state_files.save_state(
                self.shared_backup_dir, _RANDOM_STATE, {"epoch": epoch + 1},
                [keras.ops.convert_to_numpy(v.value) for v in states],
                keep_previous=True)
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self.delete_checkpoint:
            state_files.delete_state(self.shared_backup_dir, _RANDOM_STATE)
        keras_private.forget_resumed_epoch(self.model)


def random_states(model):
    """The state variables of the model's random generators
    (`keras.random.SeedGenerator`): its non-trainable variables that are
    not weights, which `model.save_weights` leaves out."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.non_trainable_variables
            if id(v) not in weights]


def _set_random_states(model, arrays, path):
    variables = random_states(model)
    shapes = [tuple(v.shape) for v in variables]
    saved = [tuple(np.shape(a)) for a in arrays]
    if saved != shapes:
        raise ValueError(
            f"The random-generator states in {path!r} do not belong to this "
            f"model: they have the shapes {saved}, its generators {shapes}. "
            "Delete the backup folder to start training over.")
    for variable, value in zip(variables, arrays):
        variable.assign(value)


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
