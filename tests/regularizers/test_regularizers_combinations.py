"""kreg's regularizers in the combinations of COMBINATIONS.md: on a layer
inside a nested model and used twice (counted once), under non-default
loss reductions with sample weights, compiled, and under a distribution.

The reference is the model without the penalty: one SGD step of the
regularized model differs from it by exactly the learning rate times the
penalty's gradient (NumPy), whatever the loss's reduction."""

import contextlib

import keras
import numpy as np
from absl.testing import parameterized

from kreg.regularizers import L1
from kreg.regularizers import L2
from kreg.regularizers import ParameterSharing
from kreg.testing import TestCase
from kreg.testing import jax_data_parallel
from kreg.testing import mirrored_strategy

RATE = 0.1
ANCHOR = np.linspace(-1.0, 1.0, 12).reshape(3, 4).astype("float32")


def _penalties():
    """name -> (kernel regularizer, bias regularizer, d penalty / d w)."""
    return {
        "l1_l2": (L2(0.5), L1(0.3),
                  lambda kernel, bias: (0.5 * kernel, 0.3 * np.sign(bias))),
        "parameter_sharing": (
            ParameterSharing(0.2, ANCHOR), None,
            lambda kernel, bias: (0.4 * (kernel - ANCHOR),
                                  np.zeros_like(bias))),
    }


def _model(kernel_regularizer, bias_regularizer):
    """Rescaling -> a nested Sequential holding the regularized Dense ->
    the same Dense again (shared) -> Dense."""
    keras.utils.set_random_seed(4)
    dense = keras.layers.Dense(
        4, activation="tanh", bias_initializer=keras.initializers.Constant(
            [0.5, -0.5, 0.2, -0.1]),
        kernel_regularizer=kernel_regularizer,
        bias_regularizer=bias_regularizer, name="shared")
    sub = keras.Sequential([keras.Input((3,)), dense], name="sub")
    inputs = keras.Input((3,))
    scaled = keras.layers.Rescaling(0.5)(inputs)
    first = sub(scaled)
    again = dense(keras.layers.Dense(3, name="back")(first))
    return keras.Model(inputs, keras.layers.Dense(2)(again))


class CountedOnceTest(TestCase, parameterized.TestCase):
    @parameterized.product(penalty=["l1_l2", "parameter_sharing"],
                           reduction=["sum", "mean_with_sample_weight"])
    def test_step_differs_by_the_penalty_gradient_once(self, penalty,
                                                       reduction):
        self._check(penalty, reduction, contextlib.nullcontext,
                    jit=self.jit_compile_setting() if penalty == "l1_l2"
                    and reduction == "sum" else "auto")

    def test_under_a_distribution(self):
        if keras.backend.backend() == "tensorflow":
            self._check("l1_l2", "sum", lambda: mirrored_strategy().scope(),
                        jit=False)
        elif keras.backend.backend() == "jax":
            self._check("l1_l2", "sum", jax_data_parallel, jit=True)
        else:
            self.skipTest("no distribution on this backend's CPU")

    def _check(self, penalty, reduction, scope, jit):
        rng = np.random.RandomState(0)
        x = rng.randn(16, 3).astype("float32")
        y = rng.randn(16, 2).astype("float32")
        weights = rng.uniform(0.2, 2.0, 16).astype("float32")
        kernel_reg, bias_reg, gradient = _penalties()[penalty]
        steps = []
        for regularized in (True, False):
            with scope():
                model = _model(*((kernel_reg, bias_reg) if regularized
                                 else (None, None)))
                model.compile(
                    keras.optimizers.SGD(RATE),
                    keras.losses.MeanSquaredError(reduction=reduction),
                    jit_compile=jit)
            dense = model.get_layer("sub").get_layer("shared")
            initial = [self.to_numpy(dense.kernel), self.to_numpy(dense.bias)]
            if regularized:
                expected_penalty = (
                    float(self.to_numpy(kernel_reg(initial[0])))
                    + (0.0 if bias_reg is None
                       else float(self.to_numpy(bias_reg(initial[1])))))
                self.assertAllClose(
                    sum(float(self.to_numpy(v)) for v in model.losses),
                    expected_penalty, rtol=1e-6)
            model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                      verbose=0, sample_weight=weights)
            steps.append([self.to_numpy(dense.kernel),
                          self.to_numpy(dense.bias)])
        for with_penalty, without, grad in zip(
                steps[0], steps[1], gradient(*initial)):
            self.assertAllClose(without - with_penalty, RATE * grad,
                                atol=1e-6)
