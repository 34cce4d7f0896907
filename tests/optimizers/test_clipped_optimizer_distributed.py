"""ClippedOptimizer under a distribution: tf.distribute.MirroredStrategy
(TensorFlow) and keras.distribution.DataParallel (JAX)."""

import contextlib
import unittest

import keras
import numpy as np

from kreg.optimizers import ClippedOptimizer
from kreg.testing import TestCase
from kreg.testing import jax_data_parallel
from kreg.testing import mirrored_strategy

# Non-linear clipping (value, global norm) of the aggregated gradient is
# not the sum of clipped per-replica gradients: each must act on the global
# batch's gradient.
CLIPPINGS = [{"global_clipnorm": 0.5}, {"clipvalue": 0.2},
             {"clipnorm": 0.3, "agc_factor": 0.5}]


def data():
    """16 examples and the initial weights of the 5-4-1 network."""
    rng = np.random.RandomState(0)
    x = rng.randn(16, 5).astype("float32")
    y = (3.0 * rng.randn(16, 1)).astype("float32")
    weights = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(1)
    ]).get_weights()
    return x, y, weights


def train(kwargs, x, y, weights, scope=None):
    """Two full-batch SGD steps through ClippedOptimizer(**kwargs); the
    model is built and compiled inside `scope`."""
    with scope or contextlib.nullcontext():
        model = keras.Sequential([
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(1),
        ])
        model.set_weights(weights)
        optimizer = ClippedOptimizer(keras.optimizers.SGD(0.1), **kwargs)
        model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=len(x), epochs=2, verbose=0, shuffle=False)
    return model, optimizer


@unittest.skipUnless(keras.backend.backend() == "tensorflow",
                     "tf.distribute is TensorFlow only")
class MirroredStrategyTest(TestCase):
    def test_update_equals_single_device_update(self):
        import tensorflow as tf

        x, y, weights = data()
        mirrored = mirrored_strategy()
        self.assertEqual(mirrored.num_replicas_in_sync, 2)
        single = tf.distribute.get_strategy()
        for kwargs in CLIPPINGS:
            one, one_opt = train(kwargs, x, y, weights, single.scope())
            two, two_opt = train(kwargs, x, y, weights, mirrored.scope())
            for a, b in zip(two.get_weights(), one.get_weights()):
                self.assertAllClose(a, b, atol=1e-5, rtol=1e-5)
            self.assertAllClose(two_opt.grad_norm, one_opt.grad_norm,
                                rtol=1e-5)
            self.assertEqual(int(self.to_numpy(two_opt.clipped_steps)), 2)
            self.assertEqual(int(self.to_numpy(two_opt.iterations)), 2)

    def test_keras_builtin_clips_per_replica(self):
        # The reference this wrapper fixes: Keras's own global_clipnorm
        # under the same strategy gives a different update.
        import tensorflow as tf

        x, y, _ = data()

        def keras_update(strategy):
            with strategy.scope():
                keras.utils.set_random_seed(1)
                model = keras.Sequential([
                    keras.Input((5,)), keras.layers.Dense(1)
                ])
                model.compile(
                    optimizer=keras.optimizers.SGD(0.1, global_clipnorm=0.5),
                    loss="mse",
                )
            model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      shuffle=False)
            return model.get_weights()[0]

        mirrored = mirrored_strategy()
        differ = np.max(np.abs(keras_update(mirrored) - keras_update(
            tf.distribute.get_strategy())))
        self.assertGreater(differ, 1e-4)

    def test_poisoned_replica_skips_on_every_replica(self):
        x, y, weights = data()
        x[12, 0] = np.inf  # in the second replica's half of the batch
        model, opt = train({"global_clipnorm": 1.0}, x, y, weights,
                           mirrored_strategy().scope())
        for a, b in zip(model.get_weights(), weights):
            self.assertAllEqual(a, b)
        self.assertEqual(int(self.to_numpy(opt.skipped_steps)), 2)
        self.assertEqual(int(self.to_numpy(opt.iterations)), 0)


@unittest.skipUnless(keras.backend.backend() == "jax",
                     "keras.distribution.DataParallel on JAX")
class JaxDataParallelTest(TestCase):
    def test_update_equals_single_device_update(self):
        x, y, weights = data()
        for kwargs in CLIPPINGS:
            one, one_opt = train(kwargs, x, y, weights)
            with jax_data_parallel():
                two, two_opt = train(kwargs, x, y, weights)
                # The batch really was split over the two devices.
                sharding = two.trainable_variables[0].value.sharding
                self.assertEqual(len(sharding.device_set), 2)
            for a, b in zip(two.get_weights(), one.get_weights()):
                self.assertAllClose(a, b, atol=1e-5, rtol=1e-5)
            self.assertAllClose(two_opt.grad_norm, one_opt.grad_norm,
                                rtol=1e-5)
            self.assertEqual(int(self.to_numpy(two_opt.clipped_steps)), 2)

    def test_poisoned_half_batch_skips_the_step(self):
        x, y, weights = data()
        x[12, 0] = np.inf  # in the second device's half of the batch
        with jax_data_parallel():
            model, opt = train({"global_clipnorm": 1.0}, x, y, weights)
        for a, b in zip(model.get_weights(), weights):
            self.assertAllEqual(a, b)
        self.assertEqual(int(self.to_numpy(opt.skipped_steps)), 2)
        self.assertEqual(int(self.to_numpy(opt.iterations)), 0)
