"""RetrainOnFullData under mixed_float16 (all backends),
tf.distribute.MirroredStrategy (TensorFlow) and
keras.distribution.DataParallel (JAX): phase 2 starts from the initial
weights and optimizer state and runs best_epoch + 1 epochs."""

import unittest

import keras
import numpy as np

from kreg.callbacks import EarlyStopping
from kreg.callbacks import RetrainOnFullData
from kreg.testing import TestCase
from kreg.testing import jax_data_parallel
from kreg.testing import mirrored_strategy
from tests.callbacks.test_retrain_on_full_data import RecordStart
from tests.callbacks.test_retrain_on_full_data import RetrainData
from tests.callbacks.test_retrain_on_full_data import optimizer_values


class RetrainPrecisionAndDistributionTest(RetrainData, TestCase):
    def build(self):
        # Built (optimizer too) before fit, so that its initial values can
        # be compared with those phase 2 starts from.
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.5),
                      loss="mse")
        model.optimizer.build(model.trainable_variables)
        return model

    def assert_two_phases(self, model):
        initial = model.get_weights()
        initial_optimizer = optimizer_values(model)
        start = RecordStart()
        stop = EarlyStopping(patience=2, restore_best_weights=True)
        retrain = RetrainOnFullData(self.x_full, self.y_full, batch_size=16,
                                    callbacks=[start])
        history = self.fit(model, [stop, retrain])
        self.assert_phase_2_from_initial(stop, retrain, start, initial)
        self.assertEqual(history.history["phase"].count(2),
                         stop.best_epoch + 1)
        self.assertFalse(np.any(np.isnan(history.history["loss"])))
        # Every optimizer variable (momentum, and with mixed precision the
        # loss scale and its counter) as before phase 1.
        self.assertEqual(len(start.optimizer), len(initial_optimizer))
        for a, b in zip(start.optimizer, initial_optimizer):
            self.assertAllEqual(a, b)

    def test_mixed_float16(self):
        with self.mixed_precision("mixed_float16"):
            model = self.build()
            self.assertIsInstance(model.optimizer,
                                  keras.optimizers.LossScaleOptimizer)
            self.assert_two_phases(model)

    @unittest.skipUnless(keras.backend.backend() == "tensorflow",
                         "tf.distribute is TensorFlow only")
    def test_mirrored_strategy(self):
        with mirrored_strategy().scope():
            model = self.build()
        self.assert_two_phases(model)
        for weight in model.trainable_variables:
            first, second = weight.value.values
            self.assertAllEqual(first, second)

    @unittest.skipUnless(keras.backend.backend() == "jax",
                         "keras.distribution.DataParallel on JAX")
    def test_jax_data_parallel(self):
        with jax_data_parallel():
            model = self.build()
            self.assert_two_phases(model)
            self.assertEqual(
                len(model.trainable_variables[0].value.sharding.device_set), 2
            )
