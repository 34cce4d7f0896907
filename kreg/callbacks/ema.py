"""Exponential moving average (Polyak averaging) of the weights during fit."""

import contextlib
import warnings

import keras
import numpy as np

from kreg.callbacks import _shared
from kreg.callbacks._bulk_variables import copy_value
from kreg.callbacks._ema_updater import Updater, fusable, step_counter
from kreg.utils.validation import check_optional_path
from kreg.utils.validation import check_bool, check_number

_STATE_NAME = "kreg_ema"


@keras.saving.register_keras_serializable(package="kreg")
class EMA(keras.callbacks.Callback):
    """Keeps an exponential moving average of the weights while training.

    When training begins, the shadow is a copy of the weights ``s_0 = w_0``;
    after every optimizer step ``t = 1, 2, ...``::

        s_t = d_t * s_{t-1} + (1 - d_t) * w_t

    with ``d_t = decay``, or, with ``warmup=True`` (timm's ModelEmaV3),
    ``d_t = min(decay, 1 - t ** (-warmup_power))``, which starts at 0 and
    lets the shadow follow the first, fast-changing weights.

    The update runs inside the compiled train step on TensorFlow and on JAX
    (``jit_compile``), where XLA fuses it with the optimizer's pass over the
    weights; else (under a distribution, PyTorch) one compiled call per step
    (an XLA-compiled ``tf.function``, ``jax.jit`` with buffer donation, an
    in-place multi-tensor ``lerp`` or a CUDA-graph replay on PyTorch), never
    a copy through NumPy. With ``steps_per_execution > 1`` in
    ``model.compile`` every step of a compiled call is averaged; that needs
    the update inside the train step (a `ValueError` says so otherwise).

    - Validation inside ``fit`` runs with the averaged weights
      (``validate_with_averaged=True``), so ``val_*`` logs describe the model
      you keep. The averaged weights then stay in the model through the
      epoch-end callbacks, whatever their place in the list (in an epoch
      without validation, only for the callbacks listed after the EMA), and
      the raw weights are put back when the next epoch begins. So
      `keras.callbacks.ModelCheckpoint` (``save_best_only`` on ``val_loss``)
      saves the weights whose ``val_loss`` was logged, and Keras's
      ``EarlyStopping(restore_best_weights=True)`` keeps averaged weights
      (which the EMA then leaves in place, even with
      ``keep_averaged=False``; one case it cannot tell: with Keras's
      EarlyStopping listed before the EMA and the best epoch the last, the
      restored weights equal the averaged ones still in the model, and
      ``keep_averaged=False`` puts the raw ones back. kreg's EarlyStopping,
      or the EMA listed first, keeps the best ones). Saves made in the
      middle of an epoch (``save_freq=<int>``) hold the raw weights.
    - ``with ema.averaged_weights(): ...`` swaps the averaged weights in (for
      ``evaluate``, ``predict``, ``save``) and back out on exit. Passed as a
      callback to ``evaluate``/``predict`` it does the same for that call, and
      nothing is left swapped afterwards (Keras's ``SwapEMAWeights`` leaves
      the EMA weights in after ``predict``). A call that raises gets no end
      hook from Keras: the raw weights go back at the EMA's next use (a
      ``fit``, ``evaluate``, ``predict`` or context manager with it). Only
      the model it was fit with: another model's ``predict`` with it is a
      `ValueError`.
    - At the end of training the averaged weights are left in the model
      (``keep_averaged=True``); ``ema.raw_weights()`` swaps the last raw
      weights back in temporarily.
    - With `kreg.callbacks.EarlyStopping(restore_best_weights=True)` in the
      same ``fit``, the restored weights are the averaged ones of the best
      epoch (those that produced the best ``val_*`` value) and the EMA does
      not overwrite them at the end.
    - Batch-normalization moving statistics are non-trainable weights. By
      default they are not averaged: the averaged model uses the current
      moving statistics (as Keras's optimizer ``use_ema`` does). With
      ``average_non_trainable=True`` every floating-point non-trainable
      weight is averaged like the trainable ones (as timm's ModelEma does);
      integer state (counters, seeds) is never averaged.
    - Checkpoint files (``.keras``, ``.weights.h5``) written by
      ``ModelCheckpoint`` at the end of an epoch hold the averaged weights in
      place of the trainable weights (with ``validate_with_averaged=True``)
      and the optimizer state of the raw run; they never hold the raw
      weights, the step count or a second copy of the shadow, so they load
      into a plain model. `kreg.callbacks.ModelCheckpoint` (Keras's, plus
      this state) also writes the shadow, the raw weights and the step count
      beside each file (in the folder ``<file>.kreg``): an ``EMA(...,
      resume_from=<file>)`` passed to the ``fit`` of the model loaded from
      that file continues the average and the raw run. Without it,
      training resumed from such a file restarts from the averaged weights.
    - The shadow survives an interrupted training beside
      `kreg.callbacks.BackupAndRestore` (or, with ``backup_dir``, beside
      Keras's): at the end of every epoch the shadow, the raw weights and
      the step count are written to the backup folder
      (``kreg_ema.json``/``kreg_ema.npz``), and the resumed ``fit`` puts all
      three back when its first epoch begins, after ``BackupAndRestore`` has
      loaded its weights (it deletes the folder at the end). The
      raw weights are restored because ``BackupAndRestore`` saved the
      averaged ones. Use ``BackupAndRestore(save_freq="epoch")`` (its
      default). A ``fit`` that starts after epoch 0 without such a state
      warns that the average restarts. `get_state`/`set_state` give the
      shadow and step count as a dict.

    With ``gradient_accumulation_steps=k`` in the optimizer only the
    batches that change the weights (every ``k``-th) are averaged steps.

    Args:
        decay: the decay ``d`` in [0, 1). Defaults to `0.999`.
        warmup: ramp the decay up as ``1 - t ** (-warmup_power)``. Defaults to
            `False`.
        warmup_power: exponent of the warm-up, in (0, inf). Defaults to
            `2 / 3`.
        validate_with_averaged: evaluate the validation data inside ``fit``
            with the averaged weights and leave them in the model for the
            epoch-end callbacks. Defaults to `True`.
        keep_averaged: leave the averaged weights in the model when training
            ends. Defaults to `True`.
        average_non_trainable: also average floating-point non-trainable
            weights (batch-normalization moving statistics). Defaults to
            `False`.
        backup_dir: folder where the shadow and the raw weights are kept
            between epochs for resuming an interrupted ``fit`` (files
            ``kreg_ema.*``; the ``BackupAndRestore`` folder will do).
            Defaults to `None`: the folder of a
            `kreg.callbacks.BackupAndRestore` in the same ``fit``, if any.
        resume_from: a checkpoint file written by
            `kreg.callbacks.ModelCheckpoint`: the ``fit`` starts from the
            shadow, raw weights and step count saved beside it (a backup of
            an interrupted ``fit`` in ``backup_dir``, newer, comes first).
            Defaults to `None`.

    Example:

    ```python
    ema = kreg.callbacks.EMA(decay=0.99)
    model.fit(x, y, validation_split=0.2, epochs=10, callbacks=[ema])
    # The model now holds the averaged weights.
    with ema.raw_weights():
        raw_predictions = model.predict(x)
    ```

    Reference:
        Polyak & Juditsky, "Acceleration of stochastic approximation by
        averaging", SIAM J. Control Optim. 1992.
    """

    def __init__(
        self,
        decay=0.999,
        warmup=False,
        warmup_power=2.0 / 3.0,
        validate_with_averaged=True,
        keep_averaged=True,
        average_non_trainable=False,
        backup_dir=None,
        resume_from=None,
    ):
        super().__init__()
        self.decay = check_number(
            "decay", decay, 0.0, 1.0, high_inclusive=False
        )
        self.warmup = check_bool("warmup", warmup)
        self.warmup_power = check_number(
            "warmup_power", warmup_power, 0.0, None, low_inclusive=False
        )
        self.validate_with_averaged = check_bool(
            "validate_with_averaged", validate_with_averaged
        )
        self.keep_averaged = check_bool("keep_averaged", keep_averaged)
        self.average_non_trainable = check_bool(
            "average_non_trainable", average_non_trainable
        )
        self.backup_dir = check_optional_path("backup_dir", backup_dir)
        self.resume_from = check_optional_path("resume_from", resume_from)
        self._targets = None
        self._built_for = None
        self._shadows = None
        self._backup = None
        self._averaged_in_model = False
        self._in_fit = False
        self._updater = None
        self._count = None
        self._step_pending = False
        self._swapped_in = []
        self._backup_folder = self.backup_dir  # set again in on_train_begin

    @property
    def steps(self):
        """How many optimizer steps the shadow has averaged in this fit."""
        if self._count is None:
            return 0
        self._flush()
        return int(keras.ops.convert_to_numpy(self._count.value))

    # Public API ------------------------------------------------------------
    @property
    def shadow_variables(self):
        """The averaged values, one variable per averaged model weight."""
        self._flush()
        return list(self._shadows or [])

    def current_decay(self, step):
        """The decay ``d_t`` used at optimizer step ``t`` (1-based)."""
        t = step
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - float(t) ** (-self.warmup_power))

    def averaged_model_weights(self):
        """``model.get_weights()`` with the averaged values where averaged."""
        self._check_started()
        self._flush()
        by_id = {id(v): s for v, s in zip(self._targets, self._shadows)}
        return [
            keras.ops.convert_to_numpy(by_id.get(id(w), w).value)
            for w in self.model.weights
        ]

    def raw_model_weights(self):
        """``model.get_weights()`` with the raw values, even while the
        averaged weights are swapped in."""
        self._check_started()
        if not (self._averaged_in_model and self._backup is not None):
            return self.model.get_weights()
        by_id = {id(v): b for v, b in zip(self._targets, self._backup)}
        return [
            keras.ops.convert_to_numpy(by_id.get(id(w), w.value))
            for w in self.model.weights
        ]

    def swap_in(self):
        """Puts the averaged weights into the model (no-op if already in)."""
        self._check_started()
        if self._averaged_in_model:
            return
        self._flush()
        updater = self._updater
        self._backup = updater.target_group.exchange(updater.shadow_group)
        self._averaged_in_model = True
        self._swapped_in = self._values()

    def swap_out(self):
        """Puts the raw weights back (no-op if they are in the model)."""
        if not self._averaged_in_model:
            return
        if self._backup is not None:
            self._updater.target_group.assign(self._backup)
        self._backup = None
        self._averaged_in_model = False

    @contextlib.contextmanager
    def averaged_weights(self):
        """Context manager: averaged weights inside, previous state after."""
        self._end_interrupted_inference()
        was_in = self._averaged_in_model
        self.swap_in()
        try:
            yield self
        finally:
            if not was_in:
                self.swap_out()

    @contextlib.contextmanager
    def raw_weights(self):
        """Context manager: raw weights inside, previous state after."""
        self._end_interrupted_inference()
        was_in = self._averaged_in_model
        if was_in and self._backup is None:
            raise ValueError(
                "The raw weights are no longer available: they were replaced "
                "after training (e.g. by EarlyStopping(restore_best_weights="
                "True))."
            )
        self.swap_out()
        try:
            yield self
        finally:
            if was_in:
                self.swap_in()

    def get_state(self):
        """The step count and shadow values (NumPy), as a dict."""
        self._check_started()
        self._flush()
        return {
            "steps": self.steps,
            "shadow": [
                keras.ops.convert_to_numpy(s.value) for s in self._shadows
            ],
        }

    def set_state(self, state):
        """Restores a state produced by `get_state` (after training began)."""
        self._check_started()
        self._flush()
        shadow = state["shadow"]
        if len(shadow) != len(self._shadows):
            raise ValueError(
                f"The state holds {len(shadow)} averaged weights but this "
                f"model has {len(self._shadows)}."
            )
        for variable, value in zip(self._shadows, shadow):
            if tuple(variable.shape) != tuple(np.shape(value)):
                raise ValueError(
                    f"Shape mismatch restoring the EMA shadow of "
                    f"{variable.path}: {tuple(variable.shape)} vs "
                    f"{tuple(np.shape(value))}."
                )
            variable.assign(value)
        self._updater.shadows_assigned()
        self._count.assign(int(state["steps"]))

    # Callback hooks --------------------------------------------------------
    def on_train_begin(self, logs=None):
        _shared.register(self, "ema")
        self._check_one_per_fit()
        # Before anything changes: a refused fit leaves the EMA as it was.
        self._check_steps_per_execution(fusable(self.model))
        self._end_interrupted_inference()
        if self._in_fit and self._averaged_in_model:
            # The previous fit was interrupted (an exception) while the
            # averaged weights were in: put its raw weights back first.
            self.swap_out()
        self._in_fit = True
        self._swapped_for_inference = False
        self._restored_by_early_stopping = False
        self._averaged_in_model = False
        self._epoch_view = False
        self._backup = None
        if self._updater is not None:
            self._updater.detach()
        self._build()
        self._updater.attach()
        self._check_steps_per_execution(self._updater.fused)
        self._pending = None
        self._step_pending = False
        self._backup_folder = _shared.backup_folder(self, self.backup_dir)
        if self._backup_folder is not None:
            self._pending = _shared.load_state(self._backup_folder,
                                               _STATE_NAME)
        self._pending_from_checkpoint = (
            self._pending is None and self.resume_from is not None
        )
        if self._pending_from_checkpoint:
            self._pending = _shared.load_checkpoint_state(
                self.resume_from, _STATE_NAME, "EMA")
        self._started = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:
            # After every callback's on_train_begin (BackupAndRestore loads
            # its weights and optimizer state there): s_0 = w_0, or the
            # saved state of an interrupted fit.
            self._started = True
            self._start(epoch)
        elif self._epoch_view:
            self._end_epoch_view()

    def on_train_batch_begin(self, batch, logs=None):
        # Folds in the previous optimizer step (see `Updater`).
        self._updater()
        self._step_pending = True

    def on_epoch_end(self, epoch, logs=None):
        # The epoch's last step, before an earlier callback's on_train_end
        # may train on (see `_flush`).
        self._flush()
        if self.validate_with_averaged and not self._averaged_in_model:
            # No validation ran this epoch: the epoch-end callbacks still
            # see the averaged weights (from here on in the list).
            self.swap_in()
            self._epoch_view = True
        if self._backup_folder is not None:
            self._save_state(self._backup_folder, epoch + 1)

    def on_test_begin(self, logs=None):
        self._end_interrupted_inference()
        self._swap_for_inference(
            self.validate_with_averaged if self._in_fit else True
        )

    def on_test_end(self, logs=None):
        if self._in_fit and getattr(self, "_swapped_for_inference", False):
            # Validation inside fit: keep the averaged weights in for the
            # epoch-end callbacks; they leave when the next epoch begins.
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
        self._flush()
        self._in_fit = False
        self._updater.detach()
        if self._epoch_view:
            self._epoch_view = False
            if self._averaged_in_model and not self._shadow_in_model():
                # Another callback replaced the weights after the epoch
                # ended (Keras's EarlyStopping restoring its best weights,
                # a second training phase): leave its weights alone.
                self._averaged_in_model = False
                self._backup = None
                self._restored_by_early_stopping = True
        if not self._started:
            # No epoch ran (a fit resumed past its last epoch, or one whose
            # epochs RetrainOnFullData skipped): the weights are not this
            # average's to replace.
            pass
        elif not self._restored_by_early_stopping:
            if self.keep_averaged:
                self.swap_in()
            else:
                self.swap_out()
        if self._backup_folder is not None:
            _shared.delete_state(self._backup_folder, _STATE_NAME)

    # Internals -------------------------------------------------------------
    def _save_state(self, folder, epoch):
        """Writes the shadow, the raw weights and the step count to `folder`
        (for a ``fit`` resumed at `epoch`), after a `_flush`."""
        if self._averaged_in_model and self._backup is not None:
            raw = [keras.ops.convert_to_numpy(v) for v in self._backup]
        else:
            raw = [keras.ops.convert_to_numpy(v.value) for v in self._targets]
        shadow = [keras.ops.convert_to_numpy(s.value) for s in self._shadows]
        _shared.save_state(
            folder, _STATE_NAME,
            {"steps": self.steps, "epoch": epoch, "num_shadow": len(shadow)},
            shadow + raw,
        )

    def _start(self, epoch):
        """Sets s_0 = w_0 (or an interrupted fit's state) before step 1."""
        self._flush()
        pending, self._pending = self._pending, None
        if pending is not None:
            numbers_, arrays = pending
            saved_epoch = numbers_.get("epoch")
            num_shadow = numbers_.get("num_shadow", len(arrays))
            if (saved_epoch is not None and saved_epoch != epoch
                    and not self._pending_from_checkpoint):
                warnings.warn(
                    f"EMA: the state in {self._backup_folder!r} was saved "
                    f"after epoch {saved_epoch} but training starts at epoch "
                    f"{epoch}; it is ignored and the average restarts from "
                    "the current weights (use BackupAndRestore with "
                    'save_freq="epoch").',
                    stacklevel=2,
                )
                pending = None
            elif num_shadow != len(self._shadows):
                raise ValueError(
                    f"The EMA state in {self._backup_folder!r} holds "
                    f"{num_shadow} averaged weights but this model has "
                    f"{len(self._shadows)}."
                )
        if pending is None:
            if epoch > 0:
                warnings.warn(
                    f"EMA: training starts at epoch {epoch} (resumed?) but no "
                    "saved EMA state was found; the average restarts from "
                    "the current weights. Use kreg.callbacks."
                    "BackupAndRestore (or pass `backup_dir=`) to resume it.",
                    stacklevel=2,
                )
            self._updater.restart()  # s_0 = w_0, from the current step
            return
        raw = arrays[num_shadow:]
        for target, value in zip(self._targets, raw):
            target.assign(value)
        self.set_state(
            {"steps": numbers_["steps"], "shadow": arrays[:num_shadow]}
        )
        # Only optimizer steps taken from here on are averaged (a restored
        # optimizer may have moved the iteration counter).
        self._last.assign(copy_value(self._updater.iterations.value))

    def _end_epoch_view(self):
        """The next epoch begins: the raw weights go back in."""
        self._epoch_view = False
        self.swap_out()

    def _values(self):
        return [v.value for v in self._targets + self._shadows]

    def _shadow_in_model(self):
        values = self._values()
        if (
            keras.backend.backend() == "jax"
            and len(values) == len(self._swapped_in)
            and all(a is b for a, b in zip(values, self._swapped_in))
        ):
            # JAX arrays are immutable: the very arrays swapped in are
            # still there (no comparison on the device, no host read).
            return True
        return self._updater.target_group.equals(self._updater.shadow_group)

    def _weights_restored_by_early_stopping(self):
        """EarlyStopping put the best (averaged) weights in: keep them."""
        self._restored_by_early_stopping = True
        self._averaged_in_model = False
        self._backup = None

    def _swap_for_inference(self, wanted):
        if wanted and self._shadows is not None and not self._shares_weights():
            raise ValueError(
                "This EMA averages the weights of the model it was fit "
                f"with ({self._built_for[0].name!r}), not those of "
                f"{self.model.name!r}: pass it to that model's "
                "`predict`/`evaluate`, or save the averaged model (e.g. "
                "inside `with ema.averaged_weights():`) and load that."
            )
        self._swapped_for_inference = (
            wanted and self._shadows is not None
            and not self._averaged_in_model
        )
        if self._swapped_for_inference:
            self.swap_in()

    def _shares_weights(self):
        """Whether `self.model` holds any weight this EMA averages (the
        model it was fit with, or one sharing its layers)."""
        if self.model is self._built_for[0]:
            return True
        ids = {id(v) for v in self.model.variables}
        return any(id(t) in ids for t in self._targets)

    def _end_interrupted_inference(self):
        """A `predict`/`evaluate` outside `fit` that raised never reached
        its end hook (Keras calls none after an exception): the raw
        weights it swapped out go back in before anything else."""
        if not self._in_fit:
            self._unswap_after_inference()

    def _unswap_after_inference(self):
        if getattr(self, "_swapped_for_inference", False):
            self.swap_out()
        self._swapped_for_inference = False

    def _flush(self):
        # Folds in the step of the last batch begun, once. Steps taken
        # after it by anything but this fit's batches (another fit, a
        # second training phase run from an earlier callback's
        # on_train_end, or after this fit) are not this average's.
        if self._updater is not None and self._in_fit:
            self._updater.flush(fold_in=self._step_pending)
            self._step_pending = False

    def _check_one_per_fit(self):
        emas = _shared.lookup_all(self, "ema")
        if len(emas) < 2:
            return
        # The others stop here too: nothing of theirs stays in the model's
        # train function.
        for other in emas:
            if other is not self and other._updater is not None:
                other._updater.detach()
                other._in_fit = False
        raise ValueError(
            "One kreg.callbacks.EMA per `fit`: they would swap their "
            "averaged weights in and out over each other (validation, "
            "checkpoints, the end of training). This fit has "
            f"{len(emas)}, with decays "
            f"{', '.join(str(e.decay) for e in emas)}."
        )

    def _check_steps_per_execution(self, fused):
        steps = getattr(self.model, "steps_per_execution", 1) or 1
        if steps == 1 or fused:
            return
        # Callbacks see one batch per `steps_per_execution` steps: only an
        # update inside the compiled step sees every optimizer step.
        if self._updater is not None:
            self._updater.detach()
        raise ValueError(
            "EMA with `steps_per_execution` > 1 updates the average inside "
            "the compiled train step, which needs TensorFlow, or JAX with "
            "`jit_compile=True`, and no distribution (a tf.distribute "
            "strategy or keras.distribution) nor `run_eagerly`. Here, "
            "compile with steps_per_execution=1. Received: "
            f"steps_per_execution={steps}"
        )

    def _check_started(self):
        if self._shadows is None:
            raise ValueError(
                "The EMA has no averaged weights yet: pass it to `model.fit` "
                "first (the shadow is created when training begins)."
            )

    def _build(self):
        targets = list(self.model.trainable_variables)
        if self.average_non_trainable:
            targets += [
                v for v in self.model.non_trainable_variables
                if "float" in str(v.dtype)
            ]
        if not targets:
            raise ValueError("EMA needs a model with trainable weights.")
        optimizer = self.model.optimizer
        if optimizer is None:
            raise ValueError("EMA needs a compiled model (an optimizer).")
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        iterations, accumulation = step_counter(optimizer)
        config = (self.decay, self.warmup, self.warmup_power, accumulation)
        same = (
            self._updater is not None
            and self._built_for == (self.model, optimizer, config)
            and len(targets) == len(self._targets)
            and all(a is b for a, b in zip(targets, self._targets))
        )
        if same:
            # Another fit of the same model: reuse the variables and the
            # compiled update (`_start` sets s_0 = w_0 before step 1).
            return
        self._targets = targets
        self._built_for = (self.model, optimizer, config)
        # s_0 = w_0.
        self._shadows = [
            keras.Variable(
                copy_value(v.value), dtype=v.dtype, trainable=False,
                name=f"ema_{v.name}",
            )
            for v in targets
        ]
        self._count = keras.Variable(0, dtype="int32", trainable=False,
                                     name="ema_count")
        self._last = keras.Variable(
            copy_value(iterations.value), dtype=iterations.dtype,
            trainable=False, name="ema_last_iteration",
        )
        self._updater = Updater(
            self.model, targets, self._shadows, self._count, self._last,
            config, iterations,
        )

    def get_config(self):
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_power": self.warmup_power,
            "validate_with_averaged": self.validate_with_averaged,
            "keep_averaged": self.keep_averaged,
            "average_non_trainable": self.average_non_trainable,
            "backup_dir": self.backup_dir,
            "resume_from": self.resume_from,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
