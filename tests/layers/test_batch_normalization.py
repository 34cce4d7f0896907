import keras
import numpy as np
import pytest

from kreg.layers import BatchNormalization
from kreg.testing import TestCase
from kreg.testing import jax_data_parallel
from kreg.testing import mirrored_strategy

BACKEND = keras.backend.backend()


def numpy_batch_norm(x, axes, gamma=1.0, beta=0.0, epsilon=1e-3):
    """The seed's formulas, with biased variance over `axes`."""
    mean = x.mean(axis=axes, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return gamma * (x - mean) / np.sqrt(variance + epsilon) + beta


class SeedExamplesTest(TestCase):
    def test_notebook_numpy_example_gamma_2_beta_1(self):
        # Notebook cell 4: x = [10, 20, 30, 40], np.std (no epsilon),
        # gamma = 2, beta = 1.
        x = np.array([[10.0], [20.0], [30.0], [40.0]], dtype="float32")
        layer = BatchNormalization(
            epsilon=1e-12,
            gamma_initializer=keras.initializers.Constant(2.0),
            beta_initializer=keras.initializers.Constant(1.0),
        )
        y = self.to_numpy(layer(x, training=True))[:, 0]
        self.assertAllClose(
            y, [-1.68328157, 0.10557281, 1.89442719, 3.68328157], atol=1e-5
        )
        x_hat = self.to_numpy(
            BatchNormalization(epsilon=1e-12, center=False, scale=False)(
                x, training=True
            )
        )[:, 0]
        self.assertAllClose(
            x_hat, [-1.34164079, -0.4472136, 0.4472136, 1.34164079], atol=1e-5
        )

    def test_notebook_pytorch_example_4x3(self):
        # Notebook cell 5: nn.BatchNorm1d(3) (epsilon 1e-5) in training mode.
        x = np.array(
            [[10, 20, 30], [15, 25, 35], [20, 30, 40], [25, 35, 45]],
            dtype="float32",
        )
        y = self.to_numpy(BatchNormalization(epsilon=1e-5)(x, training=True))
        column = np.array([-1.3416, -0.4472, 0.4472, 1.3416])
        self.assertAllClose(y, np.stack([column] * 3, axis=1), atol=1e-4)


class BatchNormalizationMathTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x = np.random.RandomState(0).normal(3.0, 2.0, (16, 5)).astype(
            "float32"
        )

    def test_training_output_and_moving_statistics(self):
        layer = BatchNormalization(momentum=0.9)
        y = layer(self.x, training=True)
        self.assertAllClose(y, numpy_batch_norm(self.x, 0), atol=1e-5)
        mean = self.x.mean(0)
        variance = self.x.var(0)  # biased, as the seed's sigma_B^2
        self.assertAllClose(layer.moving_mean, 0.1 * mean, atol=1e-6)
        self.assertAllClose(
            layer.moving_variance, 0.9 * 1.0 + 0.1 * variance, atol=1e-5
        )

    def test_inference_uses_moving_statistics(self):
        layer = BatchNormalization()
        layer.build(self.x.shape)
        mm = np.linspace(-1, 1, 5).astype("float32")
        mv = np.linspace(0.5, 2, 5).astype("float32")
        gamma = np.linspace(1, 3, 5).astype("float32")
        beta = np.linspace(-2, 2, 5).astype("float32")
        layer.set_weights([gamma, beta, mm, mv])
        y = layer(self.x, training=False)
        expected = gamma * (self.x - mm) / np.sqrt(mv + 1e-3) + beta
        self.assertAllClose(y, expected, atol=1e-5)
        # Inference does not touch the moving statistics.
        self.assertAllClose(layer.moving_mean, mm)

    def test_frozen_layer_runs_in_inference_mode(self):
        layer = BatchNormalization()
        layer.build(self.x.shape)
        layer.trainable = False
        y = layer(self.x, training=True)
        self.assertAllClose(y, self.x / np.sqrt(1.0 + 1e-3), atol=1e-5)
        self.assertAllClose(layer.moving_mean, np.zeros(5))

    def test_channels_first_axis_1(self):
        x = np.random.RandomState(1).normal(size=(4, 3, 5, 6)).astype(
            "float32"
        )
        layer = BatchNormalization(axis=1)
        y = layer(x, training=True)
        self.assertEqual(tuple(layer.gamma.shape), (3,))
        self.assertAllClose(y, numpy_batch_norm(x, (0, 2, 3)), atol=1e-5)
        self.assertAllClose(
            layer.moving_mean, 0.01 * x.mean(axis=(0, 2, 3)), atol=1e-6
        )

    def test_several_axes(self):
        x = np.random.RandomState(2).normal(size=(8, 3, 4, 2)).astype(
            "float32"
        )
        layer = BatchNormalization(axis=[1, -1])
        y = layer(x, training=True)
        self.assertEqual(tuple(layer.gamma.shape), (3, 2))
        self.assertAllClose(y, numpy_batch_norm(x, (0, 2)), atol=1e-5)
        inference = layer(x, training=False)
        mm = 0.01 * x.mean(axis=(0, 2))
        mv = 0.99 + 0.01 * x.var(axis=(0, 2))
        expected = (x - mm[:, None, :]) / np.sqrt(mv[:, None, :] + 1e-3)
        self.assertAllClose(inference, expected, atol=1e-5)

    def test_mask_excludes_padded_steps_from_statistics(self):
        x = np.random.RandomState(3).normal(size=(4, 6, 3)).astype("float32")
        mask = np.ones((4, 6), dtype=bool)
        mask[:, 4:] = False
        x[~mask] = 1000.0  # padding that must not count
        layer = BatchNormalization(epsilon=1e-3)
        y = self.to_numpy(layer(x, training=True, mask=mask))
        valid = x[mask]  # (n, 3)
        expected = (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-3)
        self.assertAllClose(y[mask], expected, atol=1e-4)
        self.assertAllClose(layer.moving_mean, 0.01 * valid.mean(0), atol=1e-5)

    def test_mask_from_embedding_in_a_model(self):
        tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]])
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Embedding(10, 4, mask_zero=True),
                BatchNormalization(),
            ]
        )
        self.assertEqual(tuple(model(tokens, training=True).shape), (2, 5, 4))

    def test_symbolic_output_shape_and_dtype(self):
        inputs = keras.Input((7, 3))
        outputs = BatchNormalization(axis=1)(inputs)
        self.assertEqual(tuple(outputs.shape), (None, 7, 3))
        self.assertEqual(outputs.dtype, "float32")

    def test_weights_transfer_from_keras_in_keras_order(self):
        reference = keras.layers.BatchNormalization()
        reference(self.x, training=True)
        layer = BatchNormalization()
        layer.build(self.x.shape)
        layer.set_weights(reference.get_weights())
        self.assertEqual(
            [w.name for w in layer.weights],
            ["gamma", "beta", "moving_mean", "moving_variance"],
        )
        self.assertEqual(
            [w.name for w in layer.non_trainable_weights],
            ["moving_mean", "moving_variance"],
        )
        self.assertAllClose(
            layer(self.x, training=False),
            reference(self.x, training=False),
            atol=1e-6,
        )

    def test_center_and_scale_off(self):
        layer = BatchNormalization(center=False, scale=False)
        layer(self.x, training=True)
        self.assertEqual(
            [w.name for w in layer.weights], ["moving_mean", "moving_variance"]
        )


