"""Exponential moving average (Polyak averaging) of the weights during fit."""

import contextlib
import warnings

import keras
import numpy as np

from kreg.callbacks import _shared
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

    The update is one compiled call per step on the shadow variables
    (``tf.function`` compiled with XLA on TensorFlow, ``jax.jit`` with buffer
    donation on JAX, fused in-place ``lerp`` on PyTorch), never a copy
    through NumPy.

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
      ``keep_averaged=False``). Saves made in the middle of an epoch
      (``save_freq=<int>``) hold the raw weights.
    - ``with ema.averaged_weights(): ...`` swaps the averaged weights in (for
      ``evaluate``, ``predict``, ``save``) and back out on exit. Passed as a
      callback to ``evaluate``/``predict`` it does the same for that call, and
      nothing is left swapped afterwards (Keras's ``SwapEMAWeights`` leaves
      the EMA weights in after ``predict``).
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
        self._backup = _copies([v.value for v in self._targets])
        averaged = _copies([s.value for s in self._shadows])
        for target, value in zip(self._targets, averaged):
            target.assign(value)
        self._averaged_in_model = True
        self._swapped_in = self._values()

    def swap_out(self):
        """Puts the raw weights back (no-op if they are in the model)."""
        if not self._averaged_in_model:
            return
        if self._backup is not None:
            for target, value in zip(self._targets, self._backup):
                target.assign(value)
        self._backup = None
        self._averaged_in_model = False

    @contextlib.contextmanager
    def averaged_weights(self):
        """Context manager: averaged weights inside, previous state after."""
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
        self._count.assign(int(state["steps"]))

    # Callback hooks --------------------------------------------------------
    def on_train_begin(self, logs=None):
        steps_per_execution = getattr(self.model, "steps_per_execution", 1)
        if steps_per_execution and steps_per_execution > 1:
            raise ValueError(
                "EMA updates the average once per optimizer step and needs "
                "`steps_per_execution=1` in `model.compile`. Received: "
                f"steps_per_execution={steps_per_execution}"
            )
        _shared.register(self, "ema")
        if self._in_fit and self._averaged_in_model:
            # The previous fit was interrupted (an exception) while the
            # averaged weights were in: put its raw weights back first.
            self.swap_out()
        self._in_fit = True
        self._restored_by_early_stopping = False
        self._averaged_in_model = False
        self._epoch_view = False
        self._backup = None
        if self._updater is not None:
            self._updater.detach()
        self._build()
        self._updater.attach()
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
        # Folds in the previous optimizer step (see `_Updater`).
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
        if pending is not None:
            raw = arrays[num_shadow:]
            for target, value in zip(self._targets, raw):
                target.assign(value)
            self.set_state(
                {"steps": numbers_["steps"], "shadow": arrays[:num_shadow]}
            )
        else:
            if epoch > 0:
                warnings.warn(
                    f"EMA: training starts at epoch {epoch} (resumed?) but no "
                    "saved EMA state was found; the average restarts from "
                    "the current weights. Use kreg.callbacks."
                    "BackupAndRestore (or pass `backup_dir=`) to resume it.",
                    stacklevel=2,
                )
            initial = _copies([t.value for t in self._targets])
            for shadow, value in zip(self._shadows, initial):
                shadow.assign(value)
            self._count.assign(0)
        # Only optimizer steps taken from here on are averaged (a restored
        # optimizer may have moved the iteration counter).
        self._last.assign(_copy(self.model.optimizer.iterations.value))

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
        ops = keras.ops
        equal = [ops.all(ops.equal(t.value, s.value))
                 for t, s in zip(self._targets, self._shadows)]
        return bool(ops.all(ops.stack(equal)))  # one read on the host

    def _weights_restored_by_early_stopping(self):
        """EarlyStopping put the best (averaged) weights in: keep them."""
        self._restored_by_early_stopping = True
        self._averaged_in_model = False
        self._backup = None

    def _swap_for_inference(self, wanted):
        self._swapped_for_inference = (
            wanted and self._shadows is not None
            and not self._averaged_in_model
        )
        if self._swapped_for_inference:
            self.swap_in()

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
        accumulation = int(
            getattr(optimizer, "gradient_accumulation_steps", None) or 1
        )
        config = (self.decay, self.warmup, self.warmup_power, accumulation)
        iterations = optimizer.iterations
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
                _copy(v.value), dtype=v.dtype, trainable=False,
                name=f"ema_{v.name}",
            )
            for v in targets
        ]
        self._count = keras.Variable(0, dtype="int32", trainable=False,
                                     name="ema_count")
        self._last = keras.Variable(
            _copy(iterations.value), dtype=iterations.dtype, trainable=False,
            name="ema_last_iteration",
        )
        self._updater = _Updater(
            self.model, targets, self._shadows, self._count, self._last,
            config,
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


def _copy(value):
    """A copy that owns its buffer (JAX train steps donate their inputs)."""
    return keras.ops.copy(value)


_JAX_COPIES = []


def _copies(values):
    """`_copy` of each value; on JAX one compiled call for all of them
    (an eager copy per weight is one dispatch each, at every swap)."""
    if keras.backend.backend() != "jax":
        return [_copy(v) for v in values]
    if not _JAX_COPIES:
        import jax
        import jax.numpy as jnp

        _JAX_COPIES.append(jax.jit(lambda xs: [jnp.copy(x) for x in xs]))
    return _JAX_COPIES[0](list(values))


_JAX_PACKING = {}


def _packed(values):
    """The values raveled into one new flat array (JAX, one compiled call)."""
    if "pack" not in _JAX_PACKING:
        import jax
        import jax.numpy as jnp

        _JAX_PACKING["pack"] = jax.jit(
            lambda xs: [jnp.concatenate([jnp.ravel(x) for x in xs])]
        )
    return _JAX_PACKING["pack"](list(values))


def _unpacked(packed, shapes):
    """Inverse of `_packed`: new arrays of the given shapes."""
    if "unpack" not in _JAX_PACKING:
        import jax

        def unpack(packed, shapes):
            flat, pieces, offset = packed[0], [], 0
            for shape in shapes:
                size = int(np.prod(shape))
                pieces.append(flat[offset:offset + size].reshape(shape))
                offset += size
            return pieces

        _JAX_PACKING["unpack"] = jax.jit(unpack, static_argnums=1)
    return _JAX_PACKING["unpack"](packed, tuple(shapes))


def _ema_math(shadows, weights, count, last, iteration, config):
    """One EMA step, skipped in-graph when no optimizer step happened.

    ``iteration`` is the optimizer's step counter now, ``last`` its value at
    the previous update. An update happens when it moved (and, with gradient
    accumulation over ``k`` batches, when it is a multiple of ``k``: the
    weights change only then). Returns new shadows, count and last.
    """
    decay, warmup, power, accumulation = config
    ops = keras.ops
    changed = ops.not_equal(iteration, last)
    if accumulation > 1:
        changed = ops.logical_and(
            changed, ops.equal(ops.mod(iteration, accumulation), 0)
        )
    count = count + ops.cast(changed, count.dtype)
    d = ops.convert_to_tensor(decay, "float32")
    if warmup:
        t = ops.maximum(ops.cast(count, "float32"), 1.0)
        d = ops.minimum(d, 1.0 - ops.power(t, -power))
    d = ops.where(changed, d, ops.ones_like(d))
    new = []
    for shadow, weight in zip(shadows, weights):
        ds = ops.cast(d, shadow.dtype)
        new.append(ds * shadow + (1.0 - ds) * ops.cast(weight, shadow.dtype))
    return new, count, iteration


class _Updater:
    """Runs the EMA update, fused into the train step where it can.

    Fused (`attach`; TensorFlow and JAX with a compiled train step, no
    distribution): the model's train function takes the optimizer step and
    the EMA step in one compiled program; calling the updater
    (``on_train_batch_begin``) arms the next step.

    Otherwise one compiled call per step: called before every train step
    and before the averaged weights are read (validation, swaps, state, end
    of training), it folds in the optimizer step just taken, if any. Doing
    it at the start of the next step instead of in ``on_train_batch_end``
    keeps Keras's asynchronous callback dispatch (a batch-end hook forces
    every step's logs to the host and serializes the loop).
    """

    def __init__(self, model, targets, shadows, count, last, config):
        self.model = model
        self.targets = targets
        self.shadows = shadows
        self.count = count
        self.last = last
        self.config = config
        self.iterations = model.optimizer.iterations
        self.backend = keras.backend.backend()
        self._fused = None  # (model, original, wrapper) while fused
        self._fused_cache = None  # (original train function, fused one)
        self._armed = False
        if self.backend == "tensorflow":
            import tensorflow as tf

            def update():
                new, count, last = _ema_math(
                    [s.value for s in shadows], [t.value for t in targets],
                    self.count.value, self.last.value,
                    self.iterations.value, config,
                )
                for shadow, value in zip(shadows, new):
                    shadow.assign(value)
                self.count.assign(count)
                self.last.assign(last)

            # XLA fuses the update into one pass over each weight (about 4x
            # faster on CPU than the unfused graph); without XLA (or where
            # it cannot compile, e.g. some distributed variables) the plain
            # graph is used.
            self._tf_update_body = update
            self._tf_plain = tf.function(update, autograph=False)
            self._tf_xla = tf.function(update, autograph=False,
                                       jit_compile=True)
            self._xla_errors = (tf.errors.OpError, NotImplementedError,
                                ValueError)
            self.update = self._tf_first_update
        elif self.backend == "jax":
            import jax

            self._packed = self._jax_pack_shadows()
            self._jitted = jax.jit(self._jax_math, donate_argnums=0)
            self._arrays = None
            self._index = self._state_index()
            self.update = self._jax_update
        elif self.backend == "torch":
            if self._torch_counter_on_host():
                self.update = self._torch_update
            else:
                self.update = self._torch_update_on_device
            self._torch_variables = (
                list(self.shadows) + list(self.targets)
                + [self.iterations, self.last, self.count]
            )
            self._torch_graphs = (
                self.update == self._torch_update_on_device
                and self._torch_cuda_graphs_available()
            )
            self._torch_graph = None  # (tensor addresses, CUDAGraph)
        else:
            self.update = self._eager_update

    # TensorFlow ---------------------------------------------------------
    def _tf_first_update(self):
        try:
            self._tf_xla()
            self.update = self._tf_xla
        except self._xla_errors:  # XLA unavailable or unable to compile.
            self.update = self._tf_plain
            self.update()

    # JAX ----------------------------------------------------------------
    def _state_index(self):
        model = self.model
        places = {}
        for key, variables in (
            ("trainable_variables", model.trainable_variables),
            ("non_trainable_variables", model.non_trainable_variables),
            ("optimizer_variables", model.optimizer.variables),
        ):
            for i, v in enumerate(variables):
                places.setdefault(id(v), (key, i))
        return (
            [places[id(t)] for t in self.targets],
            places.get(id(self.iterations)),
        )

    def _jax_current(self):
        # During fit the JAX trainer holds the newest state in `_jax_state`
        # and writes it into the variables only at the end of an epoch
        # (`jax_state_sync`, which costs a full write per call). Read it
        # there when the variables are stale.
        model = self.model
        state = getattr(model, "_jax_state", None)
        targets_index, iterations_index = self._index
        if (
            state and not getattr(model, "_jax_state_synced", True)
            and iterations_index is not None
        ):
            try:
                weights = [state[key][i] for key, i in targets_index]
                key, i = iterations_index
                return weights, state[key][i]
            except (KeyError, IndexError, TypeError):
                pass
        model.jax_state_sync()
        return [t.value for t in self.targets], self.iterations.value

    def _jax_pack_shadows(self):
        """Whether the shadow is kept in one flat buffer between flushes.

        Each array passed in and out of a jitted step costs host time per
        call; on a GPU, where a small model's step is bound by that host
        time, one buffer for all shadows instead of one per weight saves
        ~15 us per step (H100, the benchmark MLP). Not on the CPU: there
        XLA's concatenation is several times slower than the per-weight
        update. Needs one dtype for all shadows, and no distribution (a
        concatenation of sharded weights would gather them).
        """
        import jax

        dtypes = {str(s.dtype) for s in self.shadows}
        return (
            jax.default_backend() != "cpu" and len(self.shadows) > 1
            and len(dtypes) == 1
            and keras.distribution.distribution() is None
        )

    def _jax_math(self, shadows, weights, count, last, iteration):
        if self._packed:
            import jax.numpy as jnp

            dtype = shadows[0].dtype
            weights = [jnp.concatenate(
                [jnp.ravel(w).astype(dtype) for w in weights]
            )]
        return _ema_math(shadows, weights, count, last, iteration,
                         self.config)

    def _jax_update(self):
        weights, iteration = self._jax_current()
        if self._arrays is None:
            self._arrays = self._jax_arrays()
        shadows, count, last = self._arrays
        self._arrays = self._jitted(shadows, weights, count, last, iteration)

    def _jax_arrays(self):
        # Copies: the jitted update donates (reuses) its input buffers.
        values = [s.value for s in self.shadows]
        shadows = _packed(values) if self._packed else _copies(values)
        return shadows, _copy(self.count.value), _copy(self.last.value)

    def _jax_shadow_values(self, shadows):
        """The shadows of `_arrays`, one array per shadow variable."""
        if not self._packed:
            return shadows
        return _unpacked(shadows, [tuple(s.shape) for s in self.shadows])

    # Fused into the train step -------------------------------------------
    def attach(self):
        """Fuses the update into the model's compiled train step.

        One compiled program then takes the optimizer step and the EMA step:
        no second dispatch per batch, and XLA fuses the shadow update into
        the optimizer's pass over the weights. The model's `train_function`
        is replaced for this `fit` only (`detach` restores it); a step the
        EMA did not arm (`on_train_batch_begin`), or one in another fit
        (another `model.history`), runs the original function, so an
        interrupted fit leaves no EMA in later fits. Under a distribution
        (`tf.distribute`, `keras.distribution`), with JAX's `jit_compile=False`
        or NNX, and on PyTorch, the separate call per step is kept (on
        PyTorch with CUDA, replayed from a CUDA graph captured here).
        """
        if self.backend == "torch":
            self._torch_capture()
        model = self.model
        original = model.train_function
        if (
            original is None or model.run_eagerly
            or getattr(model, "history", None) is None
            or model.steps_per_execution != 1
        ):
            return
        if self.backend == "jax":
            fused = self._jax_fused_function(original)
        elif self.backend == "tensorflow":
            fused = self._tf_fused_function(original)
        else:
            fused = None
        if fused is None:
            return
        # This fit's History: a later fit (after an interrupted one that
        # left this wrapper in place) has another.
        fit_token = model.history

        def train_function(*args):
            if not self._armed or model.history is not fit_token:
                return original(*args)
            self._armed = False
            return fused(*args)

        model.train_function = train_function
        self._fused = (model, original, train_function)

    def detach(self):
        """Gives the model its own train function back."""
        if self._fused is None:
            return
        model, original, wrapper = self._fused
        if model.train_function is wrapper:
            model.train_function = original
        self._fused = None
        self._armed = False

    def _cached(self, original, build):
        # Compiled once per train function (a new `compile` makes a new
        # one), not once per fit.
        cache = self._fused_cache
        if cache is None or cache[0] is not original:
            cache = self._fused_cache = (original, build())
        return cache[1]

    def _jax_fused_function(self, original):
        model = self.model
        try:
            nnx = keras.config.is_nnx_enabled()
        except AttributeError:
            nnx = False
        targets_index, iterations_index = self._index
        if (
            not model.jit_compile or nnx
            or keras.distribution.distribution() is not None
            or iterations_index is None
            or iterations_index[0] != "optimizer_variables"
        ):
            return None
        import jax

        def step(state, arrays, data):
            logs, state = model.train_step(state, data)
            groups = {
                "trainable_variables": state[0],
                "non_trainable_variables": state[1],
                "optimizer_variables": state[2],
            }
            weights = [groups[key][i] for key, i in targets_index]
            iteration = state[2][iterations_index[1]]
            shadows, count, last = arrays
            return logs, state, self._jax_math(
                shadows, weights, count, last, iteration
            )

        jitted = self._cached(
            original, lambda: jax.jit(step, donate_argnums=(0, 1))
        )

        def fused(state, iterator):
            if self._arrays is None:
                self._arrays = self._jax_arrays()
            logs, state, self._arrays = jitted(
                state, self._arrays, next(iterator)
            )
            return logs, state

        return fused

    def _tf_fused_function(self, original):
        import tensorflow as tf

        model = self.model
        if (
            tf.distribute.has_strategy()
            or getattr(model, "_distribute_strategy", None) is not None
            or not hasattr(model, "_make_function")
        ):
            return None
        train_step = model.train_step
        update = self._tf_update_body

        def step(data):
            logs = train_step(data)
            update()  # after the optimizer step (variable reads are ordered)
            return logs

        # Keras builds the same function around the new step (XLA when
        # `jit_compile`): the EMA is part of the compiled train step.
        return self._cached(original, lambda: model._make_function(step))

    # PyTorch ------------------------------------------------------------
    def _torch_update(self):
        import torch

        decay, warmup, power, accumulation = self.config
        iteration = int(self.iterations.value)
        last = int(self.last.value)
        if iteration == last or iteration % accumulation:
            return
        count = int(self.count.value) + 1
        d = min(decay, 1.0 - count ** (-power)) if warmup else decay
        with torch.no_grad():
            # s <- s + (1 - d) * (w - s), fused and in place.
            torch._foreach_lerp_(
                [s.value for s in self.shadows],
                [t.value for t in self.targets],
                1.0 - d,
            )
        self.count.assign(count)
        self.last.assign(iteration)

    def _torch_counter_on_host(self):
        return self.iterations.value.device.type == "cpu"

    def _torch_cuda_graphs_available(self):
        device = self.iterations.value.device
        return device.type == "cuda" and all(
            t.value.device == device for t in self.targets + self.shadows
        )

    def _torch_update_on_device(self):
        """The update without reading the step counter on the host.

        On an accelerator `int(counter)` would wait for the step to finish
        (twice per step), stalling Keras's asynchronous loop: the decision
        "did the optimizer step?" becomes a weight of 0 instead of a branch.
        On CUDA the ~8 kernels are replayed from a CUDA graph captured when
        the fit begins (`attach`): one launch per step (the launches, not
        the arithmetic, are what an EMA costs there). The graph holds the
        tensors' addresses: if one moved, the kernels run uncaptured. It
        also keeps its own scratch buffers (one copy of the averaged
        weights) for as long as the EMA keeps this model.
        """
        if self._torch_graph is not None:
            addresses, graph = self._torch_graph
            if self._torch_addresses() == addresses:
                graph.replay()
                return
            self._torch_graph = None
        self._torch_device_step(*self._torch_tensors())

    def _torch_tensors(self):
        return (
            [s.value for s in self.shadows], [t.value for t in self.targets],
            self.iterations.value, self.last.value, self.count.value,
        )

    def _torch_addresses(self):
        # Keras's `Variable.value` costs microseconds (autocast checks);
        # its tensor is `_value` outside autocast scopes.
        addresses = []
        for v in self._torch_variables:
            tensor = getattr(v, "_value", None)
            addresses.append((v.value if tensor is None else tensor).data_ptr())
        return tuple(addresses)

    def _torch_capture(self):
        """Captures the update into a CUDA graph (once per fit at most)."""
        if not self._torch_graphs:
            return
        addresses = self._torch_addresses()
        if self._torch_graph is not None and (
            self._torch_graph[0] == addresses
        ):
            return
        tensors = self._torch_tensors()
        # A run before capturing initializes what the kernels need; at the
        # start of a fit no optimizer step is pending, so it changes nothing.
        self._torch_device_step(*tensors)
        try:
            graph = self._torch_record(
                lambda: self._torch_device_step(*tensors)
            )
        except RuntimeError:  # capture unsupported here: stay uncaptured
            self._torch_graphs = False
            self._torch_graph = None
            return
        self._torch_graph = (addresses, graph)

    @staticmethod
    def _torch_record(step):
        """A CUDA graph of `step`'s kernels (recorded, not run)."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
        return graph

    def _torch_device_step(self, shadows, targets, iteration, last, count):
        import torch

        decay, warmup, power, accumulation = self.config
        with torch.no_grad():
            changed = torch.ne(iteration, last)
            if accumulation > 1:
                changed = changed & torch.eq(iteration % accumulation, 0)
            count.add_(changed.to(count.dtype))
            if warmup:
                t = count.to(torch.float32).clamp(min=1.0)
                one_minus_d = torch.clamp(t.pow(-power), min=1.0 - decay)
                weight = one_minus_d * changed
            else:
                weight = changed * (1.0 - decay)
            # s <- s + (1 - d) * (w - s), in three multi-tensor kernels.
            steps = torch._foreach_sub(targets, shadows)
            torch._foreach_mul_(steps, weight)
            torch._foreach_add_(shadows, steps)
            last.copy_(iteration)

    def _eager_update(self):
        new, count, last = _ema_math(
            [s.value for s in self.shadows], [t.value for t in self.targets],
            self.count.value, self.last.value, self.iterations.value,
            self.config,
        )
        for shadow, value in zip(self.shadows, new):
            shadow.assign(value)
        self.count.assign(count)
        self.last.assign(last)

    def __call__(self):
        if self._fused is not None:
            # The train step itself updates the shadow; let it, once.
            self._armed = True
        else:
            self.update()

    def flush(self, fold_in=True):
        """Brings pending updates into the shadow variables; with
        `fold_in`, the optimizer step taken since the last update too."""
        if self._fused is None and fold_in:
            self.update()
        if self.backend == "jax" and self._arrays is not None:
            shadows, count, last = self._arrays
            shadows = self._jax_shadow_values(shadows)
            for shadow, value in zip(self.shadows, shadows):
                shadow.assign(value)
            self.count.assign(count)
            self.last.assign(last)
            self._arrays = None
