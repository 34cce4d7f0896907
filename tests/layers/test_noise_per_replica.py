"""Noise layers under two replicas draw what one device would draw.

A two-replica `predict` (`tf.distribute.MirroredStrategy` on two logical
CPUs, or `keras.distribution.DataParallel` on two JAX host devices) splits
each global batch of identical rows into two halves, one per replica.
Dropout and GaussianNoise draw per example, so the halves must be
independent: they agree as two independent masks do, where one draw shared
by the replicas would agree everywhere. WeightNoise draws once per step for
the whole batch, so the replicas of a step must share that draw.

Expected agreement of two independent masks with keep probability p:
``p^2 + (1 - p)^2`` (both keep or both drop). Each half has 20,000 mask
entries, so the agreement's and the dropped fraction's standard deviations
are below 0.0036 and the tolerances (0.03) are over 8 of them; the noise
correlations over 20,000 (GaussianNoise) or 5,000 (WeightNoise, between
steps) pairs have standard deviations 0.007 and 0.014, against tolerances
0.06 and 0.1.
"""

import keras
import numpy as np
import pytest

from kreg.layers import Dropout
from kreg.layers import ElasticDeformation
from kreg.layers import GaussianNoise
from kreg.layers import WeightNoise
from kreg.models import Ensemble
from kreg.testing import TestCase
from kreg.testing import jax_data_parallel
from kreg.testing import mirrored_strategy

BACKEND = keras.backend.backend()
ROWS, FEATURES = 8, 5000  # one global batch: 4 rows per replica


