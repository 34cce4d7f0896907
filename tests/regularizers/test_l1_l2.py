import keras
import numpy as np
from absl.testing import parameterized

from kreg.regularizers import L1
from kreg.regularizers import L1L2
from kreg.regularizers import L2
from kreg.testing import TestCase
from tests.regularizers.helpers import value_and_grad

W = np.array([[0.5, -2.0, 0.0], [3.0, -0.25, 1.5]], dtype="float32")


class ValueAndGradientTest(TestCase):
    def test_l1_value_and_gradient(self):
        value, grad = value_and_grad(L1(0.3), W)
        self.assertAllClose(value, 0.3 * np.abs(W).sum(), atol=1e-6)
        nonzero = W != 0
        self.assertAllClose(grad[nonzero], 0.3 * np.sign(W)[nonzero])

    def test_l2_is_the_lecture_tikhonov_form(self):
        value, grad = value_and_grad(L2(0.3), W)
        self.assertAllClose(value, 0.3 * 0.5 * (W**2).sum(), atol=1e-6)
        self.assertAllClose(grad, 0.3 * W, atol=1e-6)  # alpha * w

    def test_l1l2_is_the_sum(self):
        value, grad = value_and_grad(L1L2(l1=0.2, l2=0.7), W)
        self.assertAllClose(
            value, 0.2 * np.abs(W).sum() + 0.35 * (W**2).sum(), atol=1e-5
        )
        nonzero = W != 0
        self.assertAllClose(
            grad[nonzero], (0.2 * np.sign(W) + 0.7 * W)[nonzero], atol=1e-6
        )

    def test_keras_relation(self):
        for a in (0.0, 0.01, 0.4, 3.0):
            self.assertAllClose(
                L2(a)(W), keras.regularizers.L2(a / 2)(W), atol=1e-6
            )
            self.assertAllClose(
                L1(a)(W), keras.regularizers.L1(a)(W), atol=1e-6
            )
            self.assertAllClose(
                L1L2(a, a)(W), keras.regularizers.L1L2(a, a / 2)(W),
                atol=1e-5,
            )

    def test_zero_strength_gives_zero(self):
        self.assertAllClose(L1L2()(W), 0.0)
        self.assertAllClose(L2(0.0)(W), 0.0)

    def test_dense_losses_and_sgd_step_equal_weight_decay(self):
        # One SGD step on a loss that is the penalty alone: w <- w - lr*l2*w,
        # i.e. PyTorch's weight_decay=l2.
        layer = keras.layers.Dense(
            3, use_bias=False, kernel_regularizer=L2(0.5),
            kernel_initializer=keras.initializers.Constant(W),
        )
        model = keras.Sequential([keras.Input((2,)), layer])
        self.assertAllClose(
            keras.ops.sum(model.losses), 0.25 * (W**2).sum(), atol=1e-5
        )
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        x = np.zeros((4, 2), "float32")
        model.fit(x, np.zeros((4, 3), "float32"), epochs=1, batch_size=4,
                  verbose=0)
        self.assertAllClose(layer.kernel, W * (1 - 0.1 * 0.5), atol=1e-6)


class ArgumentsTest(TestCase, parameterized.TestCase):
    @parameterized.parameters(
        (L1, "l1"), (L2, "l2"), (lambda v: L1L2(l1=v), "l1"),
        (lambda v: L1L2(l2=v), "l2"),
    )
    def test_bad_strengths(self, cls, name):
        for bad in (-0.1, float("nan"), float("inf")):
            with self.assertRaisesRegex(ValueError, f"`{name}`.*{name}="):
                cls(bad)
        for bad in ("0.1", True, None):
            with self.assertRaisesRegex(TypeError, f"`{name}`"):
                cls(bad)

    def test_config_round_trip(self):
        for obj in (L1(0.3), L2(0.25), L1L2(0.1, 0.2)):
            _, revived = self.run_config_round_trip(obj)
            self.assertAllClose(revived(W), obj(W))

    def test_save_load_in_a_model(self):
        model = keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(3, kernel_regularizer=L2(0.3),
                               bias_regularizer=L1(0.2)),
            keras.layers.Dense(2, kernel_regularizer=L1L2(0.1, 0.4)),
        ])
        x = np.random.RandomState(0).normal(size=(5, 4)).astype("float32")
        reloaded = self.run_save_load(model, x)
        self.assertIsInstance(reloaded.layers[0].kernel_regularizer, L2)
        self.assertIsInstance(reloaded.layers[1].kernel_regularizer, L1L2)
        self.assertAllClose(
            keras.ops.sum(reloaded.losses), keras.ops.sum(model.losses),
            atol=1e-6,
        )

    def test_compiled_fit(self):
        model = keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu",
                               kernel_regularizer=L1L2(1e-3, 1e-2)),
            keras.layers.Dense(1, kernel_regularizer=L2(1e-2)),
        ])
        x = np.random.RandomState(0).normal(size=(16, 4)).astype("float32")
        self.run_compiled_fit(model, x, x[:, :1])
