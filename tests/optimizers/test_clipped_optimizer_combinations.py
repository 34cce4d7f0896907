"""ClippedOptimizer in the combinations of COMBINATIONS.md: non-default
loss reductions, sample and class weights and a learning-rate schedule in
a compiled fit (against Keras's own clipping) and adaptive clipping of a
Conv kernel in a nested model (against NumPy). A fit resumed after an
interruption: tests/layers/test_layers_combinations.py."""

import keras
import numpy as np
from absl.testing import parameterized

from kreg.optimizers import ClippedOptimizer
from kreg.testing import TestCase
from tests.optimizers.test_clipped_optimizer import np_agc


def _data(n=24):
    rng = np.random.RandomState(0)
    x = rng.randn(n, 3).astype("float32")
    y = rng.randn(n, 2).astype("float32")
    return x, y, rng.uniform(0.1, 2.0, n).astype("float32")


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(2)])


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)


class SameStepAsKerasTest(TestCase, parameterized.TestCase):
    @parameterized.parameters(
        ("sum", "global_clipnorm", 0.3, "sample_weight"),
        ("mean_with_sample_weight", "clipvalue", 0.05, "sample_weight"),
        ("sum", "clipnorm", 0.3, "class_weight"),
    )
    def test_same_weights_as_keras_clipping(self, reduction, clip, bound,
                                            weighting):
        # The bound applies to the gradient of the loss as reduced (a sum
        # gives a gradient batch-size times a mean's), at the rate of the
        # schedule at each step: as Keras's own `clipnorm` etc. do.
        x, y, weights = _data()
        if weighting == "sample_weight":
            fit_kwargs = {"sample_weight": weights}
        else:
            y = (y[:, :1] > 0).astype("float32")
            fit_kwargs = {"class_weight": {0: 0.3, 1: 3.0}}
        results = []
        for ours in (True, False):
            if ours:
                opt = ClippedOptimizer(keras.optimizers.SGD(
                    _schedule(), momentum=0.5), **{clip: bound})
            else:
                opt = keras.optimizers.SGD(_schedule(), momentum=0.5,
                                           **{clip: bound})
            model = _model()
            model.compile(opt,
                          keras.losses.MeanSquaredError(reduction=reduction),
                          jit_compile=self.jit_compile_setting()
                          if clip == "global_clipnorm" else "auto")
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                      **fit_kwargs)
            if ours:
                clipped = int(self.to_numpy(opt.clipped_steps))
            results.append(model.get_weights())
        self.assertGreater(clipped, 0)
        for a, b in zip(*results):
            self.assertAllClose(a, b, atol=1e-6)


class AdaptiveClippingConvTest(TestCase):
    def test_agc_of_a_conv_kernel_in_a_nested_model(self):
        # SGD(1) takes the step -g: a plain model's first step gives the
        # gradient; the wrapped model's step is -agc(g) (NumPy).
        rng = np.random.RandomState(1)
        x = rng.randn(4, 6, 6, 2).astype("float32")
        y = rng.randn(4, 3).astype("float32")

        def model():
            keras.utils.set_random_seed(5)
            features = keras.Sequential([
                keras.Input((6, 6, 2)), keras.layers.Rescaling(2.0),
                keras.layers.Conv2D(3, 3, activation="relu"),
                keras.layers.GlobalAveragePooling2D()], name="features")
            inputs = keras.Input((6, 6, 2))
            return keras.Model(inputs, keras.layers.Dense(3)(
                features(inputs)))

        steps = []
        for opt in (keras.optimizers.SGD(1.0),
                    ClippedOptimizer(keras.optimizers.SGD(1.0),
                                     agc_factor=0.05)):
            m = model()
            initial = [self.to_numpy(v) for v in m.trainable_variables]
            m.compile(opt, keras.losses.MeanSquaredError(reduction="sum"))
            m.fit(x, y, batch_size=4, epochs=1, verbose=0)
            steps.append([w0 - self.to_numpy(v) for w0, v in
                          zip(initial, m.trainable_variables)])
        grads, clipped = steps
        self.assertEqual(grads[0].ndim, 4)  # the Conv kernel
        expected = np_agc(grads, initial, 0.05, 1e-3)
        self.assertFalse(np.allclose(expected[0], grads[0]))
        for a, b in zip(clipped, expected):
            self.assertAllClose(a, b, atol=1e-5, rtol=1e-4)