class MatchesKerasThroughFitTest(TestCase):
    def build(self, bn_class):
        keras.utils.set_random_seed(7)
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8),
                bn_class(momentum=0.8),
                keras.layers.Activation("relu"),
                keras.layers.Dense(1),
            ]
        )

    def test_same_outputs_statistics_and_weights_after_fit(self):
        rng = np.random.RandomState(4)
        x = rng.normal(2.0, 3.0, (64, 6)).astype("float32")
        y = (x @ rng.normal(size=(6, 1))).astype("float32")
        ours = self.build(BatchNormalization)
        reference = self.build(keras.layers.BatchNormalization)
        ours.set_weights(reference.get_weights())
        for model in (ours, reference):
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
            model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        for a, b in zip(ours.weights, reference.weights):
            self.assertAllClose(a, b, atol=1e-4, rtol=1e-4, msg=a.path)
        self.assertAllClose(
            ours.predict(x, verbose=0),
            reference.predict(x, verbose=0),
            atol=1e-4,
            rtol=1e-4,
        )


class BatchNormalizationIntegrationTest(TestCase):
    def model(self, **kwargs):
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8),
                BatchNormalization(**kwargs),
                keras.layers.Dense(1),
            ]
        )

    def data(self):
        rng = np.random.RandomState(5)
        x = rng.normal(size=(32, 4)).astype("float32")
        return x, x.sum(1, keepdims=True)

    def test_config_round_trip(self):
        layer = BatchNormalization(
            axis=[1, 2], momentum=0.9, epsilon=1e-4, center=False,
            gamma_regularizer="l2", synchronized=True, name="bn",
        )
        copy, revived = self.run_config_round_trip(layer)
        self.assertEqual(revived.axis, [1, 2])
        self.assertTrue(revived.synchronized)

    def test_save_load(self):
        model = self.model(momentum=0.5)
        x, y = self.data()
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, epochs=1, verbose=0)
        reloaded = self.run_save_load(model, x)
        self.assertIsInstance(reloaded.layers[1], BatchNormalization)
        self.assertEqual(reloaded.layers[1].momentum, 0.5)

    def test_jit_compiled_fit_updates_moving_statistics(self):
        model = self.model()
        x, y = self.data()
        self.run_compiled_fit(model, x, y)
        bn = model.layers[1]
        self.assertGreater(
            float(np.abs(self.to_numpy(bn.moving_mean)).sum()), 0.0
        )

    def test_mixed_float16(self):
        with self.mixed_precision("mixed_float16"):
            layer = BatchNormalization()
            # 300^2 overflows float16: statistics must be float32.
            x = np.random.RandomState(6).normal(300.0, 50.0, (32, 3))
            y = layer(keras.ops.cast(x, "float16"), training=True)
            self.assertEqual(keras.backend.standardize_dtype(y.dtype),
                             "float16")
            for weight in layer.weights:
                self.assertEqual(weight.dtype, "float32")
            self.assertAllClose(
                keras.ops.cast(y, "float32"), numpy_batch_norm(x, 0),
                atol=1e-2,
            )
            model = self.model()
            xs, ys = self.data()
            self.run_compiled_fit(model, xs, ys)

    def test_mixed_bfloat16(self):
        with self.mixed_precision("mixed_bfloat16"):
            layer = BatchNormalization()
            x = np.random.RandomState(6).normal(0.0, 1.0, (32, 3))
            y = layer(keras.ops.cast(x, "bfloat16"), training=True)
            self.assertEqual(keras.backend.standardize_dtype(y.dtype),
                             "bfloat16")
            self.assertAllClose(
                keras.ops.cast(y, "float32"), numpy_batch_norm(x, 0),
                atol=5e-2,
            )


