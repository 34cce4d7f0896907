"""EMA under mixed_float16 (all backends), tf.distribute.MirroredStrategy
(TensorFlow) and keras.distribution.DataParallel (JAX): the shadow is
float32 and follows a NumPy recomputation of the weight trajectory recorded
batch by batch; with EarlyStopping(restore_best_weights=True) the weights
left reproduce the best val_loss logged."""

import unittest

import keras
import numpy as np

from kreg.callbacks import EMA
from kreg.callbacks import EarlyStopping
from kreg.testing import TestCase
from kreg.testing import jax_data_parallel
from kreg.testing import mirrored_strategy


class RecordSteps(keras.callbacks.Callback):
    """Trainable weights and the optimizer's step counter after each batch."""

    def on_train_begin(self, logs=None):
        self.initial = self._weights()
        self.after_batch = []
        self.iterations = []

    def on_train_batch_end(self, batch, logs=None):
        self.after_batch.append(self._weights())
        self.iterations.append(
            int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        )

    def _weights(self):
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        return [np.array(keras.ops.convert_to_numpy(v.value), "float64")
                for v in self.model.trainable_variables]


def numpy_ema(record, decay):
    """Folds in the weights after every batch that took an optimizer step
    (a loss-scaled step with non-finite gradients takes none)."""
    shadow = [w.copy() for w in record.initial]
    last = record.iterations[0] - 1 if record.iterations else 0
    steps = 0
    for weights, iteration in zip(record.after_batch, record.iterations):
        if iteration == last:
            continue
        last = iteration
        steps += 1
        shadow = [decay * s + (1 - decay) * w for s, w in zip(shadow, weights)]
    return shadow, steps


def data(n=48, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(4, 2))).astype("float32")
    return x, y


def small_model():
    keras.utils.set_random_seed(5)
    return keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(2),
    ])


VALIDATION = data(16, seed=1)


