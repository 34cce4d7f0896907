"""GradientMonitor: gradient health in the fit logs, with any optimizer."""

import math

import keras
import numpy as np

from kreg import _keras_private
from kreg.optimizers.clipped_optimizer import ClippedOptimizer
from kreg.optimizers.optimizer_wrapper import install_wrapper
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_integer
from kreg.utils.validation import check_number
from kreg.utils.warn import warn_user


def _value(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


@keras.saving.register_keras_serializable(package="kreg")
class GradientMonitor(keras.callbacks.Callback):
    """Puts gradient health into the `fit` logs and flags bad layers.

    Works with any optimizer. It reads the statistics that a
    `kreg.optimizers.ClippedOptimizer` keeps inside the compiled train step
    (no extra gradient computation): the model's own one if it has one,
    else a measuring one (``on_non_finite="apply"``, no clipping) that the
    callback puts around the model's optimizer once and leaves there, so
    that later fits reuse the compiled step; the optimizer's updates are
    unchanged.

    Epoch logs (seen by History, TensorBoard, and callbacks listed after
    this one): `grad_norm`, the mean pre-clip global gradient norm
    `G = sqrt(sum_i ||g_i||^2)` over the epoch's applied steps; with the
    model's own `ClippedOptimizer` also `clipped_steps` and
    `skipped_steps`, how many steps of the epoch were clipped or skipped
    (non-finite gradients). No batch-level logs: writing
    them needs `on_train_batch_end`, which makes Keras synchronise with the
    device after every step.

    Every `frequency` batches and at the end of each epoch it also computes
    the per-layer gradient norm
    `||g_layer|| = sqrt(sum over the layer's variables of ||g_v||^2)` and
    warns, naming the layer, when it is below `vanishing_threshold` (the
    vanishing-gradient problem), above `exploding_threshold` (exploding
    gradients) or non-finite. The warning is one line, issued once per
    layer and kind in a `fit` (the first time; epochs and steps counted
    from 1, as Keras's progress bar shows them) and attributed to the line
    of your code that called `fit`, so Python's warning filters apply to
    it; every flag is recorded in `flagged`, a list of
    `(epoch, batch, layer, kind, norm)` (once per layer and kind per
    epoch). The last per-layer norms are in `layer_norms`, all sampled ones
    in `history` (a list of `(epoch, batch, {layer: norm})`, batch `None`
    at the end of an epoch). In `flagged` and `history`, `epoch` and
    `batch` are Keras's callback indices (from 0).

    With `ClippedOptimizer(on_non_finite="raise")` this callback raises a
    `FloatingPointError` once a step was skipped (on TensorFlow checked at
    the start of every next batch: the in-graph check cannot raise there
    with `jit_compile=True`; elsewhere the optimizer raises itself).

    List it before `TensorBoard` in `callbacks`: Keras hands one epoch-end
    logs dict to the callbacks in list order, so a TensorBoard listed
    earlier writes the epoch before `grad_norm` is added (History always
    runs last and has it). In that order the callback warns when `fit`
    begins.

    Args:
        frequency: positive int, the number of batches between two
            per-layer samples. Defaults to `100`.
        vanishing_threshold: non-negative float; a layer whose gradient norm
            is below it is flagged. Defaults to `1e-7`.
        exploding_threshold: positive float; a layer whose gradient norm is
            above it is flagged (`float("inf")`: never). Defaults to `1e3`.
        warn: bool, whether to issue the warnings (the flags are still
            recorded in `flagged`). Defaults to `True`.

    Example:

    ```python
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    monitor = kreg.callbacks.GradientMonitor(frequency=10)
    history = model.fit(x, y, epochs=5, callbacks=[monitor])
    history.history["grad_norm"], monitor.layer_norms
    ```
    """

    def __init__(self, frequency=100, vanishing_threshold=1e-7,
                 exploding_threshold=1e3, warn=True):
        super().__init__()
        self.frequency = check_integer("frequency", frequency, low=1)
        self.vanishing_threshold = check_number(
            "vanishing_threshold", vanishing_threshold, low=0
        )
        # inf: never flag a layer as exploding.
        self.exploding_threshold = check_number(
            "exploding_threshold", exploding_threshold, low=0,
            low_inclusive=False, allow_inf=True,
        )
        if self.vanishing_threshold >= self.exploding_threshold:
            raise ValueError(
                "Invalid value received for argument `vanishing_threshold`. "
                "Expected a value below exploding_threshold="
                f"{self.exploding_threshold}. Received: vanishing_threshold="
                f"{self.vanishing_threshold}"
            )
        self.warn = check_bool("warn", warn)
        self.layer_norms = {}
        self.history = []
        self.flagged = []

    def get_config(self):
        return {
            "frequency": self.frequency,
            "vanishing_threshold": self.vanishing_threshold,
            "exploding_threshold": self.exploding_threshold,
            "warn": self.warn,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # Reading the optimizer -----------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        if getattr(model, "optimizer", None) is not None:
            # Before any on_train_begin (see kreg.callbacks.EMA).
            self._optimizer(model)

    @staticmethod
    def _optimizer(model):
        """The model's ClippedOptimizer, or a measuring one put around its
        optimizer."""
        return install_wrapper(
            model, ClippedOptimizer,
            lambda inner: ClippedOptimizer(inner, on_non_finite="apply"))

    def _counters(self):
        opt = self._clipped
        if not opt.built:
            return 0.0, 0, 0, 0
        return (
            float(_value(opt.grad_norm_sum)),
            int(_value(opt.clipped_steps)),
            int(_value(opt.skipped_steps)),
            int(_value(opt.seen_steps)),
        )

    # Callback hooks ---------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._clipped = self._optimizer(self.model)
        self._warned = set()
        self._check_order(_keras_private.calling_callback_list())
        self._layers = None
        self._batches_seen = 0
        # XLA drops TensorFlow's in-graph assertion: check every batch.
        self._check_every_batch = (
            self._clipped.on_non_finite == "raise"
            and keras.backend.backend() == "tensorflow"
        )
        self._raises = self._clipped.on_non_finite == "raise"

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self.model  # noqa: B018 (syncs JAX state before reading)
        self._start = self._counters()
        self._flagged_this_epoch = set()

    def on_train_batch_begin(self, batch, logs=None):
        # Sampling at the start of the next batch, not at the end of this
        # one: overriding `on_train_batch_end` would make Keras hand over
        # every step's logs synchronously (a device sync per step).
        if batch == 0:
            return  # the last step of the previous epoch was sampled
        self._batches_seen += 1
        sample = self._batches_seen % self.frequency == 0
        if not (sample or self._check_every_batch):
            return
        self.model  # noqa: B018 (syncs JAX state before reading)
        self._check_skipped(self._counters())
        if sample:
            self._sample_layers(batch - 1)

    def on_epoch_end(self, epoch, logs=None):
        self._batches_seen += 1
        self.model  # noqa: B018 (syncs JAX state before reading)
        counters = self._counters()
        self._check_skipped(counters)
        self._sample_layers(None)
        if logs is None:
            return
        clipped = counters[1] - self._start[1]
        skipped = counters[2] - self._start[2]
        applied = (counters[3] - self._start[3]) - skipped
        norm_sum = counters[0] - self._start[0]
        logs["grad_norm"] = norm_sum / applied if applied else math.nan
        if self._clipped.on_non_finite != "apply":
            logs["clipped_steps"] = clipped
            logs["skipped_steps"] = skipped

    # Helpers ----------------------------------------------------------------
    def _check_order(self, callback_list):
        """Warns when a TensorBoard precedes this callback: Keras passes the
        epoch-end logs to the callbacks in list order, so TensorBoard has
        written them before `grad_norm` is added."""
        if callback_list is None:
            return
        callbacks = list(getattr(callback_list, "callbacks", ()))
        if not any(c is self for c in callbacks):
            return
        before = callbacks[:next(i for i, c in enumerate(callbacks)
                                 if c is self)]
        if any(isinstance(c, keras.callbacks.TensorBoard) for c in before):
            keys = "grad_norm" + (
                ", clipped_steps, skipped_steps"
                if self._clipped.on_non_finite != "apply" else "")
            warn_user(
                "GradientMonitor is listed after TensorBoard in `callbacks`: "
                f"TensorBoard will not show {keys} (Keras gives the epoch's "
                "logs to the callbacks in list order). List GradientMonitor "
                "before TensorBoard."
            )

    def _check_skipped(self, counters):
        if self._raises and counters[2] > self._start[2]:
            raise FloatingPointError(
                "GradientMonitor: ClippedOptimizer(on_non_finite='raise') "
                "met a non-finite gradient (NaN or Inf) in epoch "
                f"{self._epoch + 1}; the step was not applied."
            )

    def _layer_index(self):
        """Groups the optimizer's variables by layer: name -> indices."""
        if self._layers is None:
            groups = {}
            for i, variable in enumerate(self._clipped.built_variables):
                path = getattr(variable, "path", variable.name)
                layer = path.rsplit("/", 1)[0] if "/" in path else path
                groups.setdefault(layer, []).append(i)
            self._layers = groups
        return self._layers

    def _sample_layers(self, batch):
        norms = _value(self._clipped.variable_grad_norms).astype("float64")
        # Only the layers training now (kreg.callbacks.FineTuning freezes
        # some for a while).
        trained = self._clipped.built_variables
        layer_norms = {
            layer: float(np.sqrt(np.sum(norms[indices] ** 2)))
            for layer, indices in self._layer_index().items()
            if any(trained[i].trainable for i in indices)
        }
        self.layer_norms = layer_norms
        self.history.append((self._epoch, batch, layer_norms))
        for layer, norm in layer_norms.items():
            if not math.isfinite(norm):
                kind = "non-finite"
                detail = f"gradient norm {norm}"
            elif norm < self.vanishing_threshold:
                kind = "vanishing"
                detail = (
                    f"gradient norm {norm:.3g} < vanishing_threshold="
                    f"{self.vanishing_threshold:g}"
                )
            elif norm > self.exploding_threshold:
                kind = "exploding"
                detail = (
                    f"gradient norm {norm:.3g} > exploding_threshold="
                    f"{self.exploding_threshold:g}"
                )
            else:
                continue
            key = (layer, kind)
            if key in self._flagged_this_epoch:
                continue
            self._flagged_this_epoch.add(key)
            self.flagged.append((self._epoch, batch, layer, kind, norm))
            if self.warn and key not in self._warned:
                self._warned.add(key)
                # 1-based, as Keras's progress bar shows epochs and steps.
                when = (
                    f"at the end of epoch {self._epoch + 1}" if batch is None
                    else f"in epoch {self._epoch + 1}, step {batch + 1}"
                )
                warn_user(
                    f"GradientMonitor: {kind} gradients in layer '{layer}' "
                    f"({detail}) {when}; once per fit (all flags in "
                    "`flagged`)."
                )