class SynchronizedTest(TestCase):
    """Two replicas whose local batches differ: synced statistics are global.

    Replica 0 sees zeros, replica 1 sees fours: the global batch has mean 2
    and biased variance 4, each local one variance 0.
    """

    x = np.concatenate([np.zeros((4, 3)), np.full((4, 3), 4.0)]).astype(
        "float32"
    )
    y = np.zeros((8, 1), "float32")

    def fit_one_step(self, layer):
        model = keras.Sequential([keras.Input((3,)), layer])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        model.fit(self.x, self.y, batch_size=8, epochs=1, shuffle=False,
                  verbose=0)
        return layer

    def assert_global_statistics(self, layer):
        self.assertAllClose(layer.moving_mean, np.full(3, 0.01 * 2.0),
                            atol=1e-6)
        self.assertAllClose(layer.moving_variance,
                            np.full(3, 0.99 + 0.01 * 4.0), atol=1e-6)

    @pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
    def test_mirrored_strategy_two_replicas(self):
        strategy = mirrored_strategy()
        self.assertEqual(strategy.num_replicas_in_sync, 2)
        with strategy.scope():
            layer = BatchNormalization(synchronized=True)
            self.fit_one_step(layer)
        self.assert_global_statistics(layer)

    @pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
    def test_jax_data_parallel_two_devices(self):
        with jax_data_parallel():
            layer = self.fit_one_step(BatchNormalization(synchronized=True))
        self.assert_global_statistics(layer)

    def test_single_replica_equals_unsynchronized(self):
        synced = BatchNormalization(synchronized=True)
        plain = BatchNormalization()
        self.assertAllClose(
            synced(self.x, training=True), plain(self.x, training=True),
            atol=1e-5,
        )
        self.assert_global_statistics(synced)
        self.assert_global_statistics(plain)