class EMAPrecisionAndDistributionTest(TestCase):
    def fit_with_ema(self, model, epochs, **ema_kwargs):
        """Fits with `RecordSteps` and `EMA(0.8)`, validating on VALIDATION;
        checks the shadow against NumPy. Returns `(ema, record, history)`."""
        x, y = data()
        record = RecordSteps()
        ema = EMA(decay=0.8, **ema_kwargs)
        history = model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False,
                            verbose=0, callbacks=[record, ema],
                            validation_data=VALIDATION)
        self.check_follows_numpy(model, ema, record, 0.8)
        return ema, record, history

    def assert_averaged_weights_gave_val_loss(self, model, ema, history,
                                              rtol):
        for weight, shadow in zip(model.trainable_variables,
                                  ema.shadow_variables):
            self.assertAllEqual(weight, shadow)
        self.assertAllClose(
            model.evaluate(*VALIDATION, batch_size=8, verbose=0),
            history.history["val_loss"][-1], rtol=rtol)

    def check_follows_numpy(self, model, ema, record, decay):
        self.assertEqual(record.iterations[0], 1)
        expected, steps = numpy_ema(record, decay)
        self.assertGreater(steps, 10)
        self.assertEqual(ema.steps, steps)
        for shadow, weight, e in zip(ema.shadow_variables,
                                     model.trainable_variables, expected):
            self.assertEqual(keras.backend.standardize_dtype(shadow.dtype),
                             "float32")
            self.assertEqual(keras.backend.standardize_dtype(weight.dtype),
                             "float32")
            self.assertAllClose(shadow, e, atol=1e-5, rtol=1e-5)

    def test_mixed_float16(self):
        with self.mixed_precision("mixed_float16"):
            model = small_model()
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            self.assertIsInstance(model.optimizer,
                                  keras.optimizers.LossScaleOptimizer)
            ema, _, history = self.fit_with_ema(model, epochs=3)
            # The averaged weights are in the model and gave the logged
            # validation loss (float16 compute: loose tolerance).
            self.assert_averaged_weights_gave_val_loss(model, ema, history,
                                                       rtol=1e-3)

    @unittest.skipUnless(keras.backend.backend() == "tensorflow",
                         "tf.distribute is TensorFlow only")
    def test_mirrored_strategy(self):
        with mirrored_strategy().scope():
            model = small_model()
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
                          loss="mse")
        ema, record, history = self.fit_with_ema(model, epochs=2,
                                                 keep_averaged=False)
        # keep_averaged=False: the raw weights are back, on both replicas.
        for weight, raw in zip(model.trainable_variables,
                               record.after_batch[-1]):
            for replica in weight.value.values:
                self.assertAllClose(replica, raw)
        with ema.averaged_weights():
            for weight, shadow in zip(model.trainable_variables,
                                      ema.shadow_variables):
                for replica in weight.value.values:
                    self.assertAllEqual(replica, shadow)
            self.assertAllClose(
                model.evaluate(*VALIDATION, batch_size=8, verbose=0),
                history.history["val_loss"][-1], rtol=1e-5)

    @unittest.skipUnless(keras.backend.backend() == "tensorflow",
                         "tf.distribute is TensorFlow only")
    def test_mirrored_strategy_with_steps_per_execution(self):
        # Two steps per compiled call: the update inside the optimizer step
        # still averages every step, as with one step per call.
        x, y = data()
        shadows = {}
        for steps in (1, 2):
            with mirrored_strategy().scope():
                model = small_model()
                model.compile(optimizer=keras.optimizers.SGD(0.1),
                              loss="mse", steps_per_execution=steps)
            ema = EMA(decay=0.8)
            model.fit(x, y, batch_size=8, verbose=0, shuffle=False,
                      callbacks=[ema])
            self.assertEqual(ema.steps, 6)
            shadows[steps] = ema.shadow_variables
        for a, b in zip(shadows[1], shadows[2]):
            self.assertAllClose(a, b, atol=1e-6)

    @unittest.skipUnless(keras.backend.backend() == "jax",
                         "keras.distribution.DataParallel on JAX")
    def test_jax_data_parallel(self):
        with jax_data_parallel():
            model = small_model()
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
                          loss="mse")
            ema, _, history = self.fit_with_ema(model, epochs=2)
            self.assertEqual(
                len(model.trainable_variables[0].value.sharding.device_set), 2
            )
            self.assert_averaged_weights_gave_val_loss(model, ema, history,
                                                       rtol=1e-5)
            # The shadow is laid out as the weights: on both devices.
            for shadow in model.optimizer.shadows:
                self.assertEqual(len(shadow.value.sharding.device_set), 2)

    def assert_early_stopping_keeps_best_averaged(self, model):
        """EMA + EarlyStopping(restore_best_weights=True): the weights left
        in the model reproduce the best logged val_loss."""
        x, y = data()
        stop = EarlyStopping(patience=2, restore_best_weights=True)
        history = model.fit(x, y, batch_size=8, epochs=6, shuffle=False,
                            verbose=0, callbacks=[EMA(decay=0.8), stop],
                            validation_data=VALIDATION)
        best = min(history.history["val_loss"])
        self.assertEqual(history.history["val_loss"][stop.best_epoch], best)
        self.assertAllClose(
            model.evaluate(*VALIDATION, batch_size=8, verbose=0), best,
            rtol=1e-5)
        return stop

    @unittest.skipUnless(keras.backend.backend() == "tensorflow",
                         "tf.distribute is TensorFlow only")
    def test_mirrored_strategy_with_early_stopping(self):
        with mirrored_strategy().scope():
            model = small_model()
            model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
                          loss="mse")
        stop = self.assert_early_stopping_keeps_best_averaged(model)
        self.assertLess(stop.best_epoch, stop.stopped_epoch)

    @unittest.skipUnless(keras.backend.backend() == "jax",
                         "keras.distribution.DataParallel on JAX")
    def test_jax_data_parallel_with_early_stopping(self):
        with jax_data_parallel():
            model = small_model()
            model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
                          loss="mse")
            stop = self.assert_early_stopping_keeps_best_averaged(model)
        self.assertLess(stop.best_epoch, stop.stopped_epoch)

