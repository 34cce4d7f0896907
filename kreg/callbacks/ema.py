"""Exponential moving average (Polyak averaging) of the weights during fit."""

import contextlib
import warnings

import keras
import numpy as np

from kreg.callbacks import _registry as registry
from kreg.callbacks import _state_files as state_files
from kreg.optimizers.averaging_optimizer import AveragingOptimizer
from kreg.optimizers.optimizer_wrapper import install_wrapper
from kreg.optimizers.optimizer_wrapper import optimizer_chain
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_number
from kreg.utils.validation import check_optional_path

_STATE_NAME = "kreg_ema"


def _copy(value):
    # A buffer of its own: JAX's train step donates its inputs, and a
    # PyTorch variable's value is the tensor that training changes.
    return keras.ops.copy(value)


def _numpy(values):
    return [keras.ops.convert_to_numpy(v) for v in values]


@keras.saving.register_keras_serializable(package="kreg")
class EMA(keras.callbacks.Callback):
    """Keeps an exponential moving average of the weights while training.

    When training begins ``s_0 = w_0``; after every optimizer step
    ``t = 1, 2, ...`` that changes the weights::

        s_t = d_t * s_{t-1} + (1 - d_t) * w_t

    with ``d_t = decay`` or, with ``warmup=True`` (timm's ModelEmaV3),
    ``d_t = min(decay, 1 - t ** (-warmup_power))``. The update runs inside
    the compiled train step (`kreg.optimizers.AveragingOptimizer`), so a
    new `EMA` in each ``fit`` reuses it. Validation uses the averaged
    weights, which stay in the model when training ends; passed to
    ``predict``/``evaluate``, the EMA swaps them in for that call only.
    Checkpoints, resuming, early stopping and the order of callbacks:
    ``docs/callbacks.md``.

    Args:
        decay: the decay ``d`` in [0, 1). Defaults to `0.999`.
        warmup: ramp the decay up as ``1 - t ** (-warmup_power)``.
            Defaults to `False`.
        warmup_power: exponent of the warm-up, > 0. Defaults to `2 / 3`.
        validate_with_averaged: validate with the averaged weights and
            leave them in for the epoch-end callbacks. Defaults to `True`.
        keep_averaged: leave the averaged weights in the model when
            training ends. Defaults to `True`.
        average_non_trainable: also average floating-point non-trainable
            weights (batch-normalization statistics), once per batch.
            Defaults to `False`.
        backup_dir: folder for the state that resumes an interrupted
            ``fit``. Defaults to `None`: that of a
            `kreg.callbacks.BackupAndRestore` in the same ``fit``, if any.
        resume_from: a file written by `kreg.callbacks.ModelCheckpoint`:
            continue from the state saved beside it. Defaults to `None`.

    Example:

    ```python
    ema = kreg.callbacks.EMA(decay=0.99)
    model.fit(x, y, validation_split=0.2, epochs=10, callbacks=[ema])
    with ema.raw_weights():          # the model holds the averaged ones
        raw_predictions = model.predict(x)
    ```

    Reference: Polyak & Juditsky, "Acceleration of stochastic
    approximation by averaging", SIAM J. Control Optim. 1992.
    """

    def __init__(self, decay=0.999, warmup=False, warmup_power=2.0 / 3.0,
                 validate_with_averaged=True, keep_averaged=True,
                 average_non_trainable=False, backup_dir=None,
                 resume_from=None):
        super().__init__()
        self.decay = check_number("decay", decay, 0.0, 1.0,
                                  high_inclusive=False)
        self.warmup = check_bool("warmup", warmup)
        self.warmup_power = check_number(
            "warmup_power", warmup_power, 0.0, None, low_inclusive=False)
        self.validate_with_averaged = check_bool(
            "validate_with_averaged", validate_with_averaged)
        self.keep_averaged = check_bool("keep_averaged", keep_averaged)
        self.average_non_trainable = check_bool(
            "average_non_trainable", average_non_trainable)
        self.backup_dir = check_optional_path("backup_dir", backup_dir)
        self.resume_from = check_optional_path("resume_from", resume_from)
        self._optimizer = self._fitted_model = self._targets = None
        self._shadow = None  # the averages while no epoch runs
        self._steps, self._extra_count = 0, None
        self._reset(in_fit=False)

    def _reset(self, in_fit):
        self._in_fit, self._started, self._live = in_fit, False, False
        self._epoch_view = self._restored_by_early_stopping = False
        self._backup = None  # the raw weights while the averaged are in
        self._averaged_in_model = self._swapped_for_inference = False

    # Public API ------------------------------------------------------------
    @property
    def steps(self):
        """How many optimizer steps the shadow has averaged in this fit."""
        if self._live:
            self.model  # noqa: B018 (syncs JAX's state before a read)
            return int(keras.ops.convert_to_numpy(self._optimizer.count))
        return self._steps

    @property
    def shadow_variables(self):
        """The averaged values, one per averaged model weight."""
        if self._shadow is None and not self._live:
            return []
        return list(self._shadow_values())

    def current_decay(self, step):
        """The decay ``d_t`` used at optimizer step ``t`` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - float(step) ** (-self.warmup_power))

    def averaged_model_weights(self):
        """``model.get_weights()`` with the averaged values where averaged."""
        self._check_started()
        return self._model_weights(self._shadow_values())

    def raw_model_weights(self):
        """``model.get_weights()`` with the raw values, also while the
        averaged weights are swapped in."""
        self._check_started()
        return self._model_weights(self._raw_values())

    def swap_in(self):
        """Puts the averaged weights into the model (no-op if already in)."""
        self._check_started()
        if self._averaged_in_model:
            return
        self._sync_extra()
        self._backup = [_copy(v.value) for v in self._targets]
        for variable, value in zip(self._targets, self._shadow_values()):
            variable.assign(_copy(value))
        self._averaged_in_model = True

    def swap_out(self):
        """Puts the raw weights back (no-op if they are in the model)."""
        if not self._averaged_in_model:
            return
        for variable, value in zip(self._targets, self._backup or []):
            variable.assign(value)
        self._backup, self._averaged_in_model = None, False

    def averaged_weights(self):
        """Context manager: averaged weights inside, previous state after."""
        return self._weights_inside(averaged=True)

    def raw_weights(self):
        """Context manager: raw weights inside, previous state after."""
        return self._weights_inside(averaged=False)

    @contextlib.contextmanager
    def _weights_inside(self, averaged):
        self._end_interrupted_inference()
        was_in = self._averaged_in_model
        if not averaged and was_in and self._backup is None:
            raise ValueError(
                "The raw weights are no longer available: they were replaced "
                "after training (e.g. by EarlyStopping(restore_best_weights="
                "True)).")
        (self.swap_in if averaged else self.swap_out)()
        try:
            yield self
        finally:
            (self.swap_in if was_in else self.swap_out)()

    @property
    def state_name(self):
        """The name of its state in a backup folder or beside a checkpoint."""
        return _STATE_NAME

    def get_state(self):
        """The step count, the shadow values and the raw values of the
        averaged weights (NumPy), as a dict."""
        self._check_started()
        return {"steps": self.steps, "shadow": _numpy(self._shadow_values()),
                "raw_weights": _numpy(self._raw_values())}

    def set_state(self, state):
        """Restores a state produced by `get_state` (after training began);
        without ``raw_weights``, the model's weights stay as they are."""
        self._check_started()
        expected = [tuple(t.shape) for t in self._targets]
        raw = list(state.get("raw_weights") or [])
        for key, values in (("shadow", state["shadow"]), ("raw_weights", raw)):
            shapes = [tuple(np.shape(v)) for v in values]
            if shapes != expected and (values or key == "shadow"):
                raise ValueError(
                    f"The EMA state holds {key} of shapes {shapes}, but the "
                    f"weights this EMA averages have shapes {expected}.")
        self._shadow = [keras.ops.convert_to_tensor(v, t.dtype)
                        for v, t in zip(state["shadow"], self._targets)]
        self._steps = int(state["steps"])
        if raw and self._averaged_in_model and self._backup is not None:
            self._backup = [keras.ops.convert_to_tensor(v, t.dtype)
                            for v, t in zip(raw, self._targets)]
        elif raw:
            for target, value in zip(self._targets, raw):
                target.assign(value)
        if self._live:
            self._lend_shadow()

    def write_state(self, folder, epoch):
        """Writes `get_state()` to `folder` for a ``fit`` resumed at
        `epoch` (`kreg.callbacks.ModelCheckpoint` calls it); nothing
        before training began."""
        if self._shadow is None and not self._live:
            return
        state = self.get_state()
        state_files.save_state(
            folder, _STATE_NAME,
            {"steps": state["steps"], "epoch": epoch,
             "num_shadow": len(state["shadow"])},
            state["shadow"] + state["raw_weights"])

    def forget_raw_weights(self):
        """Keeps the weights now in the model when training ends, and
        forgets the raw ones it would swap back: another callback
        (`kreg.callbacks.EarlyStopping` restoring its best) put weights of
        its own in."""
        self._restored_by_early_stopping = True
        self._averaged_in_model, self._backup = False, None

    # Callback hooks --------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        if getattr(model, "optimizer", None) is not None and getattr(
                model, "compiled", True):
            # Before any on_train_begin: a BackupAndRestore listed first
            # loads its optimizer state into the wrapped optimizer.
            self._check_no_keras_ema()
            install_wrapper(model, AveragingOptimizer, AveragingOptimizer)

    def on_train_begin(self, logs=None):
        registry.register(self, "ema")
        registry.register_stateful(self)
        self._check_one_per_fit()
        self._check_no_keras_ema()
        self._end_interrupted_inference()
        if self._in_fit and self._averaged_in_model:
            self.swap_out()  # an interrupted fit left the averages in
        self._optimizer = install_wrapper(self.model, AveragingOptimizer,
                                          AveragingOptimizer)
        # Every weight the optimizer may train (FineTuning freezes some).
        targets = list(self._optimizer.built_variables)
        known = {id(v) for v in targets}
        if any(id(v) not in known for v in self.model.trainable_variables):
            raise ValueError(
                "The model's trainable weights changed since it was "
                "compiled: compile it again before fitting with an EMA.")
        if self.average_non_trainable:
            targets += [v for v in self.model.non_trainable_variables
                        if "float" in str(v.dtype) and id(v) not in known]
        self._targets = targets
        self._fitted_model = self.model
        self._reset(in_fit=True)
        self._backup_folder = registry.backup_folder(self, self.backup_dir)
        # A checkpoint's state is read now (a bad `resume_from` fails before
        # training); the backup folder's when the first epoch begins.
        self._checkpoint_state = None
        if self.resume_from is not None and not (
                self._backup_folder is not None
                and state_files.has_state(self._backup_folder, _STATE_NAME)):
            self._checkpoint_state = state_files.load_checkpoint_state(
                self.resume_from, _STATE_NAME, "EMA")

    def on_epoch_begin(self, epoch, logs=None):
        if self._epoch_view:
            self._epoch_view = False
            self.swap_out()
        if not self._started:  # after BackupAndRestore loaded its weights
            self._started = True
            self._start(epoch)
        self._lend_shadow()

    def on_train_batch_begin(self, batch, logs=None):
        if self._extra_count is not None and batch > 0:
            self._sync_extra()

    def on_epoch_end(self, epoch, logs=None):
        self._take_back_shadow()
        if self.validate_with_averaged and not self._averaged_in_model:
            # No validation this epoch: the epoch-end callbacks listed
            # after this one still see the averaged weights.
            self.swap_in()
            self._epoch_view = True
        if self._backup_folder is not None:
            self.write_state(self._backup_folder, epoch + 1)
        registry.finish_epoch(self, epoch)

    def on_test_begin(self, logs=None):
        self._end_interrupted_inference()
        self._swap_for_inference(
            self.validate_with_averaged if self._in_fit else True)

    def on_test_end(self, logs=None):
        if self._in_fit and self._swapped_for_inference:
            # Validation in fit: the averages stay in for the epoch-end
            # callbacks; they leave when the next epoch begins.
            self._swapped_for_inference = False
            self._epoch_view = True
            return
        self._unswap_after_inference()

    def on_predict_begin(self, logs=None):
        self._end_interrupted_inference()
        self._swap_for_inference(True)

    def on_predict_end(self, logs=None):
        self._unswap_after_inference()

    def on_train_end(self, logs=None):
        self._take_back_shadow()
        self._in_fit = False
        if self._epoch_view:
            self._epoch_view = False
            if self._averaged_in_model and not self._shadow_in_model():
                # Keras's EarlyStopping restored its best: keep them.
                self.forget_raw_weights()
        if self._started and not self._restored_by_early_stopping:
            if self.keep_averaged:
                self.swap_in()
            else:
                self.swap_out()
        if self._backup_folder is not None:
            state_files.delete_state(self._backup_folder, _STATE_NAME)

    # Internals -------------------------------------------------------------
    def _raw_values(self):
        """The raw values of the averaged variables, also when swapped."""
        if self._averaged_in_model and self._backup is not None:
            return self._backup
        return [v.value for v in self._targets]

    def _model_weights(self, values):
        """``model.get_weights()`` with `values` for the averaged ones."""
        by_id = {id(v): value for v, value in zip(self._targets, values)}
        return [keras.ops.convert_to_numpy(by_id.get(id(w), w.value))
                for w in self.model.weights]

    def _shadow_values(self):
        if not self._live:
            return self._shadow
        self.model  # noqa: B018 (syncs JAX's state before a read)
        shadows = [s.value for s in self._optimizer.shadows]
        return shadows + list(self._shadow[len(shadows):])

    def _lend_shadow(self):
        """The optimizer averages from this EMA's shadow for an epoch."""
        count = len(self._optimizer.shadows)
        for variable, value in zip(self._optimizer.shadows, self._shadow):
            variable.assign(_copy(value))
        self._optimizer.count.assign(self._steps)
        self._optimizer.configure(
            True, self.decay, self.warmup_power if self.warmup else 0.0)
        self._live = True
        self._extra_count = (self._steps if len(self._targets) > count
                             else None)

    def _take_back_shadow(self):
        if not self._live:
            return
        self._sync_extra()
        self._optimizer.configure(False)
        self._steps = int(keras.ops.convert_to_numpy(self._optimizer.count))
        self._shadow = [_copy(v) for v in self._shadow_values()]
        self._live = False

    def _sync_extra(self):
        """Averages the non-trainable weights once per batch, at the decay
        of the optimizer's last step (the optimizer sees no others)."""
        if self._extra_count is None:
            return
        steps = self.steps
        if steps == self._extra_count:
            return
        self._extra_count = steps
        d = self.current_decay(steps)
        count = len(self._optimizer.shadows)
        self._shadow[count:] = [d * s + (1.0 - d) * v for s, v in zip(
            self._shadow[count:], self._raw_values()[count:])]

    def _start(self, epoch):
        """s_0 = w_0 (or an interrupted fit's state) before step 1."""
        self._shadow = [_copy(v.value) for v in self._targets]
        self._steps = 0
        saved = self._checkpoint_state
        if saved is None and self._backup_folder is not None:
            saved = state_files.resume_state(self._backup_folder,
                                             _STATE_NAME, epoch)
        elif saved is None and epoch > 0:
            warnings.warn(
                f"EMA: training starts at epoch {epoch} (resumed?) but no "
                "saved EMA state was found; the average restarts from the "
                "current weights. Resume it with kreg.callbacks."
                "BackupAndRestore or `backup_dir=`.", stacklevel=2)
        if saved is None:
            return
        numbers, arrays = saved
        count = numbers.get("num_shadow", len(arrays))
        self.set_state({"steps": numbers["steps"], "shadow": arrays[:count],
                        "raw_weights": arrays[count:]})

    def _shadow_in_model(self):
        return all(np.array_equal(a, b) for a, b in zip(
            _numpy(v.value for v in self._targets),
            _numpy(self._shadow_values())))

    def _swap_for_inference(self, wanted):
        if wanted and self._shadow is not None and not self._shares_weights():
            raise ValueError(
                "This EMA averages the weights of the model it was fit "
                f"with ({self._fitted_model.name!r}), not those of "
                f"{self.model.name!r}: pass it to that model's "
                "`predict`/`evaluate`, or save the averaged model (e.g. "
                "inside `with ema.averaged_weights():`) and load that.")
        self._swapped_for_inference = (
            wanted and self._shadow is not None
            and not self._averaged_in_model)
        if self._swapped_for_inference:
            self.swap_in()

    def _shares_weights(self):
        """Whether `self.model` holds a weight this EMA averages (the model
        it was fit with, or one sharing its layers)."""
        if self.model is self._fitted_model:
            return True
        ids = {id(v) for v in self.model.variables}
        return any(id(t) in ids for t in self._targets)

    def _end_interrupted_inference(self):
        """A `predict`/`evaluate` outside `fit` that raised got no end hook
        from Keras: the raw weights go back in before anything else."""
        if not self._in_fit:
            self._unswap_after_inference()

    def _unswap_after_inference(self):
        if self._swapped_for_inference:
            self.swap_out()
        self._swapped_for_inference = False

    def _check_one_per_fit(self):
        emas = registry.lookup_all(self, "ema")
        if len(emas) > 1:
            raise ValueError(
                "One kreg.callbacks.EMA per `fit`: they would swap their "
                "averaged weights in and out over each other. This fit has "
                f"{len(emas)}, with decays {[e.decay for e in emas]}.")

    def _check_no_keras_ema(self):
        for optimizer in optimizer_chain(self.model.optimizer):
            if getattr(optimizer, "use_ema", False):
                raise ValueError(
                    "kreg.callbacks.EMA with an optimizer that averages "
                    f"too ({type(optimizer).__name__}(use_ema=True)): the "
                    "weights would be averaged twice. Compile without "
                    "`use_ema`, or drop the EMA callback.")

    def _check_started(self):
        if self._shadow is None and not self._live:
            raise ValueError(
                "The EMA has no averaged weights yet: pass it to `model.fit` "
                "first (the shadow is created when training begins).")

    def get_config(self):
        return {name: getattr(self, name) for name in (
            "decay", "warmup", "warmup_power", "validate_with_averaged",
            "keep_averaged", "average_non_trainable", "backup_dir",
            "resume_from")}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
