"""Second phase of early stopping: retrain on training + validation data."""

import collections.abc
import contextlib
import math
import os
import random
import shutil
import sys
import warnings

import keras
import numpy as np

from kreg.callbacks import early_stopping, ema
from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg import _keras_private as keras_private
from kreg.callbacks.backup_and_restore import BackupAndRestore
from kreg.utils.validation import (check_bool, check_one_of,
                                   check_optional_path)

_ALGORITHMS = ("restart", "continue")
_LENGTHS = ("epochs", "steps", "scaled")
# In the backup folder: the phase (JSON) and the values phase 2 starts from
# (weights, then optimizer variables); phase 2's own backup in a subfolder.
_STATE_NAME = "kreg_retrain_on_full_data"
_PHASE2_FOLDER = "kreg_retrain_phase2"
_PHASE2_LOGS = "kreg_retrain_phase2_logs"
# Phase 1's backups (Keras's BackupAndRestore; kreg's callbacks' states),
# obsolete once phase 2 begins: a resumed fit must not train phase 1 again.
_KERAS_BACKUP_FILES = (
    "latest.weights.h5", "latest.weights.h5.bkp", "training_metadata.json",
    "training_metadata.json.bkp",
)
_PHASE1_STATES = (early_stopping._STATE_NAME, ema._STATE_NAME)