class NonFiniteBatchTest(TestCase):
    """A batch whose statistics are not finite (NaN or Inf in its inputs,
    or a variance whose float32 sum of squares overflows) leaves both
    moving statistics of the layer exactly as they were, whoever the
    optimizer is."""

    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(8)
        self.x = rng.normal(1.0, 2.0, (8, 4)).astype("float32")
        self.x2 = rng.normal(-1.0, 3.0, (8, 4)).astype("float32")

    def trained_layer(self, **kwargs):
        """A layer whose moving statistics moved off their initial values."""
        layer = BatchNormalization(momentum=0.9, **kwargs)
        layer(self.x, training=True)
        return layer, self.statistics(layer)

    def statistics(self, layer):
        return [self.to_numpy(layer.moving_mean).copy(),
                self.to_numpy(layer.moving_variance).copy()]

    def assert_unchanged(self, layer, statistics, msg=None):
        self.assertAllEqual(layer.moving_mean, statistics[0], msg=msg)
        self.assertAllEqual(layer.moving_variance, statistics[1], msg=msg)

    def bad_batches(self):
        for value in (np.nan, np.inf, -np.inf):
            x = self.x2.copy()
            x[3, 1] = value  # one entry of one feature
            yield str(value), x
        x = self.x2.copy()
        x[0, 2] = 3e38  # finite, but its square overflows float32
        yield "overflowing variance", x

    def test_bad_batch_leaves_every_feature_as_it_was(self):
        for name, x in self.bad_batches():
            layer, before = self.trained_layer()
            layer(x, training=True)
            self.assert_unchanged(layer, before, msg=name)

    def test_next_finite_batch_updates_again(self):
        layer, before = self.trained_layer()
        bad = self.x2.copy()
        bad[0, 0] = np.nan
        layer(bad, training=True)
        layer(self.x2, training=True)
        self.assertAllClose(
            layer.moving_mean, 0.9 * before[0] + 0.1 * self.x2.mean(0),
            atol=1e-6,
        )
        self.assertAllClose(
            layer.moving_variance, 0.9 * before[1] + 0.1 * self.x2.var(0),
            atol=1e-5,
        )

    def test_masked_and_several_axes(self):
        x = np.random.RandomState(9).normal(size=(4, 6, 3)).astype("float32")
        mask = np.ones((4, 6), dtype=bool)
        for kwargs, call_kwargs in [({}, {"mask": mask}),
                                    ({"axis": [1, 2]}, {})]:
            layer = BatchNormalization(**kwargs)
            layer(x, training=True, **call_kwargs)
            before = self.statistics(layer)
            bad = x.copy()
            bad[1, 2, 0] = np.nan
            layer(bad, training=True, **call_kwargs)
            self.assert_unchanged(layer, before, msg=str(kwargs))

    def test_stateless_call_returns_the_old_statistics(self):
        layer, before = self.trained_layer()
        bad = self.x2.copy()
        bad[5, 3] = np.inf
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def call(trainable, non_trainable, x):
            return layer.stateless_call(trainable, non_trainable, x,
                                        training=True)

        if BACKEND == "jax":
            import jax

            call = jax.jit(call)
        _, new_non_trainable = call(trainable, non_trainable, bad)
        for new, old in zip(new_non_trainable, before):
            self.assertAllEqual(new, old)
        # The layer's own variables are not touched by a stateless call.
        self.assert_unchanged(layer, before)

    def test_fit_with_a_plain_optimizer(self):
        # SGD writes NaN into the weights after the NaN batch (batch 1), so
        # every later batch has NaN statistics too: the moving statistics
        # stay those after batch 0, bit for bit.
        rng = np.random.RandomState(10)
        x = rng.normal(size=(24, 4)).astype("float32")
        y = x.sum(1, keepdims=True)
        x[10, 2] = np.nan

        def fit(x, y):
            keras.utils.set_random_seed(11)
            model = keras.Sequential([
                keras.Input((4,)), keras.layers.Dense(5),
                BatchNormalization(momentum=0.5), keras.layers.Dense(1),
            ])
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                          jit_compile=self.jit_compile_setting())
            model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
            return model.layers[1]

        poisoned = fit(x, y)
        reference = fit(x[:8], y[:8])
        for statistic in (poisoned.moving_mean, poisoned.moving_variance):
            self.assertTrue(np.all(np.isfinite(self.to_numpy(statistic))))
        self.assert_unchanged(poisoned, self.statistics(reference))

    def test_mixed_float16(self):
        with self.mixed_precision("mixed_float16"):
            layer = BatchNormalization(momentum=0.9)
            layer(keras.ops.cast(self.x, "float16"), training=True)
            before = self.statistics(layer)
            bad = self.x2.copy()
            bad[2, 2] = np.inf  # as a float16 overflow upstream gives
            y = layer(keras.ops.cast(bad, "float16"), training=True)
            self.assertEqual(keras.backend.standardize_dtype(y.dtype),
                             "float16")
            self.assert_unchanged(layer, before)

    def fit_one_step(self, layer, x):
        model = keras.Sequential([keras.Input((3,)), layer])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        model.fit(x, np.zeros((8, 1), "float32"), batch_size=8, epochs=1,
                  shuffle=False, verbose=0)

    def replica_batch(self):
        """Replica 0 gets zeros with one NaN, replica 1 fours."""
        x = SynchronizedTest.x.copy()
        x[1, 0] = np.nan
        return x

    @pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
    def test_mirrored_strategy(self):
        strategy = mirrored_strategy()
        x = self.replica_batch()
        for synchronized in (True, False):
            with strategy.scope():
                layer = BatchNormalization(synchronized=synchronized)
                self.fit_one_step(layer, x)
            means = [self.to_numpy(v) for v in
                     strategy.experimental_local_results(
                         layer.moving_mean.value)]
            variances = [self.to_numpy(v) for v in
                         strategy.experimental_local_results(
                             layer.moving_variance.value)]
            self.assertEqual(len(means), 2)
            # Replica 0's statistics (synchronized: the global ones) are
            # not finite: its copy stays at the initial values.
            self.assertAllEqual(means[0], np.zeros(3))
            self.assertAllEqual(variances[0], np.ones(3))
            if synchronized:
                self.assertAllEqual(means[1], np.zeros(3))
                self.assertAllEqual(variances[1], np.ones(3))
            else:
                # Unsynchronized, each replica has its own finite statistics
                # (replica 1: mean 4, variance 0).
                self.assertAllClose(means[1], np.full(3, 0.04), atol=1e-6)
                self.assertAllClose(variances[1], np.full(3, 0.99),
                                    atol=1e-6)

    @pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
    def test_jax_data_parallel(self):
        with jax_data_parallel():
            layer = BatchNormalization(synchronized=True)
            self.fit_one_step(layer, self.replica_batch())
        self.assert_unchanged(layer, [np.zeros(3), np.ones(3)])


