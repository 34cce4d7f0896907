import keras
import numpy as np

from kreg.layers import Dropout
from kreg.layers import mc_predict
from kreg.layers import mc_sampling
from kreg.testing import TestCase
from tests.layers.helpers import assert_builds_as_keras


class DropoutTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x = np.random.RandomState(0).uniform(1.0, 2.0, (200, 500)).astype(
            "float32"
        )

    def test_inference_returns_input_exactly(self):
        layer = Dropout(0.5, seed=1)
        self.assertAllEqual(layer(self.x), self.x)
        self.assertAllEqual(layer(self.x, training=False), self.x)

    def test_dropped_fraction_and_scaling_match_rate(self):
        for rate in (0.2, 0.5):
            y = self.to_numpy(Dropout(rate, seed=2)(self.x, training=True))
            dropped = y == 0.0
            # 100,000 Bernoulli draws: the fraction's std is < 0.0016.
            self.assertAlmostEqual(dropped.mean(), rate, delta=0.01)
            self.assertAllClose(
                y[~dropped], self.x[~dropped] / (1.0 - rate), rtol=1e-6
            )
            # Inverted dropout keeps the expected activation.
            self.assertAlmostEqual(
                float(y.mean() / self.x.mean()), 1.0, delta=0.02
            )

    def test_same_masks_as_keras_dropout_with_the_same_seed(self):
        ours = Dropout(0.3, seed=5)(self.x, training=True)
        reference = keras.layers.Dropout(0.3, seed=5)(self.x, training=True)
        self.assertAllClose(ours, reference)

    def test_rate_zero_is_identity_in_training(self):
        self.assertAllEqual(Dropout(0.0)(self.x, training=True), self.x)

    def test_noise_shape_shares_mask_across_an_axis(self):
        x = np.ones((8, 6, 40), "float32")
        y = self.to_numpy(
            Dropout(0.5, noise_shape=(8, 1, 40), seed=3)(x, training=True)
        )
        self.assertTrue(np.all(y == y[:, :1, :]))
        self.assertTrue(0.3 < (y == 0).mean() < 0.7)

    def test_noise_shape_none_entries_take_the_input_size(self):
        x = np.ones((8, 6, 40), "float32")
        y = self.to_numpy(
            Dropout(0.5, noise_shape=(None, 1, None), seed=3)(x, training=True)
        )
        self.assertTrue(np.all(y == y[:, :1, :]))
        self.assertFalse(np.all(y == y[:1, :1, :]))

    def test_mc_mode_is_stochastic_inside_mc_sampling_only(self):
        model = keras.Sequential(
            [keras.Input((500,)), Dropout(0.5, mc=True, seed=4)]
        )
        model.compile(loss="mse")
        # Ordinary inference is the identity, before and after sampling.
        self.assertAllEqual(model.predict(self.x, verbose=0), self.x)
        with mc_sampling(model):
            first = self.to_numpy(model.predict(self.x, verbose=0))
            second = self.to_numpy(model.predict(self.x, verbose=0))
            mc_loss = model.evaluate(self.x, self.x, verbose=0)
        self.assertTrue(0.4 < (first == 0).mean() < 0.6)
        self.assertFalse(np.array_equal(first, second))
        # mse of x * mask / 0.5 against x: mean(x**2) (half 0, half 2x).
        self.assertAllClose(mc_loss, np.mean(self.x ** 2), rtol=0.02)
        self.assertAllEqual(model.predict(self.x, verbose=0), self.x)
        self.assertAllClose(model.evaluate(self.x, self.x, verbose=0), 0.0)

    def test_predict_evaluate_and_validation_are_deterministic(self):
        model = keras.Sequential([
            keras.Input((500,)), Dropout(0.5, mc=True, seed=4),
            keras.layers.Dense(1, kernel_initializer="ones"),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        y = self.x.sum(axis=1, keepdims=True)
        history = model.fit(self.x, y, validation_data=(self.x, y),
                            epochs=2, verbose=0)
        self.assertAllClose(history.history["val_loss"], [0.0, 0.0],
                            atol=1e-3)
        self.assertAllClose(model.evaluate(self.x, y, verbose=0), 0.0,
                            atol=1e-3)
        self.assertAllClose(model.predict(self.x, verbose=0), y, rtol=1e-5)
        mean, std = mc_predict(model, self.x[:4], num_samples=4)
        self.assertGreater(float(std.min()), 0.0)
        self.assertAllClose(model.predict(self.x, verbose=0), y, rtol=1e-5)

    def test_changing_mc_takes_effect_at_once(self):
        layer = Dropout(0.5, mc=True, seed=4)
        model = keras.Sequential([keras.Input((500,)), layer])
        mean, std = mc_predict(model, self.x[:4], num_samples=3)
        self.assertGreater(float(std.mean()), 0.5)
        layer.mc = False
        with self.assertRaisesRegex(ValueError, "mc=True"):
            mc_predict(model, self.x[:4], num_samples=3)
        layer.mc = True
        mean, std = mc_predict(model, self.x[:4], num_samples=3)
        self.assertGreater(float(std.mean()), 0.5)

    def test_symbolic_shape_and_mixed_float16(self):
        inputs = keras.Input((3, 5))
        self.assertEqual(tuple(Dropout(0.5)(inputs).shape), (None, 3, 5))
        with self.mixed_precision("mixed_float16"):
            layer = Dropout(0.5, seed=1)
            y = layer(keras.ops.cast(self.x, "float16"), training=True)
            self.assertEqual(
                keras.backend.standardize_dtype(y.dtype), "float16"
            )

    def test_config_save_load_and_compiled_fit(self):
        layer = Dropout(0.25, noise_shape=(None, 1), seed=9, mc=True)
        _, revived = self.run_config_round_trip(layer)
        self.assertTrue(revived.mc)
        self.assertEqual(revived.noise_shape, (None, 1))
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(8), Dropout(0.5, seed=1),
             keras.layers.Dense(1)]
        )
        x = np.random.RandomState(1).normal(size=(32, 4)).astype("float32")
        self.run_compiled_fit(model, x, x[:, :1])
        reloaded = self.run_save_load(model, x)
        self.assertIsInstance(reloaded.layers[1], Dropout)

    def test_bad_arguments(self):
        for rate in (1.0, 1.5, -0.1):
            with self.assertRaisesRegex(ValueError, rf"`rate`.*rate={rate}"):
                Dropout(rate)
        with self.assertRaisesRegex(TypeError, r"`rate`.*'0.5'"):
            Dropout("0.5")
        with self.assertRaisesRegex(TypeError, r"`noise_shape`.*'abc'"):
            Dropout(0.5, noise_shape="abc")
        with self.assertRaisesRegex(ValueError, r"`noise_shape`.*0"):
            Dropout(0.5, noise_shape=(0, 2))
        with self.assertRaisesRegex(ValueError, r"`seed`.*seed=-1"):
            Dropout(0.5, seed=-1)
        with self.assertRaisesRegex(TypeError, r"`mc`"):
            Dropout(0.5, mc="yes")
        with self.assertRaisesRegex(ValueError, "rank"):
            Dropout(0.5, noise_shape=(2, 1))(
                np.ones((2, 3, 4), "float32"), training=True
            )

    def test_numpy_integers_are_accepted(self):
        x = np.ones((8, 6, 40), "float32")
        layer = Dropout(np.int64(0), seed=np.int64(3))
        self.assertEqual(layer.get_config()["seed"], 3)
        self.assertAllEqual(layer(x, training=True), x)
        shaped = Dropout(0.5, noise_shape=(np.int64(8), np.int32(1), None),
                         seed=np.int64(3))
        reference = Dropout(0.5, noise_shape=(8, 1, None), seed=3)
        self.assertEqual(shaped.noise_shape, (8, 1, None))
        self.assertAllEqual(shaped(x, training=True),
                            reference(x, training=True))

    def test_a_subclass_build_is_called_as_for_keras_dropout(self):
        assert_builds_as_keras(self, Dropout, keras.layers.Dropout, self.x,
                               0.5)


