"""Second phase of early stopping: retrain on training + validation data."""

import collections.abc
import math
import numbers
import os
import shutil
import warnings

import keras
import numpy as np

from kreg.callbacks import early_stopping, ema
from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg import _keras_private as keras_private
from kreg.callbacks._retrain_phase2 import (_INFINITE, _Phase2Logs,
                                            _StopBelow, _cardinality,
                                            _is_dataset, _logged, _numbers,
                                            _random_state_kept, _rows,
                                            _set_rows, _up_to)
from kreg.callbacks.backup_and_restore import BackupAndRestore
from kreg.utils.distribute import worker_path
from kreg.utils.validation import (check_bool, check_integer, check_one_of,
                                   check_optional_path)

_ALGORITHMS = ("restart", "continue")
_LENGTHS = ("epochs", "steps", "scaled")
# In the backup folder: the phase (JSON) and the values phase 2 starts from
# (weights, then optimizer variables); phase 2's own backup in a subfolder.
_STATE_NAME = "kreg_retrain_on_full_data"
_PHASE2_FOLDER = "kreg_retrain_phase2"
# Phase 1's backups (Keras's BackupAndRestore; kreg's callbacks' states),
# obsolete once phase 2 begins: a resumed fit must not train phase 1 again.
_KERAS_BACKUP_FILES = (
    "latest.weights.h5", "latest.weights.h5.bkp", "training_metadata.json",
    "training_metadata.json.bkp",
)
_PHASE1_STATES = (early_stopping._STATE_NAME, ema._STATE_NAME)


def _check_data_argument(name, data):
    """Arrays (or a list/tuple/dict of them, or nested lists of numbers) or
    a dataset, as `fit` takes."""
    if _is_dataset(data):
        return
    leaves = keras.tree.flatten(data)
    if leaves and all(hasattr(leaf, "shape") for leaf in leaves):
        return
    try:
        numeric = np.asarray(data).dtype.kind in "biuf" and np.ndim(data)
    except (ValueError, TypeError):
        numeric = False
    if not numeric:
        raise TypeError(
            f"Invalid value received for argument `{name}`. Expected arrays "
            "(or a list/dict of arrays) or a dataset, as `fit` takes. "
            f"Received: {name}={data!r}"
        )


def _check_validation_data(data):
    """None, a dataset, or a tuple/list ``(x, y)`` / ``(x, y, weights)``."""
    if data is None or _is_dataset(data):
        return
    if not isinstance(data, (tuple, list)):
        raise TypeError(
            "Invalid value received for argument `validation_data`. "
            "Expected None, a dataset, or a tuple (x, y) or (x, y, "
            f"sample_weight). Received: validation_data={data!r}"
        )
    if len(data) not in (2, 3):
        raise ValueError(
            "Invalid value received for argument `validation_data`. "
            "Expected a tuple (x, y) or (x, y, sample_weight). Received: "
            f"validation_data, a {type(data).__name__} of {len(data)} items"
        )
    _check_data_argument("validation_data", data[0])


def _check_counts(x, y, sample_weight):
    """Array data: targets given, each of `x`, `y` and `sample_weight`
    an array (or a list/dict of arrays) of as many samples as `x`."""
    if y is None:
        raise ValueError(
            "Invalid value received for argument `y`. Expected targets "
            "for the array inputs `x`. Received: y=None"
        )
    counts = {}
    for name, data in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        if data is None:
            continue
        if _is_dataset(data):
            raise TypeError(
                f"Invalid value received for argument `{name}`. Expected "
                "arrays, as `x` holds arrays. Received: "
                f"{name}={type(data).__name__}"
            )
        _check_data_argument(name, data)
        leaves = keras.tree.flatten(data)
        if all(hasattr(leaf, "shape") for leaf in leaves):
            sizes = [np.shape(a)[0] if np.ndim(a) else 0 for a in leaves]
        else:  # nested lists of numbers
            sizes = [np.shape(data)[0]]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"Invalid value received for argument `{name}`. Expected "
                "arrays of the same number of samples. Received: "
                f"{name} with {sizes} samples"
            )
        counts[name] = sizes[0]
    for name, count in counts.items():
        if count != counts["x"]:
            raise ValueError(
                f"Invalid value received for argument `{name}`. Expected "
                f"as many samples as `x` ({counts['x']}). Received: {name} "
                f"with {count} samples"
            )


