"""AveragingOptimizer: the per-step update of `kreg.callbacks.EMA`."""

import keras
import numpy as np
from keras import ops

from kreg.optimizers.optimizer_wrapper import OptimizerWrapper
from kreg.optimizers.optimizer_wrapper import set_untracked
from kreg.utils.distribute import in_tf_strategy


@keras.saving.register_keras_serializable(package="kreg")
class AveragingOptimizer(OptimizerWrapper):
    """Keeps an exponential moving average of the weights it updates.

    After every step of the inner optimizer that changes the weights (its
    `iterations` moves: not a step skipped by a `LossScaleOptimizer` or a
    `ClippedOptimizer`, nor an accumulating step), while averaging is on::

        s_t = s_{t-1} - (1 - d_t) * (s_{t-1} - w_t)

    with ``d_t = decay`` or, with a warm-up power ``p > 0``,
    ``d_t = min(decay, 1 - t ** -p)`` (``t`` counts the averaged steps).
    The shadows (`shadows`), the step count (`count`) and the settings
    (`configure`: on/off, decay, warm-up) are optimizer variables, so one
    compiled train step serves every fit. `kreg.callbacks.EMA` installs it
    (``docs/callbacks.md``).

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap.
        name: optional name. Defaults to `None`.
    """

    def build_own(self, var_list):
        # The XLA-compiled shadow updates on TensorFlow, by shadows.
        set_untracked(self, _xla_updates={})
        self.shadows = [
            self.add_variable(
                shape=v.shape, dtype=v.dtype, initializer="zeros",
                aggregation="only_first_replica", name="average",
            )
            for v in var_list
        ]
        self.count = self.add_variable(
            shape=(), dtype="int32", initializer="zeros",
            aggregation="only_first_replica", name="averaged_steps",
        )
        # [averaging on (1) or off (0), decay, warm-up power (0: none)]
        self.settings = self.add_variable(
            shape=(3,), dtype="float32", initializer="zeros",
            aggregation="only_first_replica", name="average_settings",
        )

    def configure(self, active, decay=0.0, warmup_power=0.0):
        """Switches averaging on (with a decay and warm-up power) or off."""
        self.settings.assign(
            np.array([float(active), decay, warmup_power], "float32"))

    def finalize_variable_values(self, var_list):
        # The end of a fit (on JAX also an interrupted one): no averaging
        # of a later fit's steps unless its EMA switches it on again.
        self.configure(False)
        super().finalize_variable_values(var_list)

    def _rate(self, stepped):
        """``1 - d_t`` (0 for a step not averaged), and the new count."""
        active, decay, power = (self.settings[i] for i in range(3))
        go = ops.logical_and(stepped, ops.greater(active, 0.0))
        count = self.count + ops.cast(go, "int32")
        t = ops.cast(ops.maximum(count, 1), "float32")
        warm = ops.minimum(decay, 1.0 - ops.power(t, -power))
        decay = ops.where(ops.greater(power, 0.0), warm, decay)
        return ops.where(go, 1.0 - decay, 0.0), count

    def after_inner_step(self, variables, weights, stepped):
        """Averages `weights` (the new values of `variables`) into their
        shadows when the inner optimizer `stepped`."""
        rate, count = self._rate(stepped)
        shadows = [self.shadows[i] for i in self.positions(variables)]
        weights = [getattr(w, "value", w) for w in weights]
        backend = keras.backend.backend()
        if backend == "torch":
            import torch

            with torch.no_grad():
                torch._foreach_lerp_([s.value for s in shadows], weights,
                                     rate)
        elif backend == "tensorflow" and not in_tf_strategy():
            # One XLA cluster for all shadows (Keras compiles the train step
            # of many models without XLA on TensorFlow).
            key = tuple(id(s) for s in shadows)
            if key not in self._xla_updates:
                self._xla_updates[key] = _xla_update(shadows)
            self._xla_updates[key](weights, rate)
        else:
            for shadow, w in zip(shadows, weights):
                s = shadow.value
                shadow.assign_sub(ops.cast(rate, s.dtype) * (s - w))
        self.count.assign(count)


def _xla_update(shadows):
    """``s -= rate * (s - w)`` for every shadow, in one XLA-compiled
    TensorFlow function."""
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False)
    def update(weights, rate):
        for shadow, w in zip(shadows, weights):
            s = shadow.value
            s.assign_sub(tf.cast(rate, s.dtype) * (s - w))

    return update
