"""EMA, EarlyStopping, RetrainOnFullData and GradientMonitor in the
combinations of COMBINATIONS.md: under learning-rate schedules, a callback
that changes the rate, ClippedOptimizer and non-default loss reductions
(the raw steps are those of a plain Keras model trained alone), all of
kreg together in one fit, new callbacks in a second fit, and a model saved
after such a fit."""

import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized

from kreg.callbacks import EMA
from kreg.callbacks import EarlyStopping
from kreg.callbacks import GradientMonitor
from kreg.callbacks import RetrainOnFullData
from kreg.optimizers import ClippedOptimizer
from kreg.optimizers.optimizer_wrapper import OptimizerWrapper
from kreg.testing import TestCase
from tests.callbacks import test_ema


def _data(n=48, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = np.tanh(x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    return x, y


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(1)])


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.1, 3, 0.5)


def _rate_callback():
    return keras.callbacks.LearningRateScheduler(
        lambda epoch, rate: 0.2 / (epoch + 1))


class _Setup(TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = _data()
        self.xv, _ = _data(16, seed=1)
        # Validation targets off the training relation: the validation
        # loss falls, then rises, and early stopping stops.
        self.yv = -self.xv[:, :1] * 0.5
        self.weights = np.random.RandomState(2).uniform(
            0.2, 2.0, 48).astype("float32")


class RawStepsTest(_Setup, parameterized.TestCase):
    """With an EMA (raw weights kept), a GradientMonitor and a
    ClippedOptimizer, the weights take the steps of a plain Keras model
    whose optimizer clips itself, and the EMA averages them (NumPy)."""

    @parameterized.parameters(
        ("schedule", "sum"), ("rate callback", "mean_with_sample_weight"))
    def test_raw_steps_and_average(self, rate, reduction):
        def optimizer(kreg_clipping):
            learning_rate = _schedule() if rate == "schedule" else 0.2
            if kreg_clipping:
                return ClippedOptimizer(keras.optimizers.SGD(
                    learning_rate, momentum=0.5), global_clipnorm=0.5)
            return keras.optimizers.SGD(learning_rate, momentum=0.5,
                                        global_clipnorm=0.5)

        extra = [_rate_callback()] if rate == "rate callback" else []
        record = test_ema.RecordBatchWeights()
        ema = EMA(0.7, keep_averaged=False)
        results = []
        for ours in (True, False):
            model = _model()
            model.compile(optimizer(ours),
                          keras.losses.MeanSquaredError(reduction=reduction),
                          jit_compile=self.jit_compile_setting()
                          if rate == "schedule" else "auto")
            callbacks = extra + ([record, ema, GradientMonitor()] if ours
                                 else [])
            model.fit(self.x, self.y, batch_size=16, epochs=3, shuffle=False,
                      verbose=0, sample_weight=self.weights,
                      callbacks=callbacks)
            results.append(model.get_weights())
        for a, b in zip(*results):
            self.assertAllClose(a, b, atol=1e-6)
        self.assertEqual(ema.steps, 9)
        expected = test_ema.numpy_ema(record.initial, record.after_batch, 0.7)
        for s, e in zip(ema.shadow_variables, expected):
            self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)


class TogetherTest(_Setup):
    def test_early_stopping_ema_monitor_and_clipping_in_one_fit(self):
        # EarlyStopping(restore_best_weights) keeps the averaged weights of
        # the epoch with the best (averaged) validation loss: the NumPy
        # average of the raw trajectory at that epoch's end; the raw steps
        # are those of a plain clipping SGD trained alone.
        model = _model()
        opt = ClippedOptimizer(keras.optimizers.SGD(_schedule()),
                               global_clipnorm=0.3)
        model.compile(opt, "mse", jit_compile=self.jit_compile_setting())
        record = test_ema.RecordBatchWeights()
        stop = EarlyStopping(patience=1, restore_best_weights=True)
        ema = EMA(0.6)
        history = model.fit(
            self.x, self.y, batch_size=16, epochs=20, shuffle=False,
            verbose=0, validation_data=(self.xv, self.yv),
            callbacks=[record, ema, GradientMonitor(), stop])
        logs = history.history
        epochs = len(logs["val_loss"])
        self.assertLess(epochs, 20, "should stop early")
        best = int(np.argmin(logs["val_loss"]))
        self.assertEqual(stop.best_epoch, best)
        averaged = test_ema.numpy_ema(
            record.initial, record.after_batch[:3 * (best + 1)], 0.6)
        for w, e in zip(model.get_weights(), averaged):
            self.assertAllClose(w, e, atol=1e-5, rtol=1e-5)
        self.assertAllClose(model.evaluate(self.xv, self.yv, verbose=0),
                            logs["val_loss"][best], rtol=1e-5)
        self.assertEqual(sum(logs["clipped_steps"]),
                         int(self.to_numpy(opt.clipped_steps)))
        self.assertGreater(sum(logs["clipped_steps"]), 0)
        plain = _model()
        plain.compile(keras.optimizers.SGD(_schedule(), global_clipnorm=0.3),
                      "mse")
        plain.fit(self.x, self.y, batch_size=16, epochs=epochs,
                  shuffle=False, verbose=0)
        for a, b in zip(plain.get_weights(), record.after_batch[-1]):
            self.assertAllClose(a, b, atol=1e-6)


