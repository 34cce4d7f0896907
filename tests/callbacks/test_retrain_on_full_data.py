import warnings

import keras
import numpy as np
import pytest

from kreg.callbacks import EMA, EarlyStopping, RetrainOnFullData
from kreg.testing import TestCase


def data(n, seed):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    return x, y


class RecordStart(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = self.model.get_weights()
        self.iterations = int(keras.ops.convert_to_numpy(
            self.model.optimizer.iterations.value))


class RetrainTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = data(48, 0)
        self.xv, _ = data(16, 1)
        # Validation targets partly off the training relation: the
        # validation loss falls, then rises (see test_early_stopping).
        self.yv = (self.xv @ np.array([[0.7], [-1.4], [0.35]])).astype(
            "float32")
        self.x_full = np.concatenate([self.x, self.xv])
        self.y_full = np.concatenate([self.y, self.yv])

    def model(self, jit=False):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.02, momentum=0.5),
                      loss="mse", jit_compile=jit and self.jit_compile_setting())
        return model

    def fit(self, model, callbacks, validation=True, epochs=30):
        return model.fit(
            self.x, self.y, batch_size=16, epochs=epochs, shuffle=False,
            verbose=0, callbacks=callbacks,
            validation_data=(self.xv, self.yv) if validation else None,
        )

    def test_restart_default_runs_best_epoch_plus_one_from_initial(self):
        model = self.model(jit=True)
        initial = model.get_weights()
        start = RecordStart()
        stop = EarlyStopping(patience=2, restore_best_weights=True)
        retrain = RetrainOnFullData(self.x_full, self.y_full, batch_size=16,
                                    callbacks=[start])
        # RetrainOnFullData listed first: order must not matter.
        history = self.fit(model, [retrain, stop])
        self.assertGreater(stop.best_epoch, 0)
        self.assertEqual(retrain.retrain_epochs, stop.best_epoch + 1)
        for a, b in zip(start.weights, initial):
            self.assertAllEqual(a, b)
        self.assertEqual(start.iterations, 0)  # fresh optimizer state
        phase = history.history["phase"]
        phase1 = stop.stopped_epoch + 1
        self.assertEqual(phase, [1] * phase1 + [2] * (stop.best_epoch + 1))
        self.assertEqual(len(history.history["loss"]), len(phase))
        self.assertTrue(np.all(np.isnan(history.history["val_loss"][phase1:])))
        self.assertIs(model.history, history)
        self.assertEqual(len(retrain.retrain_history.epoch),
                         retrain.retrain_epochs)

    def test_with_an_ema_in_each_phase(self):
        # README's example: one EMA averages phase 1, another phase 2, with
        # the compiled train step (where the EMA is fused into it).
        for order in ("ema first", "ema last"):
            with self.subTest(order=order):
                model = self.model(jit=True)
                original = (model.make_train_function()
                            or model.train_function)
                outer, inner = EMA(decay=0.8), EMA(decay=0.8)
                stop = EarlyStopping(patience=2, restore_best_weights=True)
                retrain = RetrainOnFullData(self.x_full, self.y_full,
                                            batch_size=16, callbacks=[inner])
                callbacks = [outer, stop, retrain]
                if order == "ema last":
                    callbacks = [retrain, stop, outer]
                history = self.fit(model, callbacks)
                phase1 = stop.stopped_epoch + 1
                self.assertEqual(outer.steps, 3 * phase1)  # 48 / 16
                self.assertEqual(retrain.retrain_epochs, stop.best_epoch + 1)
                self.assertEqual(inner.steps, 4 * retrain.retrain_epochs)
                self.assertEqual(history.history["phase"].count(2),
                                 retrain.retrain_epochs)
                # Phase 2's averaged weights are what the model keeps.
                for w, s in zip(model.trainable_variables,
                                inner.shadow_variables):
                    self.assertAllClose(w, s, atol=1e-6)
                self.assertIs(model.train_function, original)

    def test_warns_without_the_batch_size_of_array_data(self):
        for batch_size in (None, 16):
            with self.subTest(batch_size=batch_size):
                stop = EarlyStopping(patience=2)
                retrain = RetrainOnFullData(self.x_full, self.y_full,
                                            batch_size=batch_size)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    self.fit(self.model(), [stop, retrain])
                told = [w for w in caught
                        if "RetrainOnFullData: no `batch_size`"
                        in str(w.message)]
                self.assertEqual(len(told), 1 if batch_size is None else 0)

    def test_restart_lengths_and_dataset(self):
        tf = pytest.importorskip("tensorflow")
        # 3 train batches of 16 per epoch, 4 full batches of 16 per epoch.
        for length in ("steps", "scaled"):
            with self.subTest(length=length):
                stop = EarlyStopping(patience=2)
                dataset = tf.data.Dataset.from_tensor_slices(
                    (self.x_full, self.y_full)).batch(16)
                retrain = RetrainOnFullData(dataset, length=length)
                self.fit(self.model(), [stop, retrain])
                n = stop.best_epoch + 1
                expected = (max(1, round(n * 3 / 4)) if length == "steps"
                            else int(np.ceil(n * 4 / 3)))
                self.assertEqual(retrain.retrain_epochs, expected)

    def test_continue_until_validation_part_below_training_loss(self):
        stop = EarlyStopping(patience=2, restore_best_weights=True)
        retrain = RetrainOnFullData(
            self.x_full, self.y_full, algorithm="continue", batch_size=16,
            validation_data=(self.xv, self.yv), max_epochs=5,
        )
        model = self.model()
        history = self.fit(model, [stop, retrain])
        target = history.history["loss"][stop.best_epoch]
        final = model.evaluate(self.xv, self.yv, verbose=0)
        self.assertLessEqual(retrain.retrain_epochs, 5)
        if retrain.retrain_epochs < 5:
            self.assertLess(final, target)
        if retrain.retrain_epochs > 1:
            # It did not stop before the condition held.
            part = retrain.retrain_history.history["val_part_loss"]
            self.assertTrue(all(v >= target for v in part[:-1]))

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "algorithm='magic'"):
            RetrainOnFullData(self.x_full, self.y_full, algorithm="magic")
        with self.assertRaisesRegex(ValueError, "validation_data=None"):
            RetrainOnFullData(self.x_full, self.y_full, algorithm="continue")
        with self.assertRaisesRegex(ValueError, "needs a kreg.callbacks"):
            self.fit(self.model(), [RetrainOnFullData(self.x_full,
                                                      self.y_full)], epochs=2)
        with self.assertRaisesRegex(ValueError, "no validation data"):
            self.fit(self.model(), [
                EarlyStopping(monitor="loss"),
                RetrainOnFullData(self.x_full, self.y_full)],
                validation=False, epochs=2)
        with self.assertRaisesRegex(ValueError, "does not match"):
            self.fit(self.model(), [
                EarlyStopping(),
                RetrainOnFullData(self.x_full[:, :2], self.y_full)], epochs=2)
        with self.assertRaisesRegex(ValueError, "samples"):
            self.fit(self.model(), [
                EarlyStopping(),
                RetrainOnFullData(self.x_full, self.y_full[:5])], epochs=2)
