"""RetrainOnFullData's phase 2: the callback it adds to phase 2's ``fit``
(algorithm 7.3's stop, the phase-2 logs), the epoch logs of both phases
as History rows, and the check of the full data."""

import contextlib
import math
import random
import sys

import keras
import numpy as np

from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg.utils.fit_arguments import is_dataset

# In phase 2's backup folder: its epoch logs.
_PHASE2_LOGS = "kreg_retrain_phase2_logs"


class _Phase2Logs(keras.callbacks.Callback):
    """Keeps phase 2's epoch logs, saved in `folder` (if any) so that a
    resumed phase 2 still reports the epochs run before the interruption;
    with a ``target`` loss in `plan` (algorithm 7.3), stops once
    ``validation_loss()`` is below it.

    Stands for its `kreg.callbacks.RetrainOnFullData` in phase 2's ``fit``:
    a `kreg.callbacks.ModelCheckpoint` there calls `write_state`, which
    hands ``(folder, resume_at, rows)`` to ``write``."""

    def __init__(self, folder, rows, plan, validation_loss, write):
        super().__init__()
        self.folder = folder
        self.initial_rows = list(rows)  # from a phase-2 checkpoint
        self.plan = plan
        self.validation_loss = validation_loss
        self.write = write
        self.rows = []
        self.first_epoch = None

    @property
    def state_name(self):
        return "kreg_retrain_on_full_data"

    def get_state(self):
        return {"rows": list(self.rows)}

    def set_state(self, state):
        self.rows = list(state["rows"])

    def write_state(self, folder, epoch):
        # Phase 2 stopped (algorithm 7.3's condition, or a callback): a fit
        # resumed from this file runs no more epochs.
        resume_at = self.plan["epochs"] if self.model.stop_training else epoch
        self.write(folder, resume_at, self.rows[:resume_at])

    def on_train_begin(self, logs=None):
        registry.register_stateful(self)
        saved = None if self.folder is None else state_files.load_json(
            self.folder, _PHASE2_LOGS)
        self.set_state({"rows": self.initial_rows} if saved is None
                       else saved)
        self.first_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch
            self.rows = _up_to(self.rows, epoch)

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        target = self.plan["target"]
        if target is not None:
            logs["val_part_loss"] = self.validation_loss()
            if logs["val_part_loss"] < target:
                self.model.stop_training = True
        self.rows.append(_numbers(logs))
        if self.folder is not None:
            state_files.save_json(self.folder, _PHASE2_LOGS,
                                  {"rows": self.rows})
        registry.finish_epoch(self, epoch)


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


def _set_rows(history, rows):
    """Puts ``(epoch, logs)`` rows into a History: its epochs and one list
    per key (first-seen order), NaN where a row lacks it; returns it."""
    keys = list(dict.fromkeys(k for _, row in rows for k in row))
    history.epoch = [epoch for epoch, _ in rows]
    history.history = {k: [row.get(k, math.nan) for _, row in rows]
                       for k in keys}
    return history


def _check_full_data(model, x, y, sample_weight, batch_size):
    """Fails early on full data that does not fit the model: the input
    shape of a single input array, then one batch through the test step
    (through `evaluate`, whose data adapters take any data `fit` takes)."""
    expected = getattr(model, "input_shape", None)
    if (not is_dataset(x) and isinstance(expected, tuple)
            and not isinstance(x, (list, tuple, dict))):
        got, want = tuple(np.shape(x)[1:]), tuple(expected[1:])
        if len(got) != len(want) or any(
                w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(
                "RetrainOnFullData: the full data `x` does not match the "
                f"model's input: samples of shape {got}, the model "
                f"expects {want}."
            )
    size = batch_size or 32
    if is_dataset(x):
        batch = {"x": x, "steps": 1}
    else:
        batch = {name: keras.tree.map_structure(lambda a: a[:size], data)
                 for name, data in (("x", x), ("y", y),
                                    ("sample_weight", sample_weight))
                 if data is not None}
        batch["batch_size"] = size
    try:
        with _random_state_kept(model):
            model.evaluate(verbose=0, **batch)
    except Exception as error:
        raise ValueError(
            "RetrainOnFullData: the full data does not fit the model: a "
            "batch of it fails in the model's test step (is a dataset "
            "batched, and does it yield (inputs, targets)?): "
            f"{type(error).__name__}: {error}"
        ) from error


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