class SecondFitTest(_Setup):
    def test_new_early_stopping_and_ema_in_a_second_fit(self):
        # Each fit's new callbacks start from that fit: the stops are those
        # of Keras's EarlyStopping on a twin model, and the second EMA
        # averages from the second fit's first weights.
        models = [_model(), _model()]
        for model in models:
            model.compile(keras.optimizers.SGD(0.1), "mse")
        for patience, decay in ((1, 0.5), (2, 0.8)):
            ours = EarlyStopping(patience=patience)
            theirs = keras.callbacks.EarlyStopping(patience=patience)
            record = test_ema.RecordBatchWeights()
            ema = EMA(decay, validate_with_averaged=False,
                      keep_averaged=False)
            runs = [
                model.fit(self.x, self.y, batch_size=16, epochs=20,
                          shuffle=False, verbose=0,
                          validation_data=(self.xv, self.yv),
                          callbacks=callbacks)
                for model, callbacks in zip(
                    models, ([record, ema, ours], [theirs]))]
            self.assertEqual(ours.stopped_epoch, theirs.stopped_epoch)
            self.assertLess(len(runs[0].epoch), 20)
            self.assertAllClose(runs[0].history["val_loss"],
                                runs[1].history["val_loss"], atol=1e-6)
            expected = test_ema.numpy_ema(record.initial, record.after_batch,
                                          decay)
            for s, e in zip(ema.shadow_variables, expected):
                self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)


class SaveLoadTest(_Setup):
    def test_saved_after_ema_and_monitor_reloads_the_compiled_optimizer(self):
        model = _model()
        model.compile(keras.optimizers.Adam(0.05), "mse")
        model.fit(self.x, self.y, batch_size=16, epochs=2, verbose=0,
                  shuffle=False, callbacks=[EMA(0.5), GradientMonitor()])
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.keras")
            model.save(path)
            reloaded = keras.models.load_model(path)
        self.assertIsInstance(reloaded.optimizer, keras.optimizers.Adam)
        self.assertNotIsInstance(reloaded.optimizer, OptimizerWrapper)
        self.assertAllClose(reloaded.predict(self.x, verbose=0),
                            model.predict(self.x, verbose=0))
        inner = model.optimizer.inner_optimizer.inner_optimizer
        self.assertIsInstance(inner, keras.optimizers.Adam)
        self.assertNotIsInstance(inner, OptimizerWrapper)
        for a, b in zip(reloaded.optimizer.variables, inner.variables):
            self.assertAllEqual(a, b)
        # Both go on as the plain Adam (the wrappers left in the original
        # model measure and average nothing now).
        for m in (model, reloaded):
            m.fit(self.x, self.y, batch_size=16, epochs=1, verbose=0,
                  shuffle=False)
        for a, b in zip(model.get_weights(), reloaded.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)


class RetrainScheduleTest(_Setup):
    def test_restart_with_a_schedule_equals_a_fresh_fit(self):
        # Phase 2 restarts the optimizer too: a schedule starts again at
        # step 0 and Adam's moments at zero, so phase 2 ends where a fresh
        # model trained on the full data for best_epoch + 1 epochs ends.
        def optimizer():
            return ClippedOptimizer(keras.optimizers.Adam(
                keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.7)),
                clipnorm=0.5)

        yv = self.xv @ np.array([[0.7], [-1.4], [0.35]], "float32")
        x_full = np.concatenate([self.x, self.xv])
        y_full = np.concatenate([self.y, yv])
        model = _model()
        model.compile(optimizer(), "mse")
        stop = EarlyStopping(patience=1, restore_best_weights=True)
        retrain = RetrainOnFullData(x_full, y_full, batch_size=16,
                                    shuffle=False)
        model.fit(self.x, self.y, batch_size=16, epochs=20, shuffle=False,
                  verbose=0, validation_data=(self.xv, yv),
                  callbacks=[GradientMonitor(), stop, retrain])
        self.assertGreater(stop.best_epoch, 0)
        fresh = _model()
        fresh.compile(optimizer(), "mse")
        fresh.fit(x_full, y_full, batch_size=16, shuffle=False, verbose=0,
                  epochs=stop.best_epoch + 1)
        for a, b in zip(model.get_weights(), fresh.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)