class BadArgumentsTest(TestCase):
    def test_momentum_out_of_range(self):
        with self.assertRaisesRegex(ValueError, r"`momentum`.*momentum=1\.5"):
            BatchNormalization(momentum=1.5)
        with self.assertRaisesRegex(ValueError, r"momentum=-0\.1"):
            BatchNormalization(momentum=-0.1)

    def test_epsilon_not_positive(self):
        with self.assertRaisesRegex(ValueError, r"`epsilon`.*epsilon=0\.0"):
            BatchNormalization(epsilon=0.0)
        with self.assertRaisesRegex(ValueError, r"epsilon=-1"):
            BatchNormalization(epsilon=-1)

    def test_epsilon_and_momentum_not_finite(self):
        with self.assertRaisesRegex(ValueError, r"`epsilon`.*epsilon=inf"):
            BatchNormalization(epsilon=float("inf"))
        with self.assertRaisesRegex(ValueError, r"`epsilon`.*epsilon=nan"):
            BatchNormalization(epsilon=float("nan"))
        with self.assertRaisesRegex(ValueError, r"`momentum`.*momentum=nan"):
            BatchNormalization(momentum=float("nan"))

    def test_wrong_types(self):
        with self.assertRaisesRegex(TypeError, r"`momentum`.*'0.9'"):
            BatchNormalization(momentum="0.9")
        with self.assertRaisesRegex(TypeError, r"`axis`.*axis=1.5"):
            BatchNormalization(axis=1.5)
        with self.assertRaisesRegex(TypeError, r"`center`"):
            BatchNormalization(center=1)

    def test_axis_out_of_bounds_at_build(self):
        with self.assertRaisesRegex(ValueError, r"`axis`.*axis=3"):
            BatchNormalization(axis=3)(np.zeros((2, 3), "float32"))

    def test_mask_rank(self):
        with self.assertRaisesRegex(ValueError, "mask"):
            BatchNormalization()(
                np.zeros((2, 3), "float32"), mask=np.ones((2, 3), bool)
            )