def _check_class_weight(class_weight):
    """None or a dict {class index: weight >= 0}, as `fit` takes."""
    if class_weight is None:
        return
    valid = isinstance(class_weight, collections.abc.Mapping) and all(
        isinstance(k, numbers.Integral) and not isinstance(k, bool)
        and isinstance(v, numbers.Real) and not isinstance(v, bool)
        and math.isfinite(v) and v >= 0
        for k, v in class_weight.items()
    )
    if not valid:
        raise TypeError(
            "Invalid value received for argument `class_weight`. Expected "
            "None or a dict {class index (int): weight (finite float >= "
            "0)}, as in `fit`. "
            f"Received: class_weight={class_weight!r}"
        )


def _check_callbacks(callbacks):
    """A list of `keras.callbacks.Callback` instances from None or a
    list/tuple of them."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)) or not all(
        isinstance(c, keras.callbacks.Callback) for c in callbacks
    ):
        raise TypeError(
            "Invalid value received for argument `callbacks`. Expected None "
            "or a list of keras.callbacks.Callback instances (phase 2's "
            f"callbacks). Received: callbacks={callbacks!r}"
        )
    return list(callbacks)


@keras.saving.register_keras_serializable(package="kreg")
class RetrainOnFullData(keras.callbacks.Callback):
    """After early stopping, trains again on the full data (two phases).

    Given to ``fit`` with a `kreg.callbacks.EarlyStopping` and the full data
    (training + validation): after ``fit`` (phase 1), phase 2 trains on it:

    - ``"restart"`` (algorithm 7.2): from the initial weights and optimizer
      state, for ``best_epoch + 1`` epochs (``length="epochs"``), phase 1's
      steps up to its best epoch (``"steps"``) or ``(best_epoch + 1) *
      n_full / n_train`` epochs (``"scaled"``; ``n``: batches per epoch).
    - ``"continue"`` (algorithm 7.3): from the weights phase 1 left, until
      the loss on ``validation_data`` falls below the best epoch's training
      loss (at most ``max_epochs`` epochs).

    After ``fit``: ``retrain_epochs``, ``retrain_history`` (phase 2). More
    (phase 2's callbacks, resuming, data accepted): ``docs/callbacks.md``.

    Args:
        x: full inputs: arrays (or a list/dict of them) or a data set
            ``fit`` can run several epochs over; not a generator.
        y: full targets for array ``x``. Defaults to `None`.
        algorithm: `"restart"` or `"continue"`. Defaults to `"restart"`.
        length: for `"restart"`: `"epochs"`, `"steps"` or `"scaled"`.
            Defaults to `"epochs"`.
        batch_size: batch size of array data (as given to ``fit``).
            Defaults to `None` (Keras's 32).
        validation_data: for `"continue"`: the validation part whose loss
            ends phase 2. Defaults to `None`.
        max_epochs: for `"continue"`: most phase-2 epochs. Defaults to `100`.
        callbacks: callbacks for phase 2. Defaults to `None`.
        backup_dir: folder of the state that resumes an interrupted ``fit``.
            Defaults to `None` (a kreg `BackupAndRestore`'s folder, if any).
        shuffle: whether phase 2 shuffles array data (and the batch order
            of a `keras.utils.PyDataset` of known length, as ``fit`` does);
            a `tf.data.Dataset`, `DataLoader` or generator is used as it
            comes. Defaults to `True`.
        resume_from: a `kreg.callbacks.ModelCheckpoint` file to resume
            from. Defaults to `None`.
        steps_per_epoch: batches per phase-2 epoch (needed for an endless
            dataset). Defaults to `None` (one pass over ``x``).
        sample_weight: per-sample weights of array ``x``. Defaults to `None`.
        class_weight: as ``fit(class_weight=...)``. Defaults to `None`.

    Example:

    ```python
    stop = kreg.callbacks.EarlyStopping(patience=5, restore_best_weights=True)
    retrain = kreg.callbacks.RetrainOnFullData(x_all, y_all, batch_size=64)
    model.fit(x_train, y_train, batch_size=64, epochs=200,
              validation_data=(x_val, y_val), callbacks=[stop, retrain])
    ```

    Reference:
        Goodfellow, Bengio & Courville, "Deep Learning" (2016), section 7.8.
    """

    def __init__(self, x, y=None, algorithm="restart", length="epochs",
                 batch_size=None, validation_data=None, max_epochs=100,
                 callbacks=None, backup_dir=None, shuffle=True,
                 resume_from=None, steps_per_epoch=None, sample_weight=None,
                 class_weight=None):
        super().__init__()
        if x is None:
            raise ValueError(
                "Invalid value received for argument `x`. Expected the full "
                "data (arrays or a dataset). Received: x=None"
            )
        if isinstance(x, collections.abc.Iterator):
            raise TypeError(
                "Invalid value received for argument `x`. Expected arrays or "
                "a data set that can be iterated once per epoch (a tf.data."
                "Dataset, a keras.utils.PyDataset, a DataLoader); phase 2 "
                "runs several epochs over it and a generator or iterator "
                f"gives one pass. Received: x={x!r}"
            )
        check_one_of("algorithm", algorithm, _ALGORITHMS)
        check_one_of("length", length, _LENGTHS)
        batch_size = check_integer("batch_size", batch_size, low=1,
                                   allow_none=True)
        max_epochs = check_integer("max_epochs", max_epochs, low=1)
        steps_per_epoch = check_integer("steps_per_epoch", steps_per_epoch,
                                        low=1, allow_none=True)
        _check_data_argument("x", x)
        if y is not None and _is_dataset(x):
            raise ValueError(
                "Invalid value received for argument `y`. With a dataset "
                "`x` the targets are its batches' second element, as in "
                f"`fit`. Received: y={type(y).__name__}"
            )
        _check_validation_data(validation_data)
        callbacks = _check_callbacks(callbacks)
        _check_class_weight(class_weight)
        if not _is_dataset(x):
            _check_counts(x, y, sample_weight)
        if algorithm == "continue" and validation_data is None:
            raise ValueError(
                "Invalid value received for argument `validation_data`. "
                "algorithm='continue' (7.3) stops when the loss on the "
                "validation part falls below the training loss of the best "
                "epoch, so it needs that part. Received: validation_data=None"
            )
        if steps_per_epoch is None and _cardinality(x) == _INFINITE:
            raise ValueError(
                "Invalid value received for argument `steps_per_epoch`. "
                "The full data `x` is an endless (repeated) dataset, so "
                "phase 2's epochs need a length: pass steps_per_epoch, or a "
                "dataset without .repeat(). Received: steps_per_epoch=None"
            )
        if sample_weight is not None and _is_dataset(x):
            raise ValueError(
                "Invalid value received for argument `sample_weight`. "
                "With a dataset `x` the weights are its batches' third "
                "element, as in `fit`. Received: sample_weight="
                f"{type(sample_weight).__name__}"
            )
        self.x = x
        self.y = y
        self.steps_per_epoch = steps_per_epoch
        self.sample_weight = sample_weight
        self.class_weight = class_weight
        self.algorithm = algorithm
        self.length = length
        self.batch_size = batch_size
        self.validation_data = validation_data
        self.max_epochs = max_epochs
        self.callbacks = callbacks
        self.backup_dir = check_optional_path("backup_dir", backup_dir)
        self.shuffle = check_bool("shuffle", shuffle)
        self.resume_from = check_optional_path("resume_from", resume_from)
        self.retrain_epochs = None
        self.retrain_history = None

    # Phase 1 ---------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._check_data()
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._phase1_history = self.model.history
        self._first_epoch = None
        self._plan = None
        self._phase2_start = None  # {"epoch", "rows"}: phase-2 checkpoint
        self.retrain_epochs = None
        self.retrain_history = None
        registry.register(self, "retrain_on_full_data")
        # Beside kreg's ModelCheckpoint files of phase 1, with the epoch's
        # logs once they are logged.
        self._checkpoint_writes = state_files.CheckpointWrites(
            lambda folder, epoch, at_epoch_end: self._save_state(
                folder, phase=1, arrays=True))
        self._folder = registry.backup_folder(self, self.backup_dir)
        saved, source = None, self._folder
        if self._folder is not None:
            saved = state_files.load_state(self._folder, _STATE_NAME)
        # Whether the initial values are already in the backup folder.
        self._start_saved = saved is not None
        if saved is None and self.resume_from is not None:
            source = state_files.checkpoint_folder(self.resume_from)
            saved = state_files.load_checkpoint_state(
                self.resume_from, _STATE_NAME, "RetrainOnFullData")
        self._start_restored = saved is not None
        values = self._values()
        if saved is None:
            self._phase1_logs = []
            self._start_values = values  # the initial ones
            return
        numbers, arrays = saved
        self._phase1_logs = numbers["phase1_logs"]
        self._phase2_start = numbers.get("phase2")
        if self._phase2_start is not None and not arrays:
            # A checkpoint file of phase 2: the model loaded from it holds
            # the weights (and optimizer state) phase 2 goes on from.
            self._start_values = values
        elif len(arrays) != len(values):
            raise ValueError(
                f"The RetrainOnFullData state in {source!r} holds "
                f"{len(arrays)} weights and optimizer variables but this "
                f"model has {len(values)}."
            )
        else:
            self._start_values = arrays
        if numbers["phase"] == 2:
            # Phase 1 had ended: this fit runs no epoch of it (phase 2's
            # backup is kept in memory: an earlier BackupAndRestore may
            # delete the whole folder when this fit ends).
            self._plan = numbers["plan"]
            self._phase2_files = {} if self._folder is None else (
                state_files.read_folder(
                    os.path.join(self._folder, _PHASE2_FOLDER)))
            keras_private.skip_epochs_of_fit(self.model,
                                             self.params["epochs"])

    def on_epoch_begin(self, epoch, logs=None):
        if self._plan is not None:
            raise ValueError(
                "RetrainOnFullData: the interrupted `fit` had finished phase "
                f"1 (the state in {self._folder!r} says so), but another "
                f"callback, a BackupAndRestore listed after RetrainOnFullData "
                f"with a folder of its own, resumed phase 1 at epoch {epoch}. "
                "List Keras's BackupAndRestore before RetrainOnFullData (or "
                "use kreg.callbacks.BackupAndRestore) and run `fit` again."
            )
        if self._first_epoch is not None:
            return
        self._first_epoch = epoch
        # Every callback's on_train_begin has run: the EarlyStopping of
        # this fit is registered, whatever the order of the callbacks.
        self._early_stopping()
        if epoch > len(self._phase1_logs) or (epoch > 0 and not
                                               self._start_restored):
            warnings.warn(
                f"RetrainOnFullData: training resumes at epoch {epoch} but "
                "the state of the interrupted run was not saved: phase 2 "
                "will start from the weights this `fit` began with, not the "
                "initial ones, and the logs of the earlier epochs are "
                "missing. Use kreg.callbacks.BackupAndRestore (or pass "
                "`backup_dir=`, or `resume_from=` a file of kreg.callbacks."
                "ModelCheckpoint) to resume it.",
                stacklevel=2,
            )
        self._phase1_logs = _up_to(self._phase1_logs, epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._phase1_logs.append(_numbers(logs))
        if self._folder is not None:
            self._save_state(self._folder, phase=1,
                             arrays=not self._start_saved)
            self._start_saved = True
        self._checkpoint_writes.epoch_finished(epoch)

    def _save_phase2_checkpoint_state(self, folder, epoch, rows):
        """Beside a checkpoint file of phase 2: the plan, both phases' logs
        and the phase-2 epoch a resumed `fit` starts at (no arrays: the
        file holds the weights phase 2 goes on from)."""
        numbers = {"phase": 2, "phase1_logs": self._phase1_logs,
                   "plan": self._plan,
                   "phase2": {"epoch": epoch, "rows": rows}}
        state_files.save_state(folder, _STATE_NAME, numbers, [])

    def _save_state(self, folder, phase, arrays):
        numbers = {"phase": phase, "phase1_logs": self._phase1_logs,
                   "plan": self._plan, "phase2": self._phase2_start,
                   "num_arrays": len(self._start_values)}
        if arrays:
            state_files.save_state(folder, _STATE_NAME, numbers,
                                   self._start_values)
        else:
            state_files.save_json(folder, _STATE_NAME, numbers)

    # Phase 2 ---------------------------------------------------------------
    def _early_stopping(self):
        stops = registry.lookup_all(self, "early_stopping")
        if not stops:
            raise ValueError(
                "RetrainOnFullData needs a kreg.callbacks.EarlyStopping in "
                "the same `fit` call (it reads the best epoch from it)."
            )
        if len(stops) > 1:
            raise ValueError(
                "RetrainOnFullData reads the best epoch from one kreg."
                f"callbacks.EarlyStopping; this `fit` has {len(stops)} "
                f"(monitoring {', '.join(repr(s.monitor) for s in stops)}). "
                "Use keras.callbacks.EarlyStopping for the other ones."
            )
        return stops[0]

    def on_train_end(self, logs=None):
        stop = self._early_stopping()
        resuming = self._plan is not None
        if resuming:
            stop.set_state({**self._plan["early_stopping"],
                            "best_weights": None})
        else:
            self._check_phase1(stop)
        if not stop._finished:  # listed after this callback
            stop._finish()  # restore the best weights before phase 2
        if not resuming:
            self._plan = self._make_plan(stop)
        # No plan: "continue", with the loss already below the target.
        rows = [] if self._plan is None else self._phase2(resuming)
        self.retrain_epochs = rows[-1][0] + 1 if rows else 0
        self._merge_histories(rows)

    def _check_phase1(self, stop):
        if not any(k.startswith("val_") for row in self._phase1_logs
                   for k in row):
            raise ValueError(
                "RetrainOnFullData: the first phase had no validation data. "
                "Pass `validation_data` or `validation_split` to `fit`."
            )
        if stop.best_epoch is None:
            raise ValueError(
                "RetrainOnFullData: EarlyStopping never saw its monitored "
                f"value `{stop.monitor}`; no best epoch to retrain for."
            )

    def _make_plan(self, stop):
        """Phase 2's length (and target), from phase 1's best epoch."""
        best_epoch = stop.best_epoch
        plan = {
            "early_stopping": {
                "wait": int(stop.wait),
                "stopped_epoch": int(stop.stopped_epoch),
                "best": None if stop.best is None else float(stop.best),
                "best_epoch": int(best_epoch),
            },
            "target": None,
        }
        if self.algorithm == "continue":
            target = self._phase1_logs[best_epoch].get("loss")
            if target is None:
                raise ValueError(
                    "RetrainOnFullData(algorithm='continue'): the training "
                    f"loss of the best epoch ({best_epoch}) was not logged "
                    "(or not saved before an interruption)."
                )
            if self._validation_loss() < target:
                return None
            # From the weights phase 1 left, with its optimizer state.
            self._start_values = self._values()
            return {**plan, "epochs": self.max_epochs, "target": target}
        epochs = best_epoch + 1
        if self.length != "epochs":
            train_steps = self.params.get("steps")
            full_steps = self._full_steps()
            if not train_steps or not full_steps:
                raise ValueError(
                    f"RetrainOnFullData(length={self.length!r}) needs the "
                    "number of batches per epoch of both data sets; use "
                    "length='epochs' with data of unknown size."
                )
            if self.length == "steps":
                epochs = max(1, round(epochs * train_steps / full_steps))
            else:
                epochs = math.ceil(epochs * full_steps / train_steps)
        return {**plan, "epochs": epochs}

    def _phase2(self, resuming):
        """Runs phase 2 (resumed from its backup, if any); its log rows."""
        plan = self._plan
        verbose = self.params.get("verbose", 0) if self.params else 0
        backup = None
        created = False
        if self._folder is not None:
            # This worker's copy of the folder (the folder on the chief).
            written = worker_path(self._folder)
            created = not os.path.isdir(written)
            self._save_state(self._folder, phase=2, arrays=True)
            backup = os.path.join(self._folder, _PHASE2_FOLDER)
            if resuming:
                state_files.write_folder(backup, self._phase2_files)
            else:
                for name in _KERAS_BACKUP_FILES:
                    path = os.path.join(written, name)
                    if os.path.exists(path):
                        os.remove(path)
                for base in _PHASE1_STATES:
                    for name in state_files.state_names(written, base):
                        state_files.delete_state(self._folder, name)
        self._set_values(self._start_values)
        start = self._phase2_start or {"epoch": 0, "rows": []}
        if verbose and self._phase2_start is not None:
            print(f"Phase 2: resuming on the full data at epoch "
                  f"{start['epoch'] + 1} of {plan['epochs']}, from a "
                  "checkpoint")
        elif verbose and resuming:
            print("Phase 2: resuming on the full data after the last epoch "
                  "its backup holds")
        elif verbose:
            if plan["target"] is None:
                print(f"Phase 2: retraining on the full data from the "
                      f"initial weights for {plan['epochs']} epochs")
            else:
                print(f"Phase 2: continuing on the full data until the "
                      f"validation-part loss < {plan['target']:.6g} (at "
                      f"most {plan['epochs']} epochs)")
        callbacks = list(self.callbacks)
        if plan["target"] is not None:
            callbacks.append(_StopBelow(plan["target"],
                                        self._validation_loss))
        recorder = _Phase2Logs(self, backup, start["rows"])
        callbacks.append(recorder)
        if backup is not None:
            callbacks.append(BackupAndRestore(backup))
        # A resumed phase 1 left its start epoch on the model (Keras).
        keras_private.forget_resumed_epoch(self.model)
        history = self._fit(plan["epochs"], verbose, callbacks,
                            initial_epoch=start["epoch"])
        keras_private.forget_resumed_epoch(self.model)
        registry.register(self, "retrain_on_full_data")
        rows = _logged(recorder.rows[:recorder.first_epoch]) + _rows(history)
        self.retrain_history = _set_rows(keras.callbacks.History(), rows)
        if self._folder is not None:
            state_files.delete_state(self._folder, _STATE_NAME)
            shutil.rmtree(worker_path(backup), ignore_errors=True)
            if created and not os.listdir(written):
                os.rmdir(written)
        return rows

    def _values(self):
        """The model's weights, then the optimizer's variables (NumPy)."""
        optimizer = self.model.optimizer
        return self.model.get_weights() + (
            [keras.ops.convert_to_numpy(v.value) for v in optimizer.variables]
            if optimizer is not None else []
        )

    def _set_values(self, values):
        count = len(self.model.weights)
        self.model.set_weights(values[:count])
        if self.model.optimizer is not None:
            for variable, value in zip(self.model.optimizer.variables,
                                       values[count:]):
                variable.assign(value)

    def _fit(self, epochs, verbose, callbacks, initial_epoch=0):
        kwargs = dict(epochs=epochs, verbose=verbose, callbacks=callbacks,
                      initial_epoch=initial_epoch,
                      steps_per_epoch=self.steps_per_epoch,
                      class_weight=self.class_weight)
        if _is_dataset(self.x):
            # Batches come shuffled or not as the data set makes them; Keras
            # warns about a `shuffle=True` it ignores (its default). A
            # PyDataset of known length is shuffled by batch, as in `fit`.
            shuffle = (self.shuffle and isinstance(x := self.x,
                                                   keras.utils.PyDataset)
                       and getattr(x, "num_batches", None) is not None)
            return self.model.fit(self.x, shuffle=shuffle, **kwargs)
        if self.batch_size is None:
            # Keras does not tell callbacks the batch size of `fit`.
            warnings.warn(
                "RetrainOnFullData: no `batch_size` given; the second phase "
                "uses Keras's default of 32, which may differ from the first "
                "phase's. Pass RetrainOnFullData the batch_size given to "
                "`fit`.",
                stacklevel=2,
            )
        return self.model.fit(self.x, self.y, batch_size=self.batch_size,
                              shuffle=self.shuffle,
                              sample_weight=self.sample_weight, **kwargs)

    def _validation_loss(self):
        data = self.validation_data
        if isinstance(data, (tuple, list)):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
                tuple(data))
            result = self.model.evaluate(
                x, y, sample_weight=sample_weight,
                batch_size=self.batch_size, verbose=0, return_dict=True)
        else:
            result = self.model.evaluate(data, verbose=0, return_dict=True)
        return float(result["loss"])

    def _merge_histories(self, phase2_rows):
        """The History of ``fit``: every epoch of both phases (also those
        run before an interruption), a ``phase`` column, NaN for keys
        missing in a phase. Rows are ``(epoch, logs)``."""
        outer = self._phase1_history
        if outer is None:
            return
        # Epochs logged before this fit (resumed): from the saved state.
        earlier = self._phase1_logs[:self._first_epoch]
        phase1_rows = _logged(earlier) + _rows(outer)
        _set_rows(outer, phase1_rows + phase2_rows)
        outer.history["phase"] = [1] * len(phase1_rows) + [2] * len(
            phase2_rows)
        self.model.history = outer

    # Checks ----------------------------------------------------------------
    def _check_data(self):
        """Fails early on full data that does not fit the model: the
        input shape of array data, then one batch through the test step
        (the sample counts are checked at construction)."""
        if not _is_dataset(self.x):
            self._check_input_shape()
        with _random_state_kept(self.model):
            self._check_first_batch()

    def _check_first_batch(self):
        # Through `evaluate` (one batch), so that Keras's data adapters
        # take any data `fit` takes (sparse tensors, a distributed
        # dataset, a DataLoader on another backend).
        try:
            if _is_dataset(self.x):
                self.model.evaluate(self.x, steps=1, verbose=0)
            else:
                size = self.batch_size or 32

                def head(data):
                    return None if data is None else keras.tree.map_structure(
                        lambda a: a[:size], data)

                self.model.evaluate(head(self.x), head(self.y),
                                    sample_weight=head(self.sample_weight),
                                    batch_size=size, verbose=0)
        except Exception as error:
            raise ValueError(
                "RetrainOnFullData: the full data does not fit the model: a "
                "batch of it fails in the model's test step (is a dataset "
                "batched, and does it yield (inputs, targets)?): "
                f"{type(error).__name__}: {error}"
            ) from error

    def _check_input_shape(self):
        expected = getattr(self.model, "input_shape", None)
        if isinstance(expected, tuple) and not isinstance(
            self.x, (list, tuple, dict)
        ):
            got = tuple(np.shape(self.x)[1:])
            want = tuple(expected[1:])
            if len(got) != len(want) or any(
                w is not None and w != g for w, g in zip(want, got)
            ):
                raise ValueError(
                    "RetrainOnFullData: the full data `x` does not match the "
                    f"model's input: samples of shape {got}, the model "
                    f"expects {want}."
                )

    def _full_steps(self):
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        if _is_dataset(self.x):
            if isinstance(self.x, keras.utils.PyDataset):
                return self.x.num_batches or None
            cardinality = _cardinality(self.x)
            if cardinality is None and hasattr(self.x, "__len__"):
                cardinality = len(self.x)  # e.g. a DataLoader
            return cardinality if cardinality and cardinality > 0 else None
        # Every array holds the same number of samples (`_check_counts`).
        first = keras.tree.flatten(self.x)[0]
        return math.ceil(np.shape(first)[0] / (self.batch_size or 32))

    def get_config(self):
        # The data is not part of the config.
        return {
            "algorithm": self.algorithm,
            "length": self.length,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "backup_dir": self.backup_dir,
            "shuffle": self.shuffle,
            "resume_from": self.resume_from,
            "steps_per_epoch": self.steps_per_epoch,
        }
