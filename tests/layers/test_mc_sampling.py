"""`mc_sampling` and `mc_predict` in the combinations of COMBINATIONS.md.

The reference model: ``Dropout(rate, mc=True)`` then ``Dense(1)`` with a
kernel of ones and no bias, on inputs ``x`` in [1, 2], targets
``y = sum_j x_j``. Deterministic inference gives ``y`` exactly (mse 0).
With rate 0.5 each unit becomes ``2 x_j`` or ``0``, so the error of one
sample is ``sum_j ±x_j`` with independent signs: its expected square is
``sum_j x_j**2``, and the expected mse of one sampled pass is the mean of
that over the samples.
"""

import os
import tempfile

import keras
import numpy as np

from kreg.layers import Dropout
from kreg.layers import mc_predict
from kreg.layers import mc_sampling
from kreg.testing import TestCase


def summing_model(features, rate=0.5, mc=True, seed=1):
    return keras.Sequential([
        keras.Input((features,)),
        Dropout(rate, mc=mc, seed=seed),
        keras.layers.Dense(1, use_bias=False, kernel_initializer="ones"),
    ])


def conv_valid(x, kernel, bias):
    """A stride-1 "valid" 2-D convolution (channels last), in NumPy."""
    x, kernel = x.astype("float64"), kernel.astype("float64")
    size = kernel.shape[0]
    rows, cols = x.shape[1] - size + 1, x.shape[2] - size + 1
    out = np.zeros((x.shape[0], rows, cols, kernel.shape[-1]))
    for i in range(rows):
        for j in range(cols):
            patch = x[:, i:i + size, j:j + size, :]
            out[:, i, j] = np.tensordot(patch, kernel, axes=3)
    return out + bias


def jit_settings():
    """`jit_compile` on and off where Keras compiles (TensorFlow, JAX);
    PyTorch's `jit_compile=True` is torch.compile, too slow here."""
    if keras.backend.backend() in ("tensorflow", "jax"):
        return (True, False)
    return (False,)


