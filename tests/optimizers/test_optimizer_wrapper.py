"""OptimizerWrapper: `stateless_apply`, which JAX's train step calls, gives
the step of `apply` for each of kreg's wrappers, for wrappers around
wrappers, for skipped steps and for frozen weights."""

import unittest

import keras
import numpy as np
from absl.testing import parameterized

from kreg.optimizers import AveragingOptimizer
from kreg.optimizers import ClippedOptimizer
from kreg.optimizers import FineTuningOptimizer
from kreg.testing import TestCase

_WRAPPERS = {
    "clipped": lambda: ClippedOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9), clipnorm=0.5),
    "clipped_loss_scale": lambda: ClippedOptimizer(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
        global_clipnorm=0.5),
    "averaging": lambda: AveragingOptimizer(keras.optimizers.Adam(0.01)),
    "averaging_clipped": lambda: AveragingOptimizer(ClippedOptimizer(
        keras.optimizers.Adam(0.01), clipvalue=0.2)),
    "fine_tuning": lambda: FineTuningOptimizer(
        keras.optimizers.Adam(0.01), [0], base_learning_rate_factor=0.5),
    "averaging_fine_tuning": lambda: AveragingOptimizer(FineTuningOptimizer(
        keras.optimizers.Adam(0.01, global_clipnorm=1.0), [0])),
}


@unittest.skipUnless(keras.backend.backend() == "jax",
                     "stateless_apply is JAX's train step")
class StatelessApplyTest(TestCase, parameterized.TestCase):
    @parameterized.parameters(
        [(name, False) for name in _WRAPPERS]
        + [(name, True) for name in _WRAPPERS if "fine_tuning" in name])
    def test_same_step_as_apply(self, name, frozen):
        # `frozen`: a weight it was built with is not trainable (as in a
        # FineTuning stage), and not passed.
        rng = np.random.RandomState(0)
        weights = [keras.Variable(rng.randn(*shape).astype("float32"))
                   for shape in ((3, 2), (2,), (2, 2))]
        optimizer = _WRAPPERS[name]()
        optimizer.build(weights)
        if isinstance(optimizer, AveragingOptimizer):
            optimizer.configure(True, 0.8, 0.5)
        if frozen:
            weights[1].trainable = False
        trained = optimizer.trained_variables()
        for step in range(4):
            grads = [rng.randn(*v.shape).astype("float32") for v in trained]
            if step == 2 and "clipped" in name:
                grads[0][0, 0] = np.nan  # a skipped step
            grads = [keras.ops.convert_to_tensor(g) for g in grads]
            new_weights, new_state = optimizer.stateless_apply(
                [v.value for v in optimizer.variables], grads,
                [v.value for v in trained])
            optimizer.apply(grads, trained)
            self.assertEqual(len(new_weights), len(trained))
            self.assertEqual(len(new_state), len(optimizer.variables))
            for value, variable in zip(new_weights + new_state,
                                       trained + optimizer.variables):
                self.assertAllClose(value, variable, rtol=1e-6, atol=1e-6)
        self.assertEqual(int(keras.ops.convert_to_numpy(
            optimizer.iterations)), 3 if "clipped" in name else 4)

    def test_needs_a_built_optimizer(self):
        optimizer = ClippedOptimizer(keras.optimizers.SGD())
        with self.assertRaisesRegex(ValueError, "must be built"):
            optimizer.stateless_apply([], [], [])


if __name__ == "__main__":
    unittest.main()
