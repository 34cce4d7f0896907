"""Second phase of early stopping: retrain on training + validation data."""

import math
import os
import shutil
import warnings

import keras

from kreg import _keras_private as keras_private
from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg.callbacks import early_stopping
from kreg.callbacks import ema
from kreg.callbacks._retrain_phase2 import _check_full_data
from kreg.callbacks._retrain_phase2 import _logged
from kreg.callbacks._retrain_phase2 import _numbers
from kreg.callbacks._retrain_phase2 import _Phase2Logs
from kreg.callbacks._retrain_phase2 import _rows
from kreg.callbacks._retrain_phase2 import _set_rows
from kreg.callbacks._retrain_phase2 import _up_to
from kreg.callbacks.backup_and_restore import BackupAndRestore
from kreg.utils import fit_arguments
from kreg.utils.distribute import worker_path
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_integer
from kreg.utils.validation import check_one_of
from kreg.utils.validation import check_optional_path

_ALGORITHMS = ("restart", "continue")
_LENGTHS = ("epochs", "steps", "scaled")
# In the backup folder: the phase, the logs and the values phase 2 starts
# from (weights, then optimizer variables); phase 2's backup in a subfolder.
_STATE_NAME = "kreg_retrain_on_full_data"
_PHASE2_FOLDER = "kreg_retrain_phase2"
_PHASE1_STATES = (early_stopping._STATE_NAME, ema._STATE_NAME)


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
        shuffle: whether phase 2 shuffles array data. Defaults to `True`.
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

    Reference: Goodfellow, Bengio & Courville, "Deep Learning", sec. 7.8.
    """

    def __init__(self, x, y=None, algorithm="restart", length="epochs",
                 batch_size=None, validation_data=None, max_epochs=100,
                 callbacks=None, backup_dir=None, shuffle=True,
                 resume_from=None, steps_per_epoch=None, sample_weight=None,
                 class_weight=None):
        super().__init__()
        self.algorithm = check_one_of("algorithm", algorithm, _ALGORITHMS)
        self.length = check_one_of("length", length, _LENGTHS)
        self.batch_size = check_integer("batch_size", batch_size, low=1,
                                        allow_none=True)
        self.max_epochs = check_integer("max_epochs", max_epochs, low=1)
        self.steps_per_epoch = check_integer(
            "steps_per_epoch", steps_per_epoch, low=1, allow_none=True)
        fit_arguments.check_x_y(x, y, sample_weight, self.steps_per_epoch)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.validation_data = fit_arguments.check_validation_data(
            validation_data)
        self.callbacks = fit_arguments.check_callbacks(callbacks)
        self.class_weight = fit_arguments.check_class_weight(class_weight)
        if algorithm == "continue" and validation_data is None:
            raise ValueError(
                "Invalid value received for argument `validation_data`. "
                "algorithm='continue' (7.3) stops when the loss on the "
                "validation part falls below the training loss of the best "
                "epoch, so it needs that part. Received: validation_data=None"
            )
        self.backup_dir = check_optional_path("backup_dir", backup_dir)
        self.shuffle = check_bool("shuffle", shuffle)
        self.resume_from = check_optional_path("resume_from", resume_from)
        self.retrain_epochs = None
        self.retrain_history = None

    # Phase 1 ---------------------------------------------------------------
    def on_train_begin(self, logs=None):
        _check_full_data(self.model, self.x, self.y, self.sample_weight,
                         self.batch_size)
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._phase1_history = self.model.history
        self._first_epoch = self._plan = None
        self._phase2_start = None  # {"epoch", "rows"}: phase-2 checkpoint
        self.retrain_epochs = self.retrain_history = None
        registry.register(self, "retrain_on_full_data")
        registry.register_stateful(self)
        self._folder = source = registry.backup_folder(self, self.backup_dir)
        saved = None if source is None else state_files.load_state(
            source, _STATE_NAME)
        self._start_saved = saved is not None  # in the backup folder
        if saved is None and self.resume_from is not None:
            source = state_files.checkpoint_folder(self.resume_from)
            saved = state_files.load_checkpoint_state(
                self.resume_from, _STATE_NAME, "RetrainOnFullData")
        self._start_restored = saved is not None
        self._start_values = self._values()  # the initial ones
        self._phase1_logs = []
        if saved is None:
            return
        numbers, arrays = saved
        try:
            self.set_state({**numbers, "start_values": arrays})
        except ValueError as error:
            raise ValueError(
                f"The RetrainOnFullData state in {source!r}: {error}"
            ) from error
        if self._plan is not None:
            # Phase 1 had ended: this fit runs none of its epochs. Phase 2's
            # backup is kept in memory: an earlier BackupAndRestore may
            # delete the whole folder when this fit ends.
            self._phase2_files = {} if self._folder is None else (
                state_files.read_folder(
                    os.path.join(self._folder, _PHASE2_FOLDER)))
            keras_private.resume_at_epoch(self.model, self.params["epochs"])

    # State -------------------------------------------------------------
    @property
    def state_name(self):
        """The name of its state in a backup folder or beside a checkpoint."""
        return _STATE_NAME

    def get_state(self):
        """``phase`` (1 or 2), ``phase1_logs`` (a dict per epoch),
        ``plan`` (phase 2's length and target, None in phase 1),
        ``phase2`` (where a resumed phase 2 starts) and ``start_values``
        (the weights, then the optimizer variables, phase 2 starts from)."""
        return {"phase": 1 if self._plan is None else 2,
                "phase1_logs": list(self._phase1_logs), "plan": self._plan,
                "phase2": self._phase2_start,
                "start_values": list(self._start_values)}

    def set_state(self, state):
        """Restores a state produced by `get_state` (after training
        began)."""
        values = list(state.get("start_values") or [])
        # A checkpoint file of phase 2 has no values: the model loaded from
        # it holds the values phase 2 goes on from.
        if state.get("phase2") is None or values:
            optimizer = self.model.optimizer
            expected = len(self.model.weights) + (
                0 if optimizer is None else len(optimizer.variables))
            if len(values) != expected:
                raise ValueError(
                    f"it holds {len(values)} weights and optimizer variables "
                    f"but this model has {expected}.")
            self._start_values = values
        self._phase1_logs = list(state["phase1_logs"])
        self._phase2_start = state.get("phase2")
        self._plan = state["plan"] if state["phase"] == 2 else None

    def write_state(self, folder, epoch):
        """Writes its phase-1 state (logs, start values) to `folder`
        (`kreg.callbacks.ModelCheckpoint` calls it during phase 1)."""
        self._save_state(folder, 1, self._start_values)

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
        # Every on_train_begin has run: this fit's EarlyStopping is known.
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
                "ModelCheckpoint) to resume it.", stacklevel=2)
        self._phase1_logs = _up_to(self._phase1_logs, epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._phase1_logs.append(_numbers(logs))
        if self._folder is not None:
            self._save_state(self._folder, 1, None if self._start_saved
                             else self._start_values)
            self._start_saved = True
        registry.finish_epoch(self, epoch)

    def _save_state(self, folder, phase, arrays, phase2=None):
        """Writes the state to `folder`, with `arrays` (the values phase 2
        starts from, or none beside a checkpoint file of phase 2, which
        holds them) or as an update of its numbers (`arrays` None)."""
        numbers = {"phase": phase, "phase1_logs": self._phase1_logs,
                   "plan": self._plan, "phase2": phase2 or self._phase2_start}
        if arrays is None:
            state_files.save_json(folder, _STATE_NAME, numbers)
        else:
            state_files.save_state(folder, _STATE_NAME, numbers, arrays)

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
        elif not any(k.startswith("val_") for row in self._phase1_logs
                     for k in row):
            raise ValueError(
                "RetrainOnFullData: the first phase had no validation data. "
                "Pass `validation_data` or `validation_split` to `fit`."
            )
        elif stop.best_epoch is None:
            raise ValueError(
                "RetrainOnFullData: EarlyStopping never saw its monitored "
                f"value `{stop.monitor}`; no best epoch to retrain for."
            )
        stop.finish()  # the best weights, before phase 2
        if not resuming:
            self._plan = self._make_plan(stop)
        # No plan: "continue", with the loss already below the target.
        rows = [] if self._plan is None else self._phase2(resuming)
        self.retrain_epochs = rows[-1][0] + 1 if rows else 0
        self._merge_histories(rows)

    def _make_plan(self, stop):
        """Phase 2's length (and target), from phase 1's best epoch."""
        best_epoch = stop.best_epoch
        plan = {"early_stopping": {
            "wait": int(stop.wait), "stopped_epoch": int(stop.stopped_epoch),
            "best": None if stop.best is None else float(stop.best),
            "best_epoch": int(best_epoch)}, "target": None}
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
            full_steps = fit_arguments.batches_per_epoch(
                self.x, self.batch_size, self.steps_per_epoch)
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
        if self._folder is not None:
            # This worker's copy of the folder (the folder on the chief).
            written = worker_path(self._folder)
            created = not os.path.isdir(written)
            self._save_state(self._folder, 2, self._start_values)
            backup = os.path.join(self._folder, _PHASE2_FOLDER)
            if resuming:
                state_files.write_folder(backup, self._phase2_files)
            else:
                for name in keras_private.KERAS_BACKUP_FILES:
                    if os.path.exists(os.path.join(written, name)):
                        os.remove(os.path.join(written, name))
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
        elif verbose and plan["target"] is None:
            print(f"Phase 2: retraining on the full data from the initial "
                  f"weights for {plan['epochs']} epochs")
        elif verbose:
            print(f"Phase 2: continuing on the full data until the "
                  f"validation-part loss < {plan['target']:.6g} (at most "
                  f"{plan['epochs']} epochs)")
        recorder = _Phase2Logs(
            backup, start["rows"], plan, self._validation_loss,
            lambda folder, resume_at, rows: self._save_state(
                folder, 2, [], phase2={"epoch": resume_at, "rows": rows}))
        callbacks = list(self.callbacks) + [recorder] + (
            [] if backup is None else [BackupAndRestore(backup)])
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
        variables = [] if optimizer is None else optimizer.variables
        return self.model.get_weights() + [
            keras.ops.convert_to_numpy(v.value) for v in variables]

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
        if fit_arguments.is_dataset(self.x):
            # A data set is used as it comes (Keras warns about a
            # `shuffle=True` it ignores); a PyDataset of known length is
            # shuffled by batch, as in `fit`.
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
                "`fit`.", stacklevel=2)
        return self.model.fit(self.x, self.y, batch_size=self.batch_size,
                              shuffle=self.shuffle,
                              sample_weight=self.sample_weight, **kwargs)

    def _validation_loss(self):
        data = self.validation_data
        if isinstance(data, (tuple, list)):  # (x, y) or (x, y, weights)
            data = dict(zip(("x", "y", "sample_weight"), data),
                        batch_size=self.batch_size)
        else:
            data = {"x": data}
        return float(self.model.evaluate(verbose=0, return_dict=True,
                                         **data)["loss"])

    def _merge_histories(self, phase2_rows):
        """The History of ``fit``: every epoch of both phases (also those
        run before an interruption), a ``phase`` column, NaN for keys
        missing in a phase. Rows are ``(epoch, logs)``."""
        outer = self._phase1_history
        if outer is None:
            return
        # Epochs logged before this fit (resumed): from the saved state.
        phase1_rows = (_logged(self._phase1_logs[:self._first_epoch])
                       + _rows(outer))
        _set_rows(outer, phase1_rows + phase2_rows)
        outer.history["phase"] = [1] * len(phase1_rows) + [2] * len(
            phase2_rows)
        self.model.history = outer

    def get_config(self):
        # The data (and what comes with it) is not part of the config.
        return {key: getattr(self, key) for key in (
            "algorithm", "length", "batch_size", "max_epochs", "backup_dir",
            "shuffle", "resume_from", "steps_per_epoch")}
