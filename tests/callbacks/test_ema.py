import os
import unittest

import keras
import numpy as np

from kreg.callbacks import EMA
from kreg.callbacks import EarlyStopping
from kreg.testing import TestCase
from tests.callbacks.helpers import Interrupt
from tests.callbacks.helpers import InterruptBatch
from tests.callbacks.helpers import backup_pairing


def data(n=48, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(4, 2)))).astype("float32")
    return x, y


class RecordBatchWeights(keras.callbacks.Callback):
    """Trainable weights after every batch (syncing JAX's state first)."""

    def on_train_begin(self, logs=None):
        self.initial = [np.array(v) for v in self._trainable()]
        self.after_batch = []

    def on_train_batch_end(self, batch, logs=None):
        self.after_batch.append([np.array(v) for v in self._trainable()])

    def _trainable(self):
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        return [keras.ops.convert_to_numpy(v.value)
                for v in self.model.trainable_variables]


def numpy_ema(initial, trajectory, decay, warmup_power=None):
    shadow = [w.astype("float64") for w in initial]
    for t, weights in enumerate(trajectory, start=1):
        d = decay
        if warmup_power is not None:
            d = min(decay, 1.0 - t ** (-warmup_power))
        shadow = [d * s + (1 - d) * w for s, w in zip(shadow, weights)]
    return shadow