class McSamplingModesTest(TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(0)
        self.x = rng.uniform(1.0, 2.0, (256, 20)).astype("float32")
        self.y = self.x.sum(axis=1, keepdims=True)
        # The expected mse of one pass at rate 0.5 (see the module doc).
        self.mc_mse = float(np.mean(np.sum(self.x.astype("float64") ** 2,
                                           axis=1)))

    def evaluate(self, model):
        return model.evaluate(self.x, self.y, batch_size=256, verbose=0)

    def predicted_mse(self, model):
        prediction = self.to_numpy(model.predict_on_batch(self.x))
        return float(np.mean((prediction - self.y) ** 2))

    def assert_sampled(self, losses):
        """Each pass near the expected mse (256 samples: the mean's relative
        std is about 0.09), and no two passes equal."""
        for loss in losses:
            self.assertAllClose(loss, self.mc_mse, rtol=0.4)
        self.assertEqual(len(set(losses)), len(losses), losses)

    def assert_deterministic(self, model):
        self.assertAllClose(self.evaluate(model), 0.0, atol=1e-3)
        self.assertAllClose(self.predicted_mse(model), 0.0, atol=1e-3)

    def test_evaluate_and_predict_sample_after_an_earlier_evaluate(self):
        for jit_compile in jit_settings():
            with self.subTest(jit_compile=jit_compile):
                model = summing_model(20)
                model.compile(loss="mse", jit_compile=jit_compile)
                self.assert_deterministic(model)
                with mc_sampling(model):
                    self.assert_sampled([self.evaluate(model)
                                         for _ in range(2)])
                    self.assert_sampled([self.predicted_mse(model)
                                         for _ in range(2)])
                self.assert_deterministic(model)

    def test_evaluate_samples_after_validation_in_fit(self):
        model = summing_model(20)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        history = model.fit(self.x, self.y, epochs=1, batch_size=256,
                            validation_data=(self.x, self.y), verbose=0)
        self.assertAllClose(history.history["val_loss"], [0.0], atol=1e-3)
        with mc_sampling(model):
            self.assert_sampled([self.evaluate(model) for _ in range(2)])
        self.assertAllClose(self.evaluate(model), 0.0, atol=1e-3)

    def test_mc_switched_on_after_the_functions_were_traced(self):
        # A model used with mc=False, then switched to Monte-Carlo dropout:
        # its predict and test functions were traced without it.
        model = summing_model(20, mc=False)
        model.compile(loss="mse")
        self.assert_deterministic(model)
        model.layers[0].mc = True
        with mc_sampling(model):
            self.assert_sampled([self.evaluate(model) for _ in range(2)])
            self.assert_sampled([self.predicted_mse(model)
                                 for _ in range(2)])
        self.assert_deterministic(model)

    def test_sampling_ends_when_the_block_raises_and_nests(self):
        model = summing_model(20)
        model.compile(loss="mse")
        with self.assertRaisesRegex(RuntimeError, "inside"):
            with mc_sampling(model):
                self.evaluate(model)
                raise RuntimeError("inside")
        self.assert_deterministic(model)
        # The inner block's end leaves the outer one sampling.
        with mc_sampling(model):
            with mc_sampling(model):
                pass
            self.assert_sampled([self.evaluate(model) for _ in range(2)])
        self.assertAllClose(self.evaluate(model), 0.0, atol=1e-3)


class McPredictCombinationsTest(TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(0)
        self.x = rng.uniform(1.0, 2.0, (64, 20)).astype("float32")
        self.y = self.x.sum(axis=1, keepdims=True)
        # Per sample, the variance of one pass at rate 0.5.
        self.variance = np.sum(self.x.astype("float64") ** 2, axis=1,
                               keepdims=True)

    def assert_passes_match(self, mean, std, num_samples):
        """The mean of the passes within 5 standard errors of the
        deterministic output; the spread near the variance (pooled)."""
        bound = 5 * np.sqrt(self.variance / num_samples)
        self.assertTrue(np.all(np.abs(mean - self.y) < bound))
        self.assertAllClose(np.mean(std ** 2), np.mean(self.variance),
                            rtol=0.15)

    def test_predict_before_and_after_with_jit_compile(self):
        for jit_compile in jit_settings():
            with self.subTest(jit_compile=jit_compile):
                model = summing_model(20)
                model.compile(loss="mse", jit_compile=jit_compile)
                self.assertAllClose(model.predict_on_batch(self.x),
                                    self.y, rtol=1e-5)
                mean, std = mc_predict(model, self.x, num_samples=50)
                self.assert_passes_match(mean, std, 50)
                self.assertAllClose(model.predict_on_batch(self.x),
                                    self.y, rtol=1e-5)

    def test_dropped_fraction_and_scale_inside_mc_sampling(self):
        x = np.random.RandomState(1).uniform(1.0, 2.0, (200, 500)).astype(
            "float32")
        model = keras.Sequential([keras.Input((500,)),
                                  Dropout(0.3, mc=True, seed=3)])
        with mc_sampling(model):
            y = self.to_numpy(model.predict_on_batch(x))
        dropped = y == 0.0
        # 100,000 Bernoulli draws: the fraction's std is about 0.0015.
        self.assertAlmostEqual(float(dropped.mean()), 0.3, delta=0.01)
        self.assertAllClose(y[~dropped], x[~dropped] / 0.7, rtol=1e-6)
        self.assertAllEqual(model.predict_on_batch(x), x)

    def test_nested_conv_model_with_two_outputs(self):
        rng = np.random.RandomState(2)
        inner = keras.Sequential([
            keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3),
            Dropout(0.5, mc=True, seed=2), keras.layers.Flatten()],
            name="inner")
        inputs = keras.Input((6, 6, 1))
        features = inner(inputs)
        heads = [keras.layers.Dense(2, name="a"),
                 keras.layers.Dense(1, name="b")]
        model = keras.Model(inputs, [head(features) for head in heads])
        x = rng.normal(size=(5, 6, 6, 1)).astype("float32")
        num_samples = 64
        mean, std = mc_predict(model, x, num_samples=num_samples)
        self.assertIsInstance(mean, list)
        # Reference: each head is linear in the dropped features h * m / 0.5
        # (m ~ Bernoulli(0.5)): mean W h + b, variance sum_k (W_k h_k)^2.
        h = conv_valid(x, *inner.layers[0].get_weights()).reshape(5, -1)
        for head, m, s in zip(heads, mean, std):
            kernel, bias = (self.to_numpy(w).astype("float64")
                            for w in head.get_weights())
            expected_mean = h @ kernel + bias
            expected_std = np.sqrt((h ** 2) @ (kernel ** 2))
            self.assertEqual(m.shape, expected_mean.shape)
            self.assertTrue(np.all(np.abs(m - expected_mean)
                                   < 5 * expected_std
                                   / np.sqrt(num_samples)))
            # 64 passes: the std estimate's relative error is about 0.09.
            self.assertAllClose(s, expected_std, rtol=0.35)
        deterministic = model.predict_on_batch(x)
        for output, head in zip(deterministic, heads):
            kernel, bias = head.get_weights()
            self.assertAllClose(output, h @ kernel + bias, rtol=1e-4,
                                atol=1e-4)

    def test_saved_and_reloaded_model_still_samples(self):
        model = summing_model(20)
        model.compile(loss="mse")
        # The switch is no weight: Keras's Dropout model has the same ones.
        keras_model = keras.Sequential([
            keras.Input((20,)), keras.layers.Dropout(0.5),
            keras.layers.Dense(1, use_bias=False,
                               kernel_initializer="zeros")])
        keras_model.set_weights(model.get_weights())
        model.set_weights(keras_model.get_weights())
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "mc.keras")
            with mc_sampling(model):  # saved while sampling
                model.save(path)
            reloaded = keras.models.load_model(path)
        self.assertTrue(reloaded.layers[0].mc)
        self.assertAllClose(reloaded.predict_on_batch(self.x), self.y,
                            rtol=1e-5)
        mean, std = mc_predict(reloaded, self.x, num_samples=50)
        self.assert_passes_match(mean, std, 50)
        self.assertAllClose(reloaded.predict_on_batch(self.x), self.y,
                            rtol=1e-5)

    def test_tf_data_and_py_dataset_inside_mc_sampling(self):
        import tensorflow as tf

        class Batches(keras.utils.PyDataset):
            def __init__(self, x, y):
                super().__init__()
                self.x, self.y = x, y

            def __len__(self):
                return 2

            def __getitem__(self, index):
                part = slice(32 * index, 32 * (index + 1))
                return self.x[part], self.y[part]

        model = summing_model(20)
        model.compile(loss="mse")
        sources = {
            "tf.data": tf.data.Dataset.from_tensor_slices(
                (self.x, self.y)).batch(32),
            "PyDataset": Batches(self.x, self.y),
        }
        for name, source in sources.items():
            with self.subTest(name):
                with mc_sampling(model):
                    losses = [model.evaluate(source, verbose=0)
                              for _ in range(2)]
                self.assertNotEqual(losses[0], losses[1])
                self.assertAllClose(np.mean(losses), np.mean(self.variance),
                                    rtol=0.5)
        mean, std = mc_predict(model, sources["PyDataset"], num_samples=50)
        self.assert_passes_match(mean, std, 50)

    def test_inputs_that_do_not_fit_leave_sampling_off(self):
        model = summing_model(20)
        with self.assertRaises(ValueError):
            mc_predict(model, np.ones((4, 7), "float32"), num_samples=3)
        self.assertAllClose(model.predict_on_batch(self.x), self.y,
                            rtol=1e-5)
