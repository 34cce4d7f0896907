"""A step that ClippedOptimizer skips (non-finite gradients) leaves every
piece of training state as it was: the weights, BatchNormalization's moving
statistics, the inner optimizer's `iterations` and moments, and the shadow
and step count of an EMA in the same fit."""

import unittest

import keras
import numpy as np

import kreg
from kreg.optimizers import ClippedOptimizer
from kreg.testing import TestCase
from kreg.testing import mirrored_strategy

BATCH_SIZE = 8
BAD_ROW = 17  # in batch 2 of 5
BAD_BATCH = BAD_ROW // BATCH_SIZE
MOMENTUM = 0.9


def data():
    rng = np.random.RandomState(0)
    x = rng.randn(40, 5).astype("float32")
    y = np.eye(3, dtype="float32")[rng.randint(0, 3, 40)]
    return x, y


def without_bad_batch(array):
    start = BAD_BATCH * BATCH_SIZE
    return np.concatenate([array[:start], array[start + BATCH_SIZE:]])


def compiled_model(synchronized=False):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8),
        kreg.layers.BatchNormalization(momentum=MOMENTUM,
                                       synchronized=synchronized),
        keras.layers.Dense(3),
    ])
    model.compile(
        optimizer=ClippedOptimizer(keras.optimizers.Adam(0.01),
                                   global_clipnorm=1.0),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    return model


def adam(model):
    """The Adam inside the model's chain of wrappers."""
    optimizer = model.optimizer
    while not isinstance(optimizer, keras.optimizers.Adam):
        optimizer = optimizer.inner_optimizer
    return optimizer


def clipped(model):
    optimizer = model.optimizer
    while not isinstance(optimizer, ClippedOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def numpy_values(values):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in values]


class StateAroundBatch(keras.callbacks.Callback):
    """Records the training state when batch `batch` begins and when the
    next one begins (after the EMA's per-batch work for it)."""

    def __init__(self, batch, ema):
        super().__init__()
        self.batch = batch
        self.ema = ema
        self.states = {}

    def on_train_batch_begin(self, batch, logs=None):
        if batch in (self.batch, self.batch + 1):
            model = self.model  # syncs JAX's state before a read
            counters = clipped(model)
            self.states[batch] = {
                "weights": numpy_values(model.weights),
                "adam": numpy_values(adam(model).variables),
                "ema_shadow": numpy_values(self.ema.shadow_variables),
                "ema_steps": self.ema.steps,
                "seen": int(keras.ops.convert_to_numpy(counters.seen_steps)),
                "skipped": int(
                    keras.ops.convert_to_numpy(counters.skipped_steps)),
                "grad_norm_sum": float(
                    keras.ops.convert_to_numpy(counters.grad_norm_sum)),
            }

    def before_and_after(self):
        return self.states[self.batch], self.states[self.batch + 1]


class TestCaseWithState(TestCase):
    def assert_same(self, actual, expected, what):
        self.assertEqual(len(actual), len(expected), what)
        for i, (a, b) in enumerate(zip(actual, expected)):
            self.assertAllEqual(a, b, msg=f"{what} {i}")

    def fit_recording(self, x, y):
        model = compiled_model()
        ema = kreg.callbacks.EMA(decay=0.9, average_non_trainable=True)
        recorder = StateAroundBatch(BAD_BATCH, ema)
        model.fit(x, y, batch_size=BATCH_SIZE, shuffle=False, verbose=0,
                  callbacks=[ema, recorder])
        return model, ema, recorder.before_and_after()


class IssueReproTest(TestCase):
    def test_nan_input_batch_gives_finite_statistics_and_predictions(self):
        # The issue's example as written.
        m = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8),
                              kreg.layers.BatchNormalization(),
                              keras.layers.Dense(3)])
        m.compile(
            kreg.optimizers.ClippedOptimizer(keras.optimizers.Adam(),
                                             global_clipnorm=1.0),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.randn(40, 5).astype("f4")
        x[17, 2] = np.nan
        history = m.fit(x, np.zeros(40, int), batch_size=8, shuffle=False,
                        verbose=0,
                        callbacks=[kreg.callbacks.GradientMonitor()])
        self.assertEqual(history.history["skipped_steps"], [1])
        self.assertEqual(int(self.to_numpy(m.optimizer.skipped_steps)), 1)
        self.assertEqual(int(self.to_numpy(m.optimizer.iterations)), 4)
        bn = m.layers[1]
        for statistic in (bn.moving_mean, bn.moving_variance):
            self.assertTrue(np.all(np.isfinite(self.to_numpy(statistic))))
        fresh = np.random.RandomState(1).randn(16, 5).astype("f4")
        self.assertTrue(np.all(np.isfinite(m.predict(fresh, verbose=0))))


class SkippedStepTest(TestCaseWithState):
    def setUp(self):
        super().setUp()
        self.x, self.y = data()

    def test_same_state_as_a_fit_without_the_bad_batch(self):
        x = self.x.copy()
        x[BAD_ROW, 2] = np.nan
        poisoned, poisoned_ema, _ = self.fit_recording(x, self.y)
        reference, reference_ema, _ = self.fit_recording(
            without_bad_batch(self.x), without_bad_batch(self.y))
        self.assertEqual(int(self.to_numpy(poisoned.optimizer.iterations)),
                         4)
        self.assertEqual(int(self.to_numpy(
            clipped(poisoned).skipped_steps)), 1)
        self.assertEqual(poisoned_ema.steps, 4)
        self.assertEqual(reference_ema.steps, 4)
        self.assert_same(poisoned_ema.raw_model_weights(),
                         reference_ema.raw_model_weights(), "raw weight")
        self.assert_same(poisoned_ema.averaged_model_weights(),
                         reference_ema.averaged_model_weights(),
                         "averaged weight")
        self.assert_same(numpy_values(adam(poisoned).variables),
                         numpy_values(adam(reference).variables),
                         "Adam variable")

    def test_nan_input_step_changes_nothing(self):
        x = self.x.copy()
        x[BAD_ROW, 2] = np.nan
        _, _, (before, after) = self.fit_recording(x, self.y)
        self.assert_same(after["weights"], before["weights"], "weight")
        self.assert_same(after["adam"], before["adam"], "Adam variable")
        self.assert_same(after["ema_shadow"], before["ema_shadow"],
                         "EMA shadow")
        self.assertEqual(after["ema_steps"], before["ema_steps"])
        # The counters report the skip; the sum behind the mean `grad_norm`
        # of the logs counts applied steps only.
        self.assertEqual(after["seen"], before["seen"] + 1)
        self.assertEqual(after["skipped"], before["skipped"] + 1)
        self.assertEqual(after["grad_norm_sum"], before["grad_norm_sum"])

    def test_nan_label_step_keeps_the_batch_statistics_only(self):
        # The forward pass is finite, the loss is not: the step is skipped,
        # BatchNormalization keeps the batch's (finite) statistics.
        y = self.y.copy()
        y[BAD_ROW, 0] = np.nan
        model, _, (before, after) = self.fit_recording(self.x, y)
        names = [w.path for w in model.weights]
        statistics = [i for i, name in enumerate(names)
                      if "moving_" in name]
        self.assertEqual(len(statistics), 2)
        others = [i for i in range(len(names)) if i not in statistics]
        self.assert_same([after["weights"][i] for i in others],
                         [before["weights"][i] for i in others], "weight")
        self.assert_same(after["adam"], before["adam"], "Adam variable")
        self.assert_same(after["ema_shadow"], before["ema_shadow"],
                         "EMA shadow")
        self.assertEqual(after["ema_steps"], before["ema_steps"])
        self.assertEqual(after["skipped"], before["skipped"] + 1)
        # The moving statistics: one update with the batch's statistics
        # under the (unchanged) Dense weights, by hand in NumPy.
        kernel, bias = before["weights"][0], before["weights"][1]
        start = BAD_BATCH * BATCH_SIZE
        hidden = (self.x[start:start + BATCH_SIZE].astype("float64")
                  @ kernel + bias)
        old_mean, old_variance = (before["weights"][i] for i in statistics)
        self.assertAllClose(
            after["weights"][statistics[0]],
            MOMENTUM * old_mean + (1 - MOMENTUM) * hidden.mean(0),
            atol=1e-6, rtol=1e-5)
        self.assertAllClose(
            after["weights"][statistics[1]],
            MOMENTUM * old_variance + (1 - MOMENTUM) * hidden.var(0),
            atol=1e-6, rtol=1e-5)

    def test_mixed_float16(self):
        # compile wraps the ClippedOptimizer in a LossScaleOptimizer, which
        # skips the NaN step itself (and lowers its scale).
        x = self.x.copy()
        x[BAD_ROW, 2] = np.nan
        with self.mixed_precision("mixed_float16"):
            model = compiled_model()
            model.fit(x, self.y, batch_size=BATCH_SIZE, shuffle=False,
                      verbose=0)
            self.assertEqual(int(self.to_numpy(model.optimizer.iterations)),
                             4)
            for weight in model.weights:
                self.assertTrue(np.all(np.isfinite(self.to_numpy(weight))),
                                weight.path)
            predictions = model.predict(self.x, verbose=0)
        self.assertTrue(np.all(np.isfinite(self.to_numpy(predictions))))


@unittest.skipUnless(keras.backend.backend() == "tensorflow",
                     "tf.distribute is TensorFlow only")
class MirroredStrategySkippedStepTest(TestCaseWithState):
    def test_same_state_as_a_fit_without_the_bad_batch(self):
        x, y = data()
        poisoned_x = x.copy()
        poisoned_x[BAD_ROW, 2] = np.nan
        strategy = mirrored_strategy()
        results = []
        for xs, ys in [(poisoned_x, y),
                       (without_bad_batch(x), without_bad_batch(y))]:
            with strategy.scope():
                model = compiled_model(synchronized=True)
            ema = kreg.callbacks.EMA(decay=0.9)
            model.fit(xs, ys, batch_size=BATCH_SIZE, shuffle=False,
                      verbose=0, callbacks=[ema])
            results.append((model, ema))
        (poisoned, poisoned_ema), (reference, reference_ema) = results
        self.assertEqual(int(self.to_numpy(
            clipped(poisoned).skipped_steps)), 1)
        self.assertEqual(poisoned_ema.steps, reference_ema.steps)
        for a, b in zip(poisoned_ema.raw_model_weights(),
                        reference_ema.raw_model_weights()):
            self.assertAllClose(a, b, atol=1e-6)
        for a, b in zip(poisoned_ema.averaged_model_weights(),
                        reference_ema.averaged_model_weights()):
            self.assertAllClose(a, b, atol=1e-6)
        for a, b in zip(numpy_values(adam(poisoned).variables),
                        numpy_values(adam(reference).variables)):
            self.assertAllClose(a, b, atol=1e-6)