class EMATest(TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = data()
        self.xv, self.yv = data(16, seed=1)

    # Compile without XLA by default (fast on TensorFlow); the subclass
    # below runs every test again with the XLA-compiled train step.
    jit_default = False

    def model(self, seed=5, bn=False, jit=None, steps_per_execution=1,
              accumulation=None):
        if jit is None:
            jit = self.jit_default
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((4,)), keras.layers.Dense(8, activation="tanh")]
        if bn:
            layers.append(keras.layers.BatchNormalization(momentum=0.5))
        layers.append(keras.layers.Dense(2))
        model = keras.Sequential(layers)
        optimizer = keras.optimizers.SGD(
            0.1, momentum=0.5, gradient_accumulation_steps=accumulation)
        model.compile(optimizer=optimizer, loss="mse",
                      jit_compile=jit and self.jit_compile_setting(),
                      steps_per_execution=steps_per_execution)
        return model

    def fit(self, model, callbacks, epochs=3, validation=True, **kwargs):
        return model.fit(
            self.x, self.y, batch_size=8, epochs=epochs, shuffle=False,
            verbose=0, callbacks=callbacks,
            validation_data=(self.xv, self.yv) if validation else None,
            **kwargs,
        )

    def test_matches_numpy_trajectory(self):
        for warmup in (False, True):
            with self.subTest(warmup=warmup):
                model = self.model(jit=True)
                record = RecordBatchWeights()
                ema = EMA(decay=0.8, warmup=warmup, keep_averaged=False)
                self.fit(model, [record, ema])
                self.assertEqual(len(record.after_batch), 18)
                self.assertEqual(ema.steps, 18)
                expected = numpy_ema(record.initial, record.after_batch, 0.8,
                                     2.0 / 3.0 if warmup else None)
                for s, e in zip(ema.shadow_variables, expected):
                    self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)
                # keep_averaged=False: the raw weights stay in the model.
                for w, raw in zip(model.trainable_variables,
                                  record.after_batch[-1]):
                    self.assertAllClose(w, raw)

    def test_gradient_accumulation(self):
        # SGD(gradient_accumulation_steps=3): the weights change at every
        # third batch, and only those steps are averaged.
        model = self.model(accumulation=3)
        record = RecordBatchWeights()
        ema = EMA(decay=0.8, keep_averaged=False)
        self.fit(model, [record, ema])
        self.assertEqual(len(record.after_batch), 18)
        for a, b in zip(record.after_batch[0], record.initial):
            self.assertAllEqual(a, b)  # accumulated, not applied
        self.assertEqual(ema.steps, 6)
        expected = numpy_ema(record.initial, record.after_batch[2::3], 0.8)
        for s, e in zip(ema.shadow_variables, expected):
            self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)

    def test_interrupted_predict_leaves_nothing_swapped(self):
        # Keras calls no end hook after an exception in predict/evaluate:
        # the raw weights the EMA swapped out go back in at the EMA's next
        # use, and the next fit trains on from them.
        class Fail(keras.callbacks.Callback):
            def on_predict_batch_end(self, batch, logs=None):
                raise RuntimeError("interrupted")

            on_test_batch_end = on_predict_batch_end

        if keras.backend.backend() == "jax":
            self.skipTest("Keras on JAX leaves the model's variables "
                          "purged after an exception in predict")
        for method in ("predict", "evaluate"):
            with self.subTest(method=method):
                model = self.model()
                ema = EMA(decay=0.9, keep_averaged=False)
                self.fit(model, [ema], validation=False)
                raw = [self.to_numpy(v) for v in model.trainable_variables]
                averaged = [self.to_numpy(s) for s in ema.shadow_variables]
                args = ((self.xv,) if method == "predict"
                        else (self.xv, self.yv))
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    getattr(model, method)(*args, verbose=0,
                                           callbacks=[ema, Fail()])
                with ema.averaged_weights():
                    for v, a in zip(model.trainable_variables, averaged):
                        self.assertAllEqual(v, a)
                for v, r in zip(model.trainable_variables, raw):
                    self.assertAllEqual(v, r)
                # The same, when the next use is a fit: it starts from the
                # raw weights (from the EMA's on_train_begin on).
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    getattr(model, method)(*args, verbose=0,
                                           callbacks=[ema, Fail()])
                record = RecordBatchWeights()
                self.fit(model, [ema, record], epochs=1, validation=False)
                for w, r in zip(record.initial, raw):
                    self.assertAllEqual(w, r)

    def test_one_ema_per_fit(self):
        model = self.model()
        first, second = EMA(decay=0.9), EMA(decay=0.5)
        with self.assertRaisesRegex(ValueError, "One kreg.callbacks.EMA per"):
            self.fit(model, [first, second])
        # The averaging optimizer left around the model's optimizer does
        # not change training: a fit without them trains as a fresh model.
        self.fit(model, [], epochs=1)
        fresh = self.model()
        self.fit(fresh, [], epochs=1)
        for a, b in zip(model.get_weights(), fresh.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)

    def test_an_optimizer_that_averages_too_is_refused(self):
        model = self.model()
        model.compile(keras.optimizers.Adam(use_ema=True), loss="mse")
        before = model.get_weights()
        with self.assertRaisesRegex(ValueError, r"use_ema=True.*twice"):
            self.fit(model, [EMA(decay=0.9)])
        for a, b in zip(model.get_weights(), before):
            self.assertAllEqual(a, b)  # refused before any step
        self.assertIsInstance(model.optimizer, keras.optimizers.Adam)

    def test_another_models_predict_is_refused(self):
        model = self.model()
        ema = EMA(decay=0.9, keep_averaged=False)
        self.fit(model, [ema], validation=False)
        other = self.model()
        with self.assertRaisesRegex(ValueError, "averages the weights of"):
            other.predict(self.xv, verbose=0, callbacks=[ema])
        # A model sharing the fitted model's layers shares its weights:
        # it predicts with the averaged ones.
        features = keras.Model(model.inputs, model.layers[0].output)
        with ema.averaged_weights():
            expected = features.predict(self.xv, verbose=0)
        self.assertAllClose(
            features.predict(self.xv, verbose=0, callbacks=[ema]), expected)

    def test_steps_per_execution(self):
        # Several steps per compiled call (callbacks see every third
        # batch): the average still takes every optimizer step, as with
        # one step per call (checked against NumPy above).
        if keras.backend.backend() == "torch":
            self.skipTest("Keras's PyTorch trainer runs one step per call")
        runs = {}
        for steps in (1, 3):
            model = self.model(steps_per_execution=steps)
            ema = EMA(decay=0.8, keep_averaged=False)
            history = self.fit(model, [ema])
            runs[steps] = model, ema, history
        (model1, ema1, history1), (model3, ema3, history3) = runs[1], runs[3]
        self.assertEqual(ema3.steps, 18)
        for a, b in zip(ema3.shadow_variables, ema1.shadow_variables):
            self.assertAllClose(a, b, atol=1e-6)
        for a, b in zip(model3.get_weights(), model1.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)
        self.assertAllClose(history3.history["val_loss"],
                            history1.history["val_loss"], rtol=1e-5)

    def test_a_fresh_ema_per_fit_reuses_the_train_step(self):
        # As users write it: a new EMA in every fit. The averaging optimizer
        # is put in once; later fits keep the train function (no new
        # trace or compilation), with each EMA's own decay.
        model = self.model()
        self.fit(model, [EMA(decay=0.9, keep_averaged=False)], epochs=1,
                 validation=False)
        train_function = model.train_function
        optimizer = model.optimizer
        for decay, warmup in ((0.5, False), (0.8, True)):
            record = RecordBatchWeights()
            ema = EMA(decay=decay, warmup=warmup, keep_averaged=False)
            self.fit(model, [record, ema], epochs=1)
            self.assertIs(model.train_function, train_function)
            self.assertIs(model.optimizer, optimizer)
            expected = numpy_ema(record.initial, record.after_batch, decay,
                                 2.0 / 3.0 if warmup else None)
            for s, e in zip(ema.shadow_variables, expected):
                self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)
        # A fit without an EMA: the average left alone, and the weights as
        # in four fits of the same model without an EMA.
        before = [self.to_numpy(s) for s in ema.shadow_variables]
        self.fit(model, [], epochs=1, validation=False)
        reference = self.model()
        for _ in range(4):
            self.fit(reference, [], epochs=1, validation=False)
        for a, b in zip(model.get_weights(), reference.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)
        self.assertEqual(ema.steps, 6)
        for a, b in zip(ema.shadow_variables, before):
            self.assertAllEqual(a, b)

    def test_steps_of_a_later_phase_before_train_end_not_averaged(self):
        # A callback listed before the EMA trains on in its on_train_end
        # (as RetrainOnFullData does): those optimizer steps come after
        # this fit's last batch, before the EMA's on_train_end, and are
        # not this average's; the fit's last step is (also when nothing
        # read the average at the end of the last epoch).
        x, y = self.x, self.y

        class TrainOn(keras.callbacks.Callback):
            def on_train_end(self, logs=None):
                self.model.fit(x[:24], y[:24], batch_size=8, epochs=1,
                               verbose=0)

        for validation in (True, False):
            with self.subTest(validation=validation):
                model = self.model()
                record = RecordBatchWeights()
                ema = EMA(decay=0.8, keep_averaged=False,
                          validate_with_averaged=validation)
                self.fit(model, [record, TrainOn(), ema], epochs=2,
                         validation=validation)
                self.assertEqual(int(self.to_numpy(
                    model.optimizer.iterations)), 12 + 3)
                self.assertEqual(ema.steps, 12)
                expected = numpy_ema(record.initial, record.after_batch, 0.8)
                for s, e in zip(ema.shadow_variables, expected):
                    self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)

    def test_validation_uses_averaged_weights_and_kept_at_end(self):
        model = self.model()
        ema = EMA(decay=0.9)
        history = self.fit(model, [ema], epochs=2)
        # The model now holds the averaged weights: its loss is the
        # validation loss logged after the last epoch.
        self.assertAllClose(model.evaluate(self.xv, self.yv, batch_size=8,
                                           verbose=0),
                            history.history["val_loss"][-1], rtol=1e-5)
        with ema.raw_weights():
            raw_loss = model.evaluate(self.xv, self.yv, verbose=0)
        self.assertNotAlmostEqual(raw_loss, history.history["val_loss"][-1],
                                  places=4)
        # Not validating with averages: logs describe the raw weights.
        model = self.model()
        ema = EMA(decay=0.9, validate_with_averaged=False, keep_averaged=False)
        history = self.fit(model, [ema], epochs=2)
        self.assertAllClose(model.evaluate(self.xv, self.yv, batch_size=8,
                                           verbose=0),
                            history.history["val_loss"][-1], rtol=1e-5)

    def test_swap_in_out_exact_and_nothing_left_after_predict(self):
        model = self.model()
        ema = EMA(decay=0.9, keep_averaged=False)
        self.fit(model, [ema], validation=False)
        raw = [self.to_numpy(v) for v in model.trainable_variables]
        averaged = [self.to_numpy(s) for s in ema.shadow_variables]
        with ema.averaged_weights():
            for v, a in zip(model.trainable_variables, averaged):
                self.assertAllEqual(v, a)
            inside = model.predict(self.xv, verbose=0)
        for v, r in zip(model.trainable_variables, raw):
            self.assertAllEqual(v, r)
        # As a predict/evaluate callback: averaged inside, raw after.
        self.assertAllClose(model.predict(self.xv, verbose=0,
                                          callbacks=[ema]), inside)
        model.evaluate(self.xv, self.yv, verbose=0, callbacks=[ema])
        for v, r in zip(model.trainable_variables, raw):
            self.assertAllEqual(v, r)

    def test_batch_norm_statistics_choice(self):
        for average in (False, True):
            with self.subTest(average_non_trainable=average):
                model = self.model(bn=True)
                ema = EMA(decay=0.5, average_non_trainable=average,
                          keep_averaged=False)
                self.fit(model, [ema], validation=False)
                stats = list(model.non_trainable_variables)
                current = [self.to_numpy(v) for v in stats]
                with ema.averaged_weights():
                    swapped = [self.to_numpy(v) for v in stats]
                same = all(np.array_equal(a, b)
                           for a, b in zip(current, swapped))
                self.assertEqual(same, not average)

    def test_early_stopping_restores_best_averaged_weights(self):
        stop = EarlyStopping(patience=1, restore_best_weights=True)
        ema = EMA(decay=0.7)
        # EMA listed first and last: both orders must keep the best weights.
        for callbacks in ([ema, stop], [stop, ema]):
            with self.subTest(order=[type(c).__name__ for c in callbacks]):
                model = self.model()
                # Validation targets of the opposite sign: the validation
                # loss soon rises, so training stops early.
                history = model.fit(
                    self.x, self.y, batch_size=8, epochs=8, shuffle=False,
                    verbose=0, callbacks=callbacks,
                    validation_data=(self.xv, -self.yv),
                )
                best = min(history.history["val_loss"])
                self.assertAllClose(stop.best, best)
                self.assertAllClose(
                    model.evaluate(self.xv, -self.yv, batch_size=8,
                                   verbose=0), best,
                    rtol=1e-5,
                )

    def test_early_stopping_on_training_loss_restores_raw_weights(self):
        class RecordEpochWeights(keras.callbacks.Callback):
            # Listed first: sees the raw weights at each epoch's end.
            def on_train_begin(self, logs=None):
                self.weights = []

            def on_epoch_end(self, epoch, logs=None):
                self.weights.append(self.model.get_weights())

        for order in ("ema first", "stop first"):
            with self.subTest(order=order):
                stop = EarlyStopping(monitor="loss", patience=10,
                                     restore_best_weights=True)
                ema = EMA(decay=0.7)
                record = RecordEpochWeights()
                callbacks = [record, ema, stop]
                if order == "stop first":
                    callbacks = [record, stop, ema]
                model = self.model()
                history = self.fit(model, callbacks, epochs=4,
                                   validation=False)
                best = int(np.argmin(history.history["loss"]))
                self.assertEqual(stop.best_epoch, best)
                for w, raw in zip(model.get_weights(), record.weights[best]):
                    self.assertAllClose(w, raw, atol=1e-6)
                # ... which differ from the averaged ones.
                self.assertGreater(
                    max(np.max(np.abs(self.to_numpy(s) - r)) for s, r in
                        zip(ema.shadow_variables, record.weights[best])),
                    1e-4,
                )

    def test_reuse_restarts_from_current_weights(self):
        model = self.model()
        ema = EMA(decay=0.9)
        self.fit(model, [ema], epochs=1, validation=False)
        record = RecordBatchWeights()
        ema.keep_averaged = False
        self.fit(model, [record, ema], epochs=1, validation=False)
        expected = numpy_ema(record.initial, record.after_batch, 0.9)
        self.assertEqual(ema.steps, 6)
        for s, e in zip(ema.shadow_variables, expected):
            self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)

    def test_get_state_set_state_continue_the_average(self):
        # A state taken after one fit and set into a new EMA (whose shadow
        # starts at that fit's end) continues the NumPy trajectory.
        model = self.model()
        record = RecordBatchWeights()
        first = EMA(decay=0.8, keep_averaged=False)
        self.fit(model, [record, first], epochs=1, validation=False)
        state = first.get_state()
        self.assertEqual(state["steps"], 6)
        trajectory = list(record.after_batch)
        initial = record.initial

        class Restore(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                second.set_state(state)

        second = EMA(decay=0.8, keep_averaged=False)
        self.fit(model, [record, second, Restore()], epochs=1,
                 validation=False)
        self.assertEqual(second.steps, 12)
        expected = numpy_ema(initial, trajectory + record.after_batch, 0.8)
        for s, e in zip(second.shadow_variables, expected):
            self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)
        bad = dict(state, shadow=state["shadow"][:-1])
        with self.assertRaisesRegex(ValueError, "shapes"):
            second.set_state(bad)

    def test_resume_after_interruption(self):
        model = self.model()
        full = EMA(decay=0.8, keep_averaged=False)
        self.fit(model, [full], epochs=4, validation=False)
        for kind in ("keras", "kreg"):
            with self.subTest(pairing=kind), backup_pairing(kind) as pairing:
                backup = pairing.backup
                callbacks = pairing.callbacks

                def ema():
                    return EMA(decay=0.8, keep_averaged=False,
                               backup_dir=pairing.backup_dir)

                model = self.model()
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    self.fit(model, callbacks(ema(), Interrupt(2)), epochs=4,
                             validation=False)
                self.assertTrue(os.path.exists(
                    os.path.join(backup, "kreg_ema.npz")))
                model = self.model()
                second = ema()
                self.fit(model, callbacks(second), epochs=4, validation=False)
                self.assertEqual(second.steps, full.steps)
                for a, b in zip(second.shadow_variables,
                                full.shadow_variables):
                    self.assertAllClose(a, b, atol=1e-6)

    def test_interrupted_fit_keeps_its_steps(self):
        model = self.model()
        ema = EMA(decay=0.8, keep_averaged=False)
        self.fit(model, [ema], epochs=1, validation=False)
        self.assertEqual(ema.steps, 6)
        # An exception in the middle of an epoch: the steps taken are
        # averaged, and the next fit with the EMA starts a new average.
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            self.fit(model, [ema, InterruptBatch(2)], epochs=1,
                     validation=False)
        self.assertEqual(ema.steps, 2)
        record = RecordBatchWeights()
        self.fit(model, [record, ema], epochs=1, validation=False)
        self.assertEqual(ema.steps, 6)
        expected = numpy_ema(record.initial, record.after_batch, 0.8)
        for s, e in zip(ema.shadow_variables, expected):
            self.assertAllClose(s, e, atol=1e-5, rtol=1e-5)

    def test_bad_arguments_and_config(self):
        for kwargs, error, text in [
            (dict(decay=1.0), ValueError, "decay=1.0"),
            (dict(decay=-0.1), ValueError, "decay=-0.1"),
            (dict(decay="x"), TypeError, "decay='x'"),
            (dict(warmup=1), TypeError, "warmup=1"),
            (dict(warmup_power=0), ValueError, "warmup_power=0"),
            (dict(keep_averaged=None), TypeError, "keep_averaged=None"),
            (dict(resume_from=3), TypeError, "resume_from=3"),
        ]:
            with self.subTest(kwargs=kwargs):
                with self.assertRaisesRegex(error, text):
                    EMA(**kwargs)
        with self.assertRaisesRegex(ValueError, "pass it to `model.fit`"):
            EMA().swap_in()
        self.run_config_round_trip(EMA(decay=0.9, warmup=True))


@unittest.skipUnless(keras.backend.backend() in ("jax", "tensorflow"),
                     "XLA-compiled train steps")
class EMAFusedStepTest(EMATest):
    """Every EMA test with the update inside the XLA-compiled train step."""

    jit_default = True
