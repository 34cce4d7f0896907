import keras
import numpy as np

from kreg.layers import GaussianNoise
from kreg.testing import TestCase
from tests.layers.helpers import assert_builds_as_keras


class GaussianNoiseTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x = np.random.RandomState(0).normal(5.0, 1.0, (400, 250)).astype(
            "float32"
        )

    def test_inference_returns_input_exactly(self):
        layer = GaussianNoise(0.5, seed=1)
        self.assertAllEqual(layer(self.x), self.x)
        self.assertAllEqual(layer(self.x, training=False), self.x)

    def test_noise_mean_and_std_match(self):
        for stddev in (0.1, 3.0):
            y = self.to_numpy(GaussianNoise(stddev, seed=2)(self.x,
                                                            training=True))
            noise = y - self.x
            # 100,000 draws: the mean's std is stddev/316, the std's is
            # stddev/447; the tolerances are about 5 of those.
            self.assertAlmostEqual(float(noise.mean()), 0.0,
                                   delta=0.02 * stddev)
            self.assertAlmostEqual(float(noise.std()), stddev,
                                   delta=0.015 * stddev)

    def test_same_noise_as_keras_with_the_same_seed(self):
        ours = GaussianNoise(0.3, seed=5)(self.x, training=True)
        reference = keras.layers.GaussianNoise(0.3, seed=5)(self.x,
                                                            training=True)
        self.assertAllClose(ours, reference)

    def test_zero_stddev_is_identity_in_training(self):
        self.assertAllEqual(GaussianNoise(0.0)(self.x, training=True), self.x)

    def test_mixed_float16_output(self):
        with self.mixed_precision("mixed_float16"):
            y = GaussianNoise(0.1, seed=1)(
                keras.ops.cast(self.x, "float16"), training=True
            )
            self.assertEqual(
                keras.backend.standardize_dtype(y.dtype), "float16"
            )

    def test_config_save_load_and_compiled_fit(self):
        _, revived = self.run_config_round_trip(GaussianNoise(2.5, seed=3))
        self.assertEqual(revived.stddev, 2.5)
        model = keras.Sequential(
            [keras.Input((4,)), GaussianNoise(0.1, seed=1),
             keras.layers.Dense(1)]
        )
        x = np.random.RandomState(1).normal(size=(32, 4)).astype("float32")
        self.run_compiled_fit(model, x, x[:, :1])
        self.run_save_load(model, x)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, r"`stddev`.*stddev=-0.1"):
            GaussianNoise(-0.1)
        with self.assertRaisesRegex(TypeError, r"`stddev`.*None"):
            GaussianNoise(None)
        with self.assertRaisesRegex(TypeError, r"`seed`.*'1'"):
            GaussianNoise(0.1, seed="1")
        for stddev in (float("inf"), float("-inf"), float("nan")):
            with self.assertRaisesRegex(ValueError,
                                        rf"`stddev`.*stddev={stddev}"):
                GaussianNoise(stddev)

    def test_numpy_integers_are_accepted(self):
        layer = GaussianNoise(np.int64(2), seed=np.int64(5))
        self.assertEqual(layer.get_config()["seed"], 5)
        self.assertAllEqual(layer(self.x, training=True),
                            GaussianNoise(2.0, seed=5)(self.x, training=True))

    def test_a_subclass_build_is_called_as_for_keras_gaussian_noise(self):
        assert_builds_as_keras(self, GaussianNoise,
                               keras.layers.GaussianNoise, self.x, 0.5)