@keras.saving.register_keras_serializable(package="kreg")
class RetrainOnFullData(keras.callbacks.Callback):
    """After early stopping, trains again on the full data (two phases).

    Passed to ``model.fit`` together with a `kreg.callbacks.EarlyStopping`
    and the full data (training + validation). The ``fit`` runs phase 1 on the
    train/validation split as usual; when it ends, this callback runs phase 2
    on the full data, so one ``fit`` call runs both (the lecture: "danach noch
    mal mit Validation set bis zum beim early stopping bestimmten Zeitpunkt
    trainieren, plus evtl. ein bisschen laenger").

    - ``algorithm="restart"`` (Goodfellow et al., algorithm 7.2, default):
      from the initial weights and a fresh optimizer state (the values the
      optimizer variables, iteration counter included, had when phase 1
      began), train for

      - ``length="epochs"``: ``best_epoch + 1`` epochs (default);
      - ``length="steps"``: the same number of optimizer steps as phase 1
        took up to its best epoch, rounded to whole epochs;
      - ``length="scaled"``: ``(best_epoch + 1) * n_full / n_train`` epochs
        (rounded up), "a bit longer because there is more data", where
        ``n_full`` and ``n_train`` are the batches per epoch of the full
        data and of phase 1 (Keras tells callbacks no sample counts): the
        ratio of the data sets' sizes up to their last, partial batches,
        so two data sets that fill the same number of batches give no
        extra epoch.
    - ``algorithm="continue"`` (algorithm 7.3): from the weights phase 1 left
      (the best ones with ``restore_best_weights=True``), train on the full
      data one epoch at a time until the loss on the validation part
      (``validation_data``) falls below the training loss logged at the best
      epoch, at most ``max_epochs`` epochs.

    After ``fit``, ``retrain_epochs`` is the number of phase-2 epochs and
    ``retrain_history`` its `History`. The History returned by ``fit`` holds
    both phases: phase-2 epochs are appended to each list, a ``phase`` list
    (1 or 2 per epoch) tells them apart, and keys missing in one phase (e.g.
    ``val_loss`` in phase 2) are NaN there. Phase 2 prints its own progress
    bar with the verbosity of the ``fit``.

    Resuming: with `kreg.callbacks.BackupAndRestore` in the same ``fit`` (or
    ``backup_dir=``, listed after Keras's BackupAndRestore), an interrupted
    ``fit`` run again ends as an uninterrupted one. Interrupted in phase 1,
    phase 2 still starts from the initial weights of the first run and the
    History holds every epoch; interrupted in phase 2, the ``fit`` skips
    phase 1 (its backups are deleted when phase 2 begins) and resumes phase
    2 at its last finished epoch, with the callbacks passed here (phase 2
    runs with a kreg ``BackupAndRestore`` in a subfolder). Keras's
    BackupAndRestore alone resumes phase 1 from its epoch but phase 2 then
    starts from the weights of the resumed ``fit`` (a warning says so).
    With `kreg.callbacks.ModelCheckpoint` in phase 1, the state (initial
    weights and optimizer values, phase-1 logs) is also written beside each
    checkpoint file; ``resume_from=<file>`` in the ``fit`` of the model
    loaded from that file (``initial_epoch=`` the file's epoch) takes it
    from there, so phase 2 again starts from the initial weights. With a
    `kreg.callbacks.ModelCheckpoint` in phase 2 (in ``callbacks=``), the
    state beside each of its files (phase-1 logs, the plan, the phase-2
    epoch and logs) lets the ``fit`` of the model loaded from such a file,
    given ``resume_from=<file>``, skip phase 1 and go on with phase 2 at the
    next epoch (an `EMA` of phase 2 resumes with its own ``resume_from``).

    The full data is checked when ``fit`` begins (one batch of it through
    the model's test step), so data that does not fit the model fails
    before phase 1 trains, not after it; so do a missing `EarlyStopping`
    (at the first epoch) and a one-pass generator or an endless dataset
    without ``steps_per_epoch`` (at construction). Keras tells callbacks
    neither the ``batch_size`` nor the ``class_weight`` or
    ``sample_weight`` of ``fit``: pass them here again.

    Args:
        x: full input data: an array (or list/dict of arrays), a
            ``tf.data.Dataset`` yielding ``(x, y)`` or ``(x, y,
            sample_weight)`` batches, or another data set Keras's ``fit``
            can run several epochs over (``keras.utils.PyDataset``, a
            PyTorch ``DataLoader``); not a generator (one pass only).
        y: full targets when ``x`` is an array (or list/dict of arrays,
            for several outputs). Defaults to `None`.
        algorithm: `"restart"` (7.2) or `"continue"` (7.3). Defaults to
            `"restart"`.
        length: for `"restart"`: `"epochs"`, `"steps"` or `"scaled"`.
            Defaults to `"epochs"`.
        batch_size: batch size for array data; pass the one given to ``fit``.
            Defaults to `None` (Keras's 32).
        shuffle: whether phase 2 shuffles array data before each epoch, as
            ``fit(shuffle=...)``. Defaults to `True`.
        validation_data: for `"continue"`: the validation part ``(x_val,
            y_val)`` (or a dataset) whose loss ends phase 2. Defaults to
            `None`.
        max_epochs: for `"continue"`: the cap on phase-2 epochs. Defaults to
            `100`.
        callbacks: callbacks for phase 2 (e.g. a ``ModelCheckpoint``).
            Defaults to `None`.
        backup_dir: folder where the state is kept for resuming an
            interrupted ``fit``. Defaults to `None`: the folder of a
            `kreg.callbacks.BackupAndRestore` in the same ``fit``, if any.
        steps_per_epoch: batches per phase-2 epoch, as ``fit(
            steps_per_epoch=...)``; needed for an endless (repeated)
            dataset. Defaults to `None`: one pass over the full data.
        sample_weight: per-sample weights of the full array data, as
            ``fit(sample_weight=...)``. Defaults to `None`.
        class_weight: as ``fit(class_weight=...)`` for phase 2. Defaults
            to `None`.
        resume_from: a checkpoint file written by a
            `kreg.callbacks.ModelCheckpoint`: of phase 1, the ``fit`` takes
            the initial weights and the logs of the earlier epochs from
            beside it; of phase 2, it goes on with phase 2 after the file's
            epoch (a backup in ``backup_dir``, newer, comes first). Defaults
            to `None`.

    Example:

    ```python
    stop = kreg.callbacks.EarlyStopping(patience=5, restore_best_weights=True)
    retrain = kreg.callbacks.RetrainOnFullData(x_all, y_all, batch_size=64)
    history = model.fit(x_train, y_train, batch_size=64, epochs=200,
                        validation_data=(x_val, y_val),
                        callbacks=[stop, retrain])
    print(stop.best_epoch, retrain.retrain_epochs)  # retrain = best + 1
    ```

    Reference:
        Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016,
        section 7.8, algorithms 7.2 and 7.3.
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
        for name, value in (("batch_size", batch_size),
                            ("max_epochs", max_epochs),
                            ("steps_per_epoch", steps_per_epoch)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int)
                or value < 1
            ):
                raise ValueError(
                    f"Invalid value received for argument `{name}`. Expected "
                    f"a positive integer. Received: {name}={value!r}"
                )
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
        self.callbacks = list(callbacks or [])
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
        if saved is None:
            self._phase1_logs = []
            self._start_values = self._values()  # the initial ones
            return
        numbers, arrays = saved
        self._phase1_logs = numbers["phase1_logs"]
        self._phase2_start = numbers.get("phase2")
        if self._phase2_start is not None and not arrays:
            # A checkpoint file of phase 2: the model loaded from it holds
            # the weights (and optimizer state) phase 2 goes on from.
            self._start_values = self._values()
        elif len(arrays) != len(self._values()):
            raise ValueError(
                f"The RetrainOnFullData state in {source!r} holds "
                f"{len(arrays)} weights and optimizer variables but this "
                f"model has {len(self._values())}."
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
            # How Keras's BackupAndRestore resumes a fit at an epoch (a
            # private attribute Keras reads after on_train_begin).
            self.model._initial_epoch = self.params["epochs"]

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
        verbose = self.params.get("verbose", 0) if self.params else 0
        if not resuming:
            self._plan = self._make_plan(stop)
        if self._plan is None:  # "continue": already below the target
            self.retrain_history = None
            rows = []
        else:
            rows = self._phase2(resuming, verbose)
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

    def _phase2(self, resuming, verbose):
        """Runs phase 2 (resumed from its backup, if any); its log rows."""
        plan = self._plan
        backup = None
        created = False
        if self._folder is not None:
            created = not os.path.isdir(self._folder)
            self._save_state(self._folder, phase=2, arrays=True)
            backup = os.path.join(self._folder, _PHASE2_FOLDER)
            if resuming:
                state_files.write_folder(backup, self._phase2_files)
            else:
                for name in _KERAS_BACKUP_FILES:
                    path = os.path.join(self._folder, name)
                    if os.path.exists(path):
                        os.remove(path)
                for base in _PHASE1_STATES:
                    for name in state_files.state_names(self._folder, base):
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
        self.retrain_history = keras.callbacks.History()
        self.retrain_history.epoch = [epoch for epoch, _ in rows]
        self.retrain_history.history = _columns(rows)
        if self._folder is not None:
            state_files.delete_state(self._folder, _STATE_NAME)
            shutil.rmtree(backup, ignore_errors=True)
            if created and not os.listdir(self._folder):
                os.rmdir(self._folder)
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
            return self.model.fit(self.x, **kwargs)
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
        rows = phase1_rows + phase2_rows
        outer.history = _columns(rows)
        outer.history["phase"] = [1] * len(phase1_rows) + [2] * len(
            phase2_rows)
        outer.epoch = [epoch for epoch, _ in rows]
        self.model.history = outer

    # Checks ----------------------------------------------------------------
    def _check_data(self):
        """Fails early on full data that does not fit the model: sample
        counts of array data, then one batch through the test step."""
        if not _is_dataset(self.x):
            self._check_arrays()
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

    def _check_arrays(self):
        if self.y is None:
            raise ValueError(
                "Invalid value received for argument `y`. Expected targets "
                "for the array inputs `x`. Received: y=None"
            )
        counts = {}
        for name, data in (("x", self.x), ("y", self.y),
                           ("sample_weight", self.sample_weight)):
            if data is None:
                continue
            sizes = [np.shape(a)[0] if np.ndim(a) else 0
                     for a in keras.tree.flatten(data)]
            if len(set(sizes)) > 1:
                raise ValueError(
                    f"RetrainOnFullData: the arrays of `{name}` hold "
                    f"different numbers of samples: {sizes}."
                )
            if sizes:
                counts[name] = sizes[0]
        if counts["y"] != counts["x"] or counts.get(
                "sample_weight", counts["x"]) != counts["x"]:
            raise ValueError(
                "RetrainOnFullData: the full data's numbers of samples "
                "differ: "
                + ", ".join(f"`{name}` {n}" for name, n in counts.items())
                + "."
            )
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
        # Every array holds the same number of samples (`_check_arrays`).
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
            state_files.save_json(self.folder, _PHASE2_LOGS, {"rows": self.rows})
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
        and not isinstance(x, (list, tuple, dict))
    )
