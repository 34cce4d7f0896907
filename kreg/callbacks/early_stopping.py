"""Early stopping with a readable best epoch and a resumable state."""

import numbers
import warnings

import keras
import numpy as np

from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_number
from kreg.utils.validation import check_one_of
from kreg.utils.validation import check_optional_path

_STATE_NAME = "kreg_early_stopping"


@keras.saving.register_keras_serializable(package="kreg")
class EarlyStopping(keras.callbacks.Callback):
    """Stops training when a monitored quantity has stopped improving.

    Keras's arguments, defaults and rule: from ``start_from_epoch`` on, ``v``
    improves on the best value when ``v < best - |min_delta|`` (``"min"``)
    or ``v > best + |min_delta|`` (``"max"``); training stops after
    ``patience`` epochs in a row without improvement (Goodfellow et al.,
    algorithm 7.1). In addition:

    - ``best_epoch`` (0-based) and ``best`` are ``None`` until a monitored
      value has been seen, and every ``fit`` starts afresh.
    - Beside `kreg.callbacks.EMA`, the weights kept and restored are those
      that produced the monitored value: the averaged ones for ``val_*``.
    - Its state (best value and epoch, wait counter, best weights) is
      resumed by `kreg.callbacks.BackupAndRestore` and written beside each
      `kreg.callbacks.ModelCheckpoint` file (``resume_from=``); see
      docs/callbacks.md.

    Args:
        monitor: the logged quantity to monitor. Defaults to `"val_loss"`.
        min_delta: the smallest change that counts as an improvement.
            Defaults to `0`.
        patience: epochs without improvement before stopping. Defaults to
            `0`.
        verbose: 0 or 1 (a message when stopping or restoring). Defaults
            to `0`.
        mode: `"min"`, `"max"` or `"auto"` (`"min"` for losses, else the
            direction the metric reports). Defaults to `"auto"`.
        baseline: a value the monitored quantity must beat. Defaults to
            `None`.
        restore_best_weights: restore the best epoch's weights at the end
            of training. Defaults to `False`.
        start_from_epoch: warm-up epochs before monitoring. Defaults to `0`.
        backup_dir: folder for the state between epochs. Defaults to
            `None`: the folder of a kreg `BackupAndRestore` in the same fit.
        resume_from: a `kreg.callbacks.ModelCheckpoint` file to continue
            from. Defaults to `None`.

    Example:

    ```python
    stop = kreg.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    model.fit(x, y, validation_split=0.2, epochs=100, callbacks=[stop])
    print(stop.best_epoch, stop.best, stop.stopped_epoch)
    ```

    Reference:
        Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016,
        section 7.8, algorithm 7.1.
    """

    def __init__(
        self,
        monitor="val_loss",
        min_delta=0,
        patience=0,
        verbose=0,
        mode="auto",
        baseline=None,
        restore_best_weights=False,
        start_from_epoch=0,
        backup_dir=None,
        resume_from=None,
    ):
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(
                "Invalid value received for argument `monitor`. Expected a "
                f"non-empty string. Received: monitor={monitor!r}"
            )
        self.monitor = monitor
        self.min_delta = abs(check_number("min_delta", min_delta))
        self.patience = _check_count("patience", patience)
        self.verbose = _check_count("verbose", verbose)
        self.mode = check_one_of("mode", mode, ("auto", "min", "max"))
        self.baseline = (
            None if baseline is None else check_number("baseline", baseline)
        )
        self.restore_best_weights = check_bool(
            "restore_best_weights", restore_best_weights
        )
        self.start_from_epoch = _check_count(
            "start_from_epoch", start_from_epoch
        )
        self.backup_dir = check_optional_path("backup_dir", backup_dir)
        self.resume_from = check_optional_path("resume_from", resume_from)
        self._backup_folder = self.backup_dir  # set again in on_train_begin
        self._maximize = None
        self._state_name = _STATE_NAME
        self._finished = False
        self._reset()

    def _reset(self):
        self.wait = 0
        self.stopped_epoch = 0
        self.best = None
        self.best_epoch = None
        self.best_weights = None

    # State ---------------------------------------------------------------
    def get_state(self):
        """The state that decides future stops, as a dict.

        Keys ``wait``, ``stopped_epoch``, ``best``, ``best_epoch`` and
        ``best_weights`` (a list of NumPy arrays in ``model.get_weights()``
        order, or ``None``).
        """
        return {
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_weights": (
                None if self.best_weights is None
                else [np.array(w) for w in self.best_weights]
            ),
        }

    def set_state(self, state):
        """Restores a state produced by `get_state`."""
        self.wait = int(state["wait"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = (
            None if state["best_epoch"] is None else int(state["best_epoch"])
        )
        weights = state.get("best_weights")
        self.best_weights = (
            None if weights is None else [np.array(w) for w in weights]
        )

    @property
    def state_name(self):
        """The name of its state in a backup folder or beside a checkpoint
        (``kreg_early_stopping``, ``kreg_early_stopping_2`` for the second
        EarlyStopping of a ``fit``, ...)."""
        return self._state_name

    def write_state(self, folder, epoch):
        """Writes `get_state()` to `folder` for a ``fit`` resumed at
        `epoch` (`kreg.callbacks.ModelCheckpoint` calls it)."""
        self._save_state(folder, epoch)

    def _save_state(self, folder, epoch, keep_previous=False):
        state = self.get_state()
        weights = state.pop("best_weights")
        state["has_weights"] = weights is not None
        state["epoch"] = epoch
        state_files.save_state(folder, self._state_name, state, weights or [],
                               keep_previous=keep_previous)

    def _set_saved_state(self, loaded):
        """Restores ``(numbers, arrays)`` written by `_save_state` (None:
        nothing saved)."""
        if loaded is None:
            return
        numbers_, arrays = loaded
        numbers_["best_weights"] = arrays if numbers_["has_weights"] else None
        self.set_state(numbers_)

    # Callback hooks ------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._reset()
        self._maximize = None
        self._finished = False
        registry.register(self, "early_stopping")
        registry.register_stateful(self)
        # Several EarlyStopping callbacks in one fit keep their states apart
        # (by their order in the callback list).
        self._state_name = registry.state_name(self, "early_stopping",
                                              _STATE_NAME)
        self._backup_folder = registry.backup_folder(self, self.backup_dir)
        self._resumed = False
        # A checkpoint's state is read now: a bad `resume_from` fails
        # before training. The backup folder's waits for the epoch the fit
        # resumes at (on_epoch_begin), which picks the state saved for it.
        self._checkpoint_state = None
        if self.resume_from is not None:
            self._checkpoint_state = state_files.load_checkpoint_state(
                self.resume_from, self._state_name, "EarlyStopping")

    def on_epoch_begin(self, epoch, logs=None):
        if not self._resumed:
            self._resume(epoch)

    def _resume(self, epoch):
        """Restores the saved state a ``fit`` resumed at `epoch` (None:
        no epoch runs) continues from: the backup folder's (newer), else
        the checkpoint's."""
        self._resumed = True
        folder, name = self._backup_folder, self._state_name
        if folder is not None and (self._checkpoint_state is None
                                   or state_files.has_state(folder, name)):
            if epoch is None:
                self._set_saved_state(state_files.load_state(folder, name))
                return
            self._set_saved_state(state_files.resume_state(
                folder, name, epoch, use_older=(
                    "EarlyStopping goes on from this state, so it may stop "
                    "as many epochs later than an uninterrupted run, and "
                    "misses a best epoch among them")))
            return
        if self._checkpoint_state is None:
            return
        counted = self._checkpoint_state[0].get("epoch")
        if epoch is not None and counted is not None and counted != epoch:
            warnings.warn(
                f"EarlyStopping: the state beside {self.resume_from!r} has "
                f"counted {counted} epochs, but training resumes at epoch "
                f"{epoch} (`initial_epoch`): the state is used as it is, so "
                "the stopping epoch may differ from an uninterrupted run's "
                f"(pass initial_epoch={counted} to resume where it was "
                "saved).",
                stacklevel=3,
            )
        self._set_saved_state(self._checkpoint_state)

    def on_epoch_end(self, epoch, logs=None):
        if self._maximize is None:
            # At the first epoch's end, as Keras: a monitor whose direction
            # mode="auto" cannot tell (a typo) fails now.
            self._maximize = self._infer_direction(logs or {})
        current = self._monitor_value(logs)
        if current is not None and epoch >= self.start_from_epoch:
            self._update(epoch, current)
        if self._backup_folder is not None:
            # The state it replaces stays too: if the fit is interrupted
            # before Keras's backup of this epoch is written, the resumed
            # fit runs this epoch again, from that one.
            self._save_state(self._backup_folder, epoch + 1,
                             keep_previous=True)
        registry.finish_epoch(self, epoch)

    def on_train_end(self, logs=None):
        if not self._finished:
            if not self._resumed:
                # No epoch ran (a fit resumed after its last epoch).
                self._resume(None)
            self.finish()

    def finish(self):
        """Ends training's use of this callback, once per ``fit``: restores
        the best weights (``restore_best_weights``) and deletes its state
        in the backup folder. ``on_train_end`` calls it;
        `kreg.callbacks.RetrainOnFullData` calls it before its second
        phase, whatever the order of the callbacks."""
        if self._finished:
            return
        self._finished = True
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(
                f"Epoch {self.stopped_epoch + 1}: early stopping"
            )
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print(
                    "Restoring model weights from the end of the best epoch: "
                    f"{self.best_epoch + 1}."
                )
            self.model.set_weights(self.best_weights)
            for ema in registry.lookup_all(self, "ema"):
                ema.forget_raw_weights()
        if self._backup_folder is not None:
            state_files.delete_state(self._backup_folder, self._state_name)

    # Internals -----------------------------------------------------------
    def _update(self, epoch, current):
        if self.restore_best_weights and self.best_weights is None:
            # The first monitored epoch is the best so far.
            self.best_weights = self._weights_to_keep()
            self.best_epoch = epoch
        self.wait += 1
        if self._improves(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self._weights_to_keep()
            if self.baseline is None or self._improves(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def _improves(self, value, reference):
        if reference is None:
            return True
        if self._maximize:
            return value - self.min_delta > reference
        return value + self.min_delta < reference

    def _weights_to_keep(self):
        """The weights that produced the monitored value."""
        emas = registry.lookup_all(self, "ema")
        # At most one of them validates with its averaged weights.
        ema = next((e for e in emas if e.validate_with_averaged),
                   emas[0] if emas else None)
        if ema is None or not ema.shadow_variables:
            return self.model.get_weights()
        if self.monitor.startswith("val_") and ema.validate_with_averaged:
            return ema.averaged_model_weights()
        # Training logs (and validation without averages) come from the
        # raw weights, whatever the EMA has swapped in for this epoch's end.
        return ema.raw_model_weights()

    def _monitor_value(self, logs):
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            warnings.warn(
                f"Early stopping conditioned on metric `{self.monitor}` "
                "which is not available. Available metrics are: "
                f"{','.join(list(logs.keys()))}",
                stacklevel=3,
            )
            return None
        value = np.asarray(keras.ops.convert_to_numpy(value))
        if value.size != 1:
            raise ValueError(
                f"EarlyStopping monitors one number, but `{self.monitor}` "
                f"was logged with shape {value.shape} (a metric with one "
                "value per class or output, such as F1Score with "
                "average=None): monitor a metric that averages them (e.g. "
                "average='macro' or 'micro'). Received: "
                f"{self.monitor}={value.tolist()!r}"
            )
        # One element, of shape () or (1,) (F1Score on one output unit).
        return float(value.reshape(()))

    def _infer_direction(self, logs):
        """Whether the monitored value is maximized: `mode`, else Keras's
        own rule (a loss is minimized; a metric object of the model says
        its direction), asked of a `keras.callbacks.EarlyStopping`."""
        if self.mode != "auto":
            return self.mode == "max"
        name = self.monitor.removeprefix("val_")
        if name == "loss" or name.endswith("_loss"):
            return False
        keras_rule = keras.callbacks.EarlyStopping(monitor=self.monitor)
        keras_rule.set_model(self.model)
        keras_rule.on_train_begin()
        try:
            keras_rule.on_epoch_end(0, {self.monitor: 0.0})
        except ValueError as error:
            if self.monitor in logs:
                raise
            raise ValueError(
                f"EarlyStopping(monitor={self.monitor!r}): that name is not "
                "logged and is not a loss or metric of the model, so "
                "mode='auto' cannot tell whether it should go down or up "
                "(training would never stop). Logged: "
                f"{', '.join(sorted(logs)) or 'nothing'}. Check the name, "
                "or pass mode='min' or mode='max' for a value logged later "
                "or by another callback."
            ) from error
        return keras_rule.monitor_op is keras.ops.greater

    def get_config(self):
        return {
            "monitor": self.monitor,
            "min_delta": self.min_delta,
            "patience": self.patience,
            "verbose": self.verbose,
            "mode": self.mode,
            "baseline": self.baseline,
            "restore_best_weights": self.restore_best_weights,
            "start_from_epoch": self.start_from_epoch,
            "backup_dir": self.backup_dir,
            "resume_from": self.resume_from,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"Invalid value received for argument `{name}`. Expected a "
            f"non-negative integer. Received: {name}={value!r}"
        )
    if value < 0:
        raise ValueError(
            f"Invalid value received for argument `{name}`. Expected a "
            f"non-negative integer. Received: {name}={value!r}"
        )
    return int(value)
