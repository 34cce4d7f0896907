"""RetrainOnFullData's phase 2: the callbacks it adds to phase 2's ``fit``
(algorithm 7.3's stop, the phase-2 logs), the epoch logs of both phases
as History rows, and the checks on the full data."""

import contextlib
import math
import random
import sys

import keras
import numpy as np

from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files

# In phase 2's backup folder: its epoch logs.
_PHASE2_LOGS = "kreg_retrain_phase2_logs"


class _StopBelow(keras.callbacks.Callback):
    """Algorithm 7.3's loop condition, checked after every epoch."""

    def __init__(self, target, validation_loss):
        super().__init__()
        self.target = target
        self.validation_loss = validation_loss

    def on_epoch_end(self, epoch, logs=None):
        loss = self.validation_loss()
        if logs is not None:
            logs["val_part_loss"] = loss
        if loss < self.target:
            self.model.stop_training = True


class _Phase2Logs(keras.callbacks.Callback):
    """Keeps phase 2's epoch logs, saved in `folder` (if any) so that a
    resumed phase 2 still reports the epochs run before the interruption.

    Stands for `owner` in phase 2's ``fit``: a `kreg.callbacks.ModelCheckpoint`
    there writes the phase-2 state beside each file, once this epoch is
    logged."""

    def __init__(self, owner, folder, rows=()):
        super().__init__()
        self.owner = owner
        self.folder = folder
        self.initial_rows = list(rows)  # from a phase-2 checkpoint
        self.rows = []
        self.first_epoch = None

    def on_train_begin(self, logs=None):
        registry.register(self, "retrain_on_full_data")
        saved = None
        if self.folder is not None:
            saved = state_files.load_json(self.folder, _PHASE2_LOGS)
        self.rows = (list(self.initial_rows) if saved is None
                     else saved["rows"])
        self.first_epoch = None
        self._checkpoint_writes = state_files.CheckpointWrites(self._write)

    def _write(self, folder, epoch, at_epoch_end):
        if not at_epoch_end:  # mid-epoch: a resumed fit runs it again
            resume_at = epoch
        elif self.model.stop_training:
            # Phase 2 stopped here (algorithm 7.3's condition, or a
            # callback): a fit resumed from this file runs no more epochs.
            resume_at = self.owner._plan["epochs"]
        else:
            resume_at = epoch + 1
        self.owner._save_phase2_checkpoint_state(folder, resume_at,
                                                 self.rows[:resume_at])

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch
            self.rows = _up_to(self.rows, epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append(_numbers(logs))
        if self.folder is not None:
            state_files.save_json(self.folder, _PHASE2_LOGS,
                                  {"rows": self.rows})
        self._checkpoint_writes.epoch_finished(epoch)


def _numbers(logs):
    """The scalar entries of epoch logs as floats (JSON-serializable)."""
    row = {}
    for key, value in (logs or {}).items():
        try:
            row[key] = float(value)
        except (TypeError, ValueError):
            pass
    return row


def _up_to(logs, epoch):
    """Saved epoch logs for a fit (re)starting at `epoch`: those of the
    epochs before it, ``{}`` for any not saved."""
    return logs[:epoch] + [{}] * (epoch - len(logs))


def _logged(logs):
    """``(epoch, logs)`` rows of a list of epoch logs, without the epochs
    whose logs are missing (run before an interruption, not saved)."""
    return [(epoch, row) for epoch, row in enumerate(logs) if row]


def _rows(history):
    """A History's epochs as ``(epoch, logs)`` rows."""
    if history is None:
        return []
    return [
        (epoch, {k: v[i] for k, v in history.history.items() if i < len(v)})
        for i, epoch in enumerate(history.epoch)
    ]


def _columns(rows):
    """One list per key (first-seen order), NaN where a row lacks it."""
    keys = []
    for _, row in rows:
        keys += [k for k in row if k not in keys]
    return {k: [row.get(k, math.nan) for _, row in rows] for k in keys}


def _set_rows(history, rows):
    """Puts ``(epoch, logs)`` rows into a History (its epochs and one list
    per key); returns it."""
    history.epoch = [epoch for epoch, _ in rows]
    history.history = _columns(rows)
    return history


@contextlib.contextmanager
def _random_state_kept(model):
    """Leaves the model's non-trainable variables (random-seed states
    among them: a dropout active at inference draws in the test step) and
    the global random generators (NumPy, Python, PyTorch's: a DataLoader
    iterator draws its seed there) as they were: the check does not change
    phase 1."""
    values = [keras.ops.convert_to_numpy(v.value)
              for v in model.non_trainable_variables]
    numpy_state, python_state = np.random.get_state(), random.getstate()
    torch = sys.modules.get("torch")
    torch_state = None if torch is None else torch.random.get_rng_state()
    try:
        yield
    finally:
        for variable, value in zip(model.non_trainable_variables, values):
            variable.assign(value)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        if torch_state is not None:
            torch.random.set_rng_state(torch_state)


_INFINITE = -1  # tf.data.INFINITE_CARDINALITY


def _cardinality(x):
    """A tf.data.Dataset's number of batches (-1: endless, -2: unknown);
    None for anything else."""
    if not hasattr(x, "cardinality"):
        return None
    try:
        return int(x.cardinality())
    except Exception:
        return None


def _is_dataset(x):
    return hasattr(x, "element_spec") or (
        hasattr(x, "__iter__") and not hasattr(x, "shape")
        and not isinstance(x, (list, tuple, dict, str, bytes))
    )
