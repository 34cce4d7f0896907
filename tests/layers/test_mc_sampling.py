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

    def assert_sampled_mse(self, losses):
        """Each pass near the expected mse (256 samples: the mean's relative
        std is about 0.09), and no two passes equal."""
        for loss in losses:
            self.assertAllClose(loss, self.mc_mse, rtol=0.4)
        self.assertEqual(len(set(losses)), len(losses), losses)

    def assert_deterministic(self, model):
        self.assertAllClose(model.evaluate(self.x, self.y, verbose=0), 0.0,
                            atol=1e-3)
        self.assertAllClose(model.predict(self.x, verbose=0), self.y,
                            rtol=1e-5)

    def test_evaluate_samples_after_an_earlier_evaluate_or_fit(self):
        for jit_compile in jit_settings():
            for before in ("evaluate", "fit with validation_data"):
                with self.subTest(jit_compile=jit_compile, before=before):
                    model = summing_model(20)
                    model.compile(optimizer=keras.optimizers.SGD(0.0),
                                  loss="mse", jit_compile=jit_compile)
                    if before == "evaluate":
                        model.evaluate(self.x, self.y, verbose=0)
                    else:
                        model.fit(self.x, self.y, epochs=1, verbose=0,
                                  validation_data=(self.x, self.y),
                                  batch_size=128)
                    self.assert_deterministic(model)
                    with mc_sampling(model):
                        losses = [model.evaluate(self.x, self.y, verbose=0)
                                  for _ in range(3)]
                        first = self.to_numpy(model.predict(self.x,
                                                            verbose=0))
                        second = self.to_numpy(model.predict(self.x,
                                                             verbose=0))
                    self.assert_sampled_mse(losses)
                    self.assert_sampled_mse([
                        float(np.mean((first - self.y) ** 2)),
                        float(np.mean((second - self.y) ** 2))])
                    self.assert_deterministic(model)
                    # A second block samples again.
                    with mc_sampling(model):
                        self.assert_sampled_mse([
                            model.evaluate(self.x, self.y, verbose=0)
                            for _ in range(2)])
                    self.assert_deterministic(model)

    def test_mc_switched_on_after_the_functions_were_traced(self):
        # A model trained with mc=False, then switched to Monte-Carlo
        # dropout: its predict and test functions were traced without it.
        for jit_compile in jit_settings():
            with self.subTest(jit_compile=jit_compile):
                model = summing_model(20, mc=False)
                model.compile(loss="mse", jit_compile=jit_compile)
                self.assert_deterministic(model)
                model.layers[0].mc = True
                with mc_sampling(model):
                    self.assert_sampled_mse([
                        model.evaluate(self.x, self.y, verbose=0)
                        for _ in range(2)])
                    passes = [self.to_numpy(model.predict(self.x, verbose=0))
                              for _ in range(2)]
                self.assert_sampled_mse([float(np.mean((p - self.y) ** 2))
                                         for p in passes])
                self.assert_deterministic(model)

    def test_sampling_ends_when_the_block_raises(self):
        model = summing_model(20)
        model.compile(loss="mse")
        self.assert_deterministic(model)
        with self.assertRaisesRegex(RuntimeError, "inside"):
            with mc_sampling(model):
                model.evaluate(self.x, self.y, verbose=0)
                raise RuntimeError("inside")
        self.assert_deterministic(model)
        # Nested blocks: the inner one's end leaves the outer one sampling.
        with mc_sampling(model):
            with mc_sampling(model):
                pass
            self.assert_sampled_mse([
                model.evaluate(self.x, self.y, verbose=0) for _ in range(2)])
        self.assert_deterministic(model)