class _Training(keras.layers.Layer):
    """Calls `layer` in training mode, so that `predict` draws noise."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, inputs):
        return self.layer(inputs, training=True)


def _predict_two_steps(make_layer, x, jit_compile):
    """Two global batches through `predict`: returns the four half-batches
    [replica 0 step 1, replica 1 step 1, replica 0 step 2, replica 1 step 2].
    """
    model = keras.Sequential([keras.Input(x.shape[1:]),
                              _Training(make_layer())])
    model.compile(loss="mse", jit_compile=jit_compile)
    y = keras.ops.convert_to_numpy(
        model.predict(np.concatenate([x, x]), batch_size=ROWS, verbose=0)
    )
    return np.split(y, 4)


class _PerReplicaChecks:
    """The checks, run inside a two-replica distribution by subclasses."""

    def distributed(self):
        raise NotImplementedError

    def halves(self, make_layer, x):
        with self.distributed():
            return _predict_two_steps(make_layer, x, self.jit_compile)

    def assert_independent_masks(self, masks, rate):
        keep = 1.0 - rate
        independent = keep**2 + (1.0 - keep) ** 2
        r0_s1, r1_s1, r0_s2, r1_s2 = masks
        for mask in masks:
            self.assertAlmostEqual(float(mask.mean()), rate, delta=0.03)
        # Between the replicas, and between steps (a replica's mask must
        # not repeat another replica's mask of another step).
        for first, second in ((r0_s1, r1_s1), (r0_s2, r1_s2),
                              (r0_s1, r0_s2), (r1_s1, r0_s2)):
            self.assertAlmostEqual(float(np.mean(first == second)),
                                   independent, delta=0.03)

    def assert_uncorrelated(self, noises, stddev, tolerance):
        for noise in noises:
            self.assertAlmostEqual(float(noise.std()), stddev,
                                   delta=0.05 * stddev)
        r0_s1, r1_s1, r0_s2, r1_s2 = (n.ravel() for n in noises)
        for first, second in ((r0_s1, r1_s1), (r0_s2, r1_s2),
                              (r0_s1, r0_s2), (r1_s1, r0_s2)):
            self.assertLess(abs(np.corrcoef(first, second)[0, 1]), tolerance)

    def test_dropout_masks(self):
        x = np.ones((ROWS, FEATURES), "float32")
        for rate, seed in ((0.5, None), (0.5, 7), (0.2, 3)):
            with self.subTest(rate=rate, seed=seed):
                halves = self.halves(lambda: Dropout(rate, seed=seed), x)
                self.assert_independent_masks([h == 0 for h in halves], rate)

    def test_gaussian_noise(self):
        x = np.zeros((ROWS, FEATURES), "float32")
        for seed in (None, 5):
            with self.subTest(seed=seed):
                halves = self.halves(lambda: GaussianNoise(0.5, seed=seed),
                                     x)
                self.assert_uncorrelated(halves, 0.5, tolerance=0.06)

    def test_elastic_deformation_fields(self):
        # Identical coordinate images (channels: row, column): the warped
        # column channel minus the column is each image's field dx. One
        # draw shared by the replicas would give replica 1's images the
        # fields of replica 0's.
        size = 16
        rows, cols = np.meshgrid(np.arange(size), np.arange(size),
                                 indexing="ij")
        image = np.stack([rows, cols], axis=-1).astype("float32")
        x = np.stack([image] * ROWS)
        halves = self.halves(
            lambda: ElasticDeformation(2.0, 2.0, fill_mode="nearest"), x)
        fields = [h[..., 1] - cols for h in halves]
        for field in fields:
            self.assertGreater(float(field.std()), 0.1)
        r0_s1, r1_s1, r0_s2, r1_s2 = fields
        for first, second in ((r0_s1, r1_s1), (r0_s2, r1_s2),
                              (r0_s1, r0_s2), (r1_s1, r0_s2)):
            for a, b in zip(first, second):
                self.assertGreater(float(np.abs(a - b).max()), 0.2)

    def test_weight_noise_is_one_draw_per_step_as_on_one_device(self):
        # WeightNoise perturbs the kernel once per step for the whole batch,
        # so one device's step shares one draw among all its examples; the
        # replicas of a step must share it too (independent draws would
        # average two perturbations per step). Kernel 0, input 1: unit j
        # gives sum_i N_ij, standard deviation stddev * sqrt(4) = 1.
        x = np.ones((ROWS, 4), "float32")

        def make_layer():
            return WeightNoise(
                keras.layers.Dense(FEATURES, use_bias=False,
                                   kernel_initializer="zeros"),
                stddev=0.5, seed=2,
            )

        halves = self.halves(make_layer, x)
        one_device = _predict_two_steps(make_layer, x, self.jit_compile)
        for half, reference in zip(halves, one_device):
            self.assertAllClose(half, reference)
        r0_s1, r1_s1, r0_s2, r1_s2 = (h[0] for h in halves)
        self.assertAllEqual(r0_s1, r1_s1)
        self.assertAllEqual(r0_s2, r1_s2)
        self.assertAlmostEqual(float(r0_s1.std()), 1.0, delta=0.05)
        self.assertLess(abs(np.corrcoef(r0_s1, r0_s2)[0, 1]), 0.1)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
class MirroredStrategyTest(_PerReplicaChecks, TestCase):
    # XLA cannot compile a step that reads variables of two logical CPUs
    # ("Trying to access resource ... located in device CPU:1 from CPU:0"),
    # for any model: the step runs as a plain tf.function.
    jit_compile = False

    def distributed(self):
        strategy = mirrored_strategy()
        self.assertEqual(strategy.num_replicas_in_sync, 2)
        return strategy.scope()

    def test_fit_trains_with_every_noise_layer(self):
        with self.distributed():
            model = keras.Sequential([
                keras.Input((4,)), GaussianNoise(0.1, seed=1),
                WeightNoise(keras.layers.Dense(8), stddev=0.05, seed=2),
                Dropout(0.5, seed=3), keras.layers.Dense(1),
            ])
            x = np.random.RandomState(0).normal(size=(32, 4)).astype(
                "float32"
            )
            model.compile(optimizer="sgd", loss="mse", jit_compile=False)
            history = model.fit(x, x[:, :1], epochs=2, batch_size=8,
                                verbose=0)
        self.assertTrue(np.all(np.isfinite(history.history["loss"])))


    def test_ensemble_bootstrap_weights_differ_between_replicas(self):
        # Two Poisson(1) draws agree with probability
        # sum_k (e^-1 / k!)^2 = 0.3085; one draw shared by the replicas
        # agrees everywhere. 2 members x 2,000 samples per replica: the
        # agreement's standard deviation is 0.0073.
        def make_member():
            return keras.Sequential([keras.Input((2,)),
                                     keras.layers.Dense(1)])

        class BootstrapWeights(keras.layers.Layer):
            def __init__(self, ensemble, **kwargs):
                super().__init__(**kwargs)
                self.ensemble = ensemble

            def call(self, inputs):
                batch = keras.ops.shape(inputs)[0]
                return keras.ops.transpose(
                    self.ensemble.draw_bootstrap_weights(batch))

        x = np.zeros((4000, 2), "float32")
        with self.distributed():
            ensemble = Ensemble(make_member, num_members=2,
                                mode="bootstrap", seed=4)
            model = keras.Sequential([keras.Input((2,)),
                                      BootstrapWeights(ensemble)])
            model.compile(loss="mse", jit_compile=False)
            weights = keras.ops.convert_to_numpy(
                model.predict(x, batch_size=4000, verbose=0))
        first, second = np.split(weights, 2)
        self.assertAlmostEqual(float(weights.mean()), 1.0, delta=0.05)
        self.assertAlmostEqual(float(np.mean(first == second)), 0.3085,
                               delta=0.03)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
class JaxDataParallelTest(_PerReplicaChecks, TestCase):
    jit_compile = True

    def distributed(self):
        return jax_data_parallel()