class McPredictTest(TestCase):
    def test_mean_and_std_of_monte_carlo_passes(self):
        # One unit of value 1 behind dropout 0.5 is 2 or 0 with equal
        # probability: mean 1, standard deviation 1.
        model = keras.Sequential(
            [keras.Input((100,)), Dropout(0.5, mc=True, seed=0)]
        )
        x = np.ones((4, 100), "float32")
        mean, std = mc_predict(model, x, num_samples=64)
        self.assertEqual(mean.shape, (4, 100))
        self.assertEqual(std.shape, (4, 100))
        # 25,600 draws pooled: the errors are a few hundredths at most.
        self.assertAlmostEqual(float(mean.mean()), 1.0, delta=0.03)
        self.assertAlmostEqual(float(std.mean()), 1.0, delta=0.05)

    def test_other_layers_stay_in_inference_mode(self):
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(10),
                keras.layers.Dropout(0.9),  # plain dropout: inactive
                Dropout(0.2, mc=True, seed=1),
            ]
        )
        x = np.random.RandomState(2).normal(size=(8, 10)).astype("float32")
        mean, std = mc_predict(model, x, num_samples=100)
        deterministic = self.to_numpy(model.layers[0](x))
        self.assertAllClose(mean, deterministic, atol=0.35)
        self.assertGreater(float(std.mean()), 0.0)
        # In chunks of 3 rows: same shapes, every row still stochastic.
        mean, std = mc_predict(model, x, num_samples=5, batch_size=3)
        self.assertEqual(mean.shape, (8, 10))
        self.assertTrue(np.all(std.max(axis=1) > 0.0))

    def test_needs_an_mc_dropout_layer_and_enough_samples(self):
        model = keras.Sequential([keras.Input((3,)), Dropout(0.5)])
        with self.assertRaisesRegex(ValueError, "mc=True"):
            mc_predict(model, np.ones((2, 3)))
        model = keras.Sequential([keras.Input((3,)), Dropout(0.5, mc=True)])
        with self.assertRaisesRegex(ValueError, "num_samples=1"):
            mc_predict(model, np.ones((2, 3)), num_samples=1)

    def test_bad_batch_size_x_and_model_before_any_prediction(self):
        calls = []

        class Counting(keras.Sequential):
            def predict_on_batch(self, x):
                calls.append(x)
                return super().predict_on_batch(x)

        model = Counting([keras.Input((3,)), Dropout(0.5, mc=True)])
        x = np.ones((4, 3), "float32")
        for batch_size, error in ((0, ValueError), (-1, ValueError),
                                  (2.5, TypeError), ("a", TypeError),
                                  (True, TypeError)):
            with self.assertRaisesRegex(
                error, rf"`batch_size`.*batch_size={batch_size!r}"
            ):
                mc_predict(model, x, batch_size=batch_size)
        with self.assertRaisesRegex(TypeError, r"`x`.*x=None"):
            mc_predict(model, None)
        with self.assertRaisesRegex(TypeError, r"`x`.*x=\[None\]"):
            mc_predict(model, [None])
        with self.assertRaisesRegex(ValueError, r"`x`.*0 examples"):
            mc_predict(model, np.ones((0, 3), "float32"))
        with self.assertRaisesRegex(ValueError, r"`x`.*\[4, 3\]"):
            mc_predict(model, [x, x[:3]])
        with self.assertRaisesRegex(TypeError, r"`model`.*model='m'"):
            mc_predict("m", x)
        with self.assertRaisesRegex(TypeError, r"`num_samples`.*'5'"):
            mc_predict(model, x, num_samples="5")
        self.assertEqual(calls, [])

    def test_batches_from_a_dataset_or_an_iterable(self):
        model = keras.Sequential(
            [keras.Input((100,)), Dropout(0.5, mc=True, seed=0)]
        )
        x = np.ones((10, 100), "float32")
        y = np.zeros((10, 1), "float32")
        sources = {
            "generator of x": (b for b in (x[:4], x[4:8], x[8:])),
            "list-free iterator of (x, y)": iter(
                [(x[:6], y[:6]), (x[6:], y[6:])]),
        }
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            sources["tf.data x"] = tf.data.Dataset.from_tensor_slices(
                x).batch(4)
            sources["tf.data (x, y)"] = tf.data.Dataset.from_tensor_slices(
                (x, y)).batch(3)
        if keras.backend.backend() == "torch":
            import torch

            sources["DataLoader (x, y)"] = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.tensor(x),
                                               torch.tensor(y)),
                batch_size=4)
        for name, source in sources.items():
            mean, std = mc_predict(model, source, num_samples=32)
            self.assertEqual(mean.shape, (10, 100), name)
            self.assertAlmostEqual(float(mean.mean()), 1.0, delta=0.05,
                                   msg=name)
            self.assertAlmostEqual(float(std.mean()), 1.0, delta=0.07,
                                   msg=name)

    def test_batches_from_a_tf_data_dataset_on_any_backend(self):
        import tensorflow as tf

        model = keras.Sequential(
            [keras.Input((100,)), Dropout(0.5, mc=True, seed=0)]
        )
        x = np.ones((10, 100), "float32")
        dataset = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).batch(4)
        mean, std = mc_predict(model, dataset, num_samples=32)
        self.assertEqual(mean.shape, (10, 100))
        self.assertAlmostEqual(float(std.mean()), 1.0, delta=0.07)
        with self.assertRaisesRegex(ValueError, "`batch_size`.*=4"):
            mc_predict(model, dataset, batch_size=4)

    def test_numpy_integers_for_num_samples_and_batch_size(self):
        model = keras.Sequential([keras.Input((3,)), Dropout(0.5, mc=True)])
        x = np.ones((5, 3), "float32")
        mean, std = mc_predict(model, x, num_samples=np.int64(4),
                               batch_size=np.int64(2))
        self.assertEqual(mean.shape, (5, 3))
        self.assertEqual(std.shape, (5, 3))
