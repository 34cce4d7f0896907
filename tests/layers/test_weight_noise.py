import keras
import numpy as np

from kreg.layers.weight_noise import WeightNoise
from kreg.testing import TestCase


class WeightNoiseTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x = np.random.RandomState(0).normal(size=(4, 5)).astype(
            "float32"
        )

    def test_inference_is_the_unwrapped_layer(self):
        dense = keras.layers.Dense(3, bias_initializer="ones")
        wrapped = WeightNoise(dense, stddev=0.5, seed=1)
        y = wrapped(self.x)
        self.assertAllEqual(y, dense(self.x))
        self.assertAllEqual(wrapped(self.x, training=False), dense(self.x))

    def test_training_noise_has_the_stated_spread_and_spares_the_bias(self):
        units, stddev = 4000, 0.2
        dense = keras.layers.Dense(units, bias_initializer="ones")
        wrapped = WeightNoise(dense, stddev=stddev, seed=3)
        x = self.x[:1]
        clean = self.to_numpy(dense(x))
        kernel_before = self.to_numpy(dense.kernel)
        first = self.to_numpy(wrapped(x, training=True))
        second = self.to_numpy(wrapped(x, training=True))
        self.assertFalse(np.allclose(first, second))
        # Output noise of unit j: sum_i x_i N_ij ~ N(0, stddev^2 ||x||^2).
        expected = stddev * np.linalg.norm(x)
        for y in (first, second):
            diff = (y - clean)[0]
            self.assertAllClose(diff.std(), expected, rtol=0.05)
            self.assertLess(abs(diff.mean()), 4 * expected / np.sqrt(units))
        # Stored weights untouched; bias gets no noise (x = 0 gives b).
        self.assertAllEqual(dense.kernel, kernel_before)
        zero = wrapped(np.zeros((2, 5), "float32"), training=True)
        self.assertAllEqual(zero, np.ones((2, units)))

    def test_zero_stddev_is_the_layer(self):
        dense = keras.layers.Dense(3)
        wrapped = WeightNoise(dense, stddev=0.0)
        self.assertAllEqual(wrapped(self.x, training=True), dense(self.x))

    def test_conv_layer_and_shapes(self):
        conv = keras.layers.Conv2D(2, 3, padding="same")
        wrapped = WeightNoise(conv, stddev=0.1, seed=0)
        x = np.random.RandomState(1).normal(size=(2, 6, 6, 3)).astype(
            "float32"
        )
        self.assertEqual(wrapped(x, training=True).shape, (2, 6, 6, 2))
        self.assertAllEqual(wrapped(x), conv(x))
        symbolic = WeightNoise(keras.layers.Conv2D(2, 3), stddev=0.1)(
            keras.Input((6, 6, 3))
        )
        self.assertEqual(tuple(symbolic.shape), (None, 4, 4, 2))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "`stddev`.*stddev=-1"):
            WeightNoise(keras.layers.Dense(2), stddev=-1.0)
        with self.assertRaisesRegex(TypeError, "`stddev`"):
            WeightNoise(keras.layers.Dense(2), stddev="0.1")
        with self.assertRaisesRegex(ValueError, "`seed`"):
            WeightNoise(keras.layers.Dense(2), stddev=0.1, seed=-1)
        with self.assertRaisesRegex(TypeError, "`layer`"):
            WeightNoise("dense", stddev=0.1)
        for stddev in (float("inf"), float("nan")):
            with self.assertRaisesRegex(ValueError,
                                        rf"`stddev`.*stddev={stddev}"):
                WeightNoise(keras.layers.Dense(2), stddev=stddev)
        with self.assertRaisesRegex(ValueError, "`layer`.*kernel"):
            WeightNoise(keras.layers.BatchNormalization(), stddev=0.1)(
                self.x
            )

    def test_numpy_integers_are_accepted(self):
        dense = keras.layers.Dense(3)
        dense.build((None, 5))
        ours = WeightNoise(dense, stddev=np.int64(1), seed=np.int64(4))
        reference = WeightNoise(dense, stddev=1.0, seed=4)
        self.assertEqual(ours.get_config()["seed"], 4)
        self.assertAllEqual(ours(self.x, training=True),
                            reference(self.x, training=True))

    def test_a_subclass_build_is_called(self):
        class WithBuild(WeightNoise):
            def build(self, input_shape=None):
                self.build_shapes = getattr(self, "build_shapes", [])
                self.build_shapes.append(tuple(input_shape))
                super().build(input_shape)

        for built_beforehand in (False, True):
            dense = keras.layers.Dense(3)
            if built_beforehand:
                dense.build((None, 5))
            layer = WithBuild(dense, stddev=0.1, seed=0)
            self.assertFalse(layer.built)
            layer(self.x, training=True)
            layer(self.x, training=True)
            self.assertTrue(layer.built)
            self.assertEqual(layer.build_shapes, [self.x.shape])

    def test_config_and_save_load(self):
        wrapped = WeightNoise(keras.layers.Dense(3), stddev=0.3, seed=7,
                              name="noisy")
        revived, _ = self.run_config_round_trip(wrapped)
        self.assertEqual(revived.stddev, 0.3)
        model = keras.Sequential([
            keras.Input((5,)), wrapped, keras.layers.Dense(1),
        ])
        reloaded = self.run_save_load(model, self.x)
        self.assertIsInstance(reloaded.get_layer("noisy"), WeightNoise)

    def test_compiled_fit_trains_the_kernel(self):
        keras.utils.set_random_seed(0)
        dense = keras.layers.Dense(8, activation="tanh")
        model = keras.Sequential([
            keras.Input((5,)),
            WeightNoise(dense, stddev=0.05, seed=2),
            keras.layers.Dense(1),
        ])
        before = self.to_numpy(dense.kernel)
        x = np.random.RandomState(0).normal(size=(32, 5)).astype("float32")
        self.run_compiled_fit(model, x, x[:, :1], epochs=3)
        self.assertFalse(np.allclose(self.to_numpy(dense.kernel), before))

    def test_mixed_float16(self):
        with self.mixed_precision("mixed_float16"):
            dense = keras.layers.Dense(3)
            wrapped = WeightNoise(dense, stddev=0.1, seed=0)
            y = wrapped(self.x, training=True)
            self.assertEqual(self.to_numpy(y).dtype, np.float16)
            self.assertEqual(dense.kernel.dtype, "float32")
            model = keras.Sequential([keras.Input((5,)), wrapped,
                                      keras.layers.Dense(1)])
            self.run_compiled_fit(model, self.x, self.x[:, :1])
