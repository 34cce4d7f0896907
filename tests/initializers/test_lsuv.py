import keras
import numpy as np
from sklearn.datasets import load_digits

import kreg
from kreg.testing import TestCase


def data(n=256, d=8, seed=0):
    return np.random.RandomState(seed).normal(size=(n, d)).astype("float32")


def numpy_pre_activations(model, x):
    """The output before the activation of every Dense layer (NumPy)."""
    h, found = x.astype("float64"), {}
    for layer in model.layers:
        kernel, bias = (keras.ops.convert_to_numpy(v).astype("float64")
                        for v in layer.weights)
        z = h @ kernel + bias
        found[layer.name] = z
        h = {"relu": lambda v: np.maximum(v, 0), "tanh": np.tanh,
             "linear": lambda v: v}[layer.activation.__name__](z)
    return found


class LSUVTest(TestCase):
    def test_unit_variance_on_held_out_batch(self):
        x, held_out = data(), data(seed=1)
        model = keras.Sequential(
            [keras.Input((8,))]
            + [keras.layers.Dense(32, activation=a, name=f"h{i}",
                                  bias_initializer=keras.initializers.Constant(
                                      0.01))
               for i, a in enumerate(["relu", "tanh", "relu", "relu"])]
            + [keras.layers.Dense(3, name="out")])
        biases = [keras.ops.convert_to_numpy(layer.bias)
                  for layer in model.layers]
        stds = kreg.initializers.lsuv(model, x, tol=0.05, seed=1)
        self.assertEqual(list(stds), ["h0", "h1", "h2", "h3", "out"])
        fitted = numpy_pre_activations(model, x)
        for name, z in fitted.items():
            self.assertLessEqual(abs(z.std() - 1), 0.05, name)
            self.assertAlmostEqual(stds[name], z.std(), places=4)
        for name, z in numpy_pre_activations(model, held_out).items():
            self.assertLessEqual(abs(z.std() - 1), 0.05 + 0.1, name)
        for layer, bias in zip(model.layers, biases):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(layer.bias), bias)
        # Orthonormal columns, rescaled: K^T K is diagonal.
        kernel = keras.ops.convert_to_numpy(model.layers[1].kernel)
        gram = kernel.T @ kernel
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0,
                                   atol=1e-4)

    def test_conv_nested_and_normalization(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(64, 10, 10, 3)).astype("float32")
        held_out = rng.normal(size=(64, 10, 10, 3)).astype("float32")
        inputs = keras.Input((10, 10, 3))
        h = keras.layers.Conv2D(8, 3, name="c1")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = keras.layers.Activation("relu")(h)
        block = keras.Model(inputs, h, name="block")
        model = keras.Sequential([
            keras.Input((10, 10, 3)), block,
            keras.layers.Conv2D(8, 3, name="c2"),
            keras.layers.Activation("relu"), keras.layers.Flatten(),
            keras.layers.Dense(4, name="out")])
        bn = [keras.ops.convert_to_numpy(v) for v in
              block.get_layer("bn").weights]
        stds = kreg.initializers.lsuv(model, x, tol=0.05)
        self.assertEqual(sorted(stds), ["c1", "c2", "out"])
        c1 = block.get_layer("c1")
        # Reference: Keras models over the same layers, run by Keras.
        probe = keras.Model(block.inputs, c1.output)
        self.assertLessEqual(
            abs(np.std(probe.predict(x, verbose=0)) - 1), 0.05)
        self.assertLessEqual(
            abs(np.std(probe.predict(held_out, verbose=0)) - 1), 0.15)
        for a, b in zip(bn, block.get_layer("bn").weights):
            np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))

    def test_deep_tanh_network_trains_after_lsuv(self):
        digits = load_digits()
        x = digits.data.astype("float32")
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        y = digits.target
        x_train, y_train, x_test, y_test = x[:600], y[:600], x[1000:], y[1000:]

        def accuracy(use_lsuv):
            keras.utils.set_random_seed(0)
            small = keras.initializers.RandomNormal(stddev=0.01)
            model = keras.Sequential(
                [keras.Input((64,))]
                + [keras.layers.Dense(32, activation="tanh",
                                      kernel_initializer=small)
                   for _ in range(10)]
                + [keras.layers.Dense(10, kernel_initializer=small)])
            if use_lsuv:
                kreg.initializers.lsuv(model, x_train, seed=0)
            model.compile(
                keras.optimizers.SGD(0.05, momentum=0.9),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
            model.fit(x_train, y_train, epochs=4, batch_size=32, verbose=0)
            return model.evaluate(x_test, y_test, verbose=0)[1]

        self.assertLess(accuracy(False), 0.3)
        self.assertGreater(accuracy(True), 0.8)

    def test_bad_arguments_change_nothing(self):
        x = data()
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        before = [keras.ops.convert_to_numpy(v) for v in model.weights]
        cases = [("tol", ValueError, {"tol": 0.0}),
                 ("tol", ValueError, {"tol": -1.0}),
                 ("max_iter", ValueError, {"max_iter": 0}),
                 ("max_iter", TypeError, {"max_iter": 1.5}),
                 ("x", ValueError, {"x": x[:, :3]})]
        for argument, error, kwargs in cases:
            arguments = {"x": x, **kwargs}
            with self.assertRaisesRegex(error, f"`{argument}`"):
                kreg.initializers.lsuv(model, **arguments)
        with self.assertRaisesRegex(ValueError, "`model`"):
            kreg.initializers.lsuv(keras.Sequential(
                [keras.layers.Dense(3)]), x)
        with self.assertRaisesRegex(ValueError, "`model`"):
            kreg.initializers.lsuv(keras.Sequential(
                [keras.Input((8,)), keras.layers.Flatten()]), x)
        for a, b in zip(before, model.weights):
            np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))
