import os
import tempfile
import warnings

import keras
import numpy as np
import pytest

from kreg.callbacks import EarlyStopping
from kreg.callbacks import ModelCheckpoint
from kreg.testing import TestCase
from tests.callbacks.helpers import Interrupt
from tests.callbacks.helpers import backup_pairing


def tiny_model(metrics=()):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse",
                  metrics=list(metrics))
    return model


def drive(callback, model, values, monitor="val_loss"):
    """Runs the callback's hooks with synthetic logs; returns epochs run."""
    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin()
    run = 0
    for epoch, value in enumerate(values):
        # Mark the weights with the epoch so restoring can be checked.
        model.set_weights([np.full_like(w, epoch) for w in model.get_weights()])
        callback.on_epoch_end(epoch, {monitor: value, "other": 0.0})
        run += 1
        if model.stop_training:
            break
    callback.on_train_end()
    return run


SEQUENCES = [
    [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.7, 0.9],
    [1.0, 1.0, 1.0, 1.0, 1.0],
    [0.5, 0.6, 0.4, 0.41, 0.399, 0.398, 0.5, 0.6, 0.7],
    [3.0, 2.0, 1.0, 0.5, 0.25],
    [0.2, 0.3, 0.4, 0.1, 0.5, 0.6, 0.05, 0.7, 0.8, 0.9],
]
SETTINGS = [
    dict(),
    dict(patience=1),
    dict(patience=2, min_delta=0.05),
    dict(patience=2, min_delta=-0.05),  # |min_delta| as in Keras
    dict(patience=1, baseline=0.45),
    dict(patience=3, baseline=0.1),
    dict(patience=1, start_from_epoch=2),
    dict(patience=2, mode="max"),
    dict(patience=0, mode="max", baseline=0.5),
    dict(patience=2, restore_best_weights=True),
    dict(patience=1, restore_best_weights=True, baseline=0.45),
    dict(patience=1, restore_best_weights=True, start_from_epoch=3),
]


class SyntheticLogsTest(TestCase):
    """Same decisions as keras.callbacks.EarlyStopping on the same logs."""

    def test_matches_keras_builtin(self):
        for values in SEQUENCES:
            for settings in SETTINGS:
                with self.subTest(values=values, settings=settings):
                    keras_cb = keras.callbacks.EarlyStopping(**settings)
                    ours = EarlyStopping(**settings)
                    model = tiny_model()
                    run_keras = drive(keras_cb, model, values)
                    keras_weights = model.get_weights()
                    run_ours = drive(ours, model, values)
                    self.assertEqual(run_ours, run_keras)
                    self.assertEqual(ours.stopped_epoch, keras_cb.stopped_epoch)
                    self.assertEqual(ours.best, keras_cb.best)
                    self.assertEqual(ours.wait, keras_cb.wait)
                    self.assertEqual(ours.best_epoch, keras_cb.best_epoch)
                    for a, b in zip(model.get_weights(), keras_weights):
                        self.assertAllEqual(a, b)

    def test_hand_computed_min_mode(self):
        # Best 0.8 at epoch 2; epochs 3, 4 do not improve: stop at 4.
        cb = EarlyStopping(patience=2)
        run = drive(cb, tiny_model(), [1.0, 0.9, 0.8, 0.85, 0.86, 0.1])
        self.assertEqual(run, 5)
        self.assertEqual((cb.best_epoch, cb.best, cb.stopped_epoch),
                         (2, 0.8, 4))

    def test_hand_computed_max_mode_min_delta(self):
        # Improvements must exceed 0.1: 0.55 (ep 1) and 0.58 (ep 2) do not.
        cb = EarlyStopping(monitor="val_accuracy", patience=2, min_delta=0.1,
                           mode="max")
        run = drive(cb, tiny_model(), [0.5, 0.55, 0.58, 0.9], "val_accuracy")
        self.assertEqual(run, 3)
        self.assertEqual((cb.best_epoch, cb.best, cb.stopped_epoch),
                         (0, 0.5, 2))

    def test_baseline_never_beaten_restores_best_of_patience_window(self):
        cb = EarlyStopping(patience=3, baseline=0.1, restore_best_weights=True)
        model = tiny_model()
        run = drive(cb, model, [0.5, 0.3, 0.4, 0.6, 0.0])
        self.assertEqual(run, 3)
        self.assertEqual(cb.best_epoch, 1)
        self.assertAllEqual(model.get_weights()[0], np.ones((3, 1)))

    def test_start_from_epoch_ignores_warmup(self):
        cb = EarlyStopping(patience=0, start_from_epoch=3)
        run = drive(cb, tiny_model(), [0.1, 0.5, 0.9, 1.0, 1.1, 1.2])
        self.assertEqual((run, cb.best_epoch, cb.stopped_epoch), (5, 3, 4))

    def test_restore_when_epochs_run_out(self):
        cb = EarlyStopping(patience=10, restore_best_weights=True)
        model = tiny_model()
        run = drive(cb, model, [0.9, 0.3, 0.5, 0.6])
        self.assertEqual((run, cb.stopped_epoch, cb.best_epoch), (4, 0, 1))
        self.assertAllEqual(model.get_weights()[0], np.ones((3, 1)))

    def test_auto_mode_directions(self):
        model = tiny_model(metrics=["accuracy", "mae"])
        model.fit(np.zeros((4, 3)), np.zeros((4, 1)), verbose=0)
        up = EarlyStopping(monitor="val_accuracy", patience=0)
        drive(up, model, [0.1, 0.2, 0.3], "val_accuracy")
        self.assertEqual(up.best, 0.3)
        down = EarlyStopping(monitor="val_mae", patience=0)
        drive(down, model, [0.3, 0.2, 0.1], "val_mae")
        self.assertEqual(down.best, 0.1)
        unknown = EarlyStopping(monitor="val_mystery")
        with self.assertRaisesRegex(ValueError, "mode='max'"):
            drive(unknown, model, [0.3], "val_mystery")

    def test_missing_monitor_with_a_mode_warns_as_keras(self):
        for mode in ("min", "max"):
            with self.subTest(mode=mode):
                ours = EarlyStopping(monitor="val_nothing", mode=mode)
                keras_cb = keras.callbacks.EarlyStopping(
                    monitor="val_nothing", mode=mode)
                with pytest.warns(UserWarning, match="val_nothing"):
                    run = drive(ours, tiny_model(), [0.5, 0.4],
                                monitor="val_loss")
                with pytest.warns(UserWarning, match="val_nothing"):
                    run_keras = drive(keras_cb, tiny_model(), [0.5, 0.4],
                                      monitor="val_loss")
                self.assertEqual(run, run_keras)
                self.assertEqual((run, ours.best_epoch, ours.best),
                                 (2, None, None))

    def test_mistyped_monitor_in_auto_mode_raises_at_first_epoch_end(self):
        # Keras 3.15.1 raises at the end of the first epoch (it cannot tell
        # the direction of a name that is neither a loss nor a metric of
        # the model), also during start_from_epoch's warm-up.
        for settings in (dict(), dict(start_from_epoch=3)):
            with self.subTest(**settings):
                keras_cb = keras.callbacks.EarlyStopping(monitor="val_los",
                                                         **settings)
                with self.assertRaises(ValueError):
                    drive(keras_cb, tiny_model(), [0.5, 0.4])
                ours = EarlyStopping(monitor="val_los", **settings)
                epochs = []

                class Count(keras.callbacks.Callback):
                    def on_epoch_end(self, epoch, logs=None):
                        epochs.append(epoch)

                model = tiny_model()
                with self.assertRaisesRegex(
                        ValueError, "monitor='val_los'.*not logged.*"
                        "val_loss.*mode='min'"):
                    model.fit(np.zeros((8, 3)), np.zeros((8, 1)), epochs=3,
                              validation_split=0.25, verbose=0,
                              callbacks=[ours, Count()])
                self.assertEqual(epochs, [])  # the first epoch's end

    def test_one_element_array_as_keras(self):
        # A metric of one output unit (F1Score, FBetaScore) logs shape (1,).
        for settings in SETTINGS:
            with self.subTest(settings=settings):
                values = [np.array([v], "float32") for v in SEQUENCES[0]]
                keras_cb = keras.callbacks.EarlyStopping(**settings)
                ours = EarlyStopping(**settings)
                model = tiny_model()
                run_keras = drive(keras_cb, model, values)
                keras_weights = model.get_weights()
                run_ours = drive(ours, model, values)
                self.assertEqual(run_ours, run_keras)
                self.assertEqual(ours.stopped_epoch, keras_cb.stopped_epoch)
                self.assertEqual(ours.best_epoch, keras_cb.best_epoch)
                self.assertEqual(ours.wait, keras_cb.wait)
                if keras_cb.best is not None:
                    self.assertEqual(ours.best, float(keras_cb.best[0]))
                for a, b in zip(model.get_weights(), keras_weights):
                    self.assertAllEqual(a, b)

    def test_several_values_is_an_error_naming_the_monitor(self):
        cb = EarlyStopping(monitor="val_f1_score", mode="max")
        with self.assertRaisesRegex(ValueError, "val_f1_score.*shape "
                                    r"\(3,\).*average="):
            drive(cb, tiny_model(), [np.array([0.1, 0.2, 0.3])],
                  monitor="val_f1_score")

    def test_state_round_trip(self):
        cb = EarlyStopping(patience=3, restore_best_weights=True)
        drive(cb, tiny_model(), [0.5, 0.4, 0.45])
        other = EarlyStopping(patience=3, restore_best_weights=True)
        other.set_state(cb.get_state())
        self.assertEqual(other.get_state()["best_epoch"], 1)
        self.assertEqual(other.wait, cb.wait)
        self.assertAllEqual(other.best_weights[0], cb.best_weights[0])

    def test_bad_arguments(self):
        cases = [
            (dict(patience=-1), ValueError, "patience=-1"),
            (dict(patience=1.5), TypeError, "patience=1.5"),
            (dict(mode="up"), ValueError, "mode='up'"),
            (dict(min_delta="x"), TypeError, "min_delta='x'"),
            (dict(min_delta=float("inf")), ValueError, "min_delta=inf"),
            (dict(min_delta=float("nan")), ValueError, "min_delta=nan"),
            (dict(baseline="x"), TypeError, "baseline='x'"),
            (dict(restore_best_weights=1), TypeError,
             "restore_best_weights=1"),
            (dict(start_from_epoch=-2), ValueError, "start_from_epoch=-2"),
            (dict(monitor=3), TypeError, "monitor=3"),
            (dict(resume_from=3), TypeError, "resume_from=3"),
            (dict(backup_dir=b"x"), TypeError, "backup_dir=b'x'"),
        ]
        for kwargs, error, text in cases:
            with self.subTest(kwargs=kwargs):
                with self.assertRaisesRegex(error, text):
                    EarlyStopping(**kwargs)

    def test_numpy_numbers_are_accepted(self):
        cb = EarlyStopping(patience=np.int64(2), verbose=np.int32(0),
                           start_from_epoch=np.int16(1),
                           min_delta=np.float32(0.5), baseline=np.float64(1))
        self.assertEqual((cb.patience, cb.start_from_epoch), (2, 1))
        self.assertIs(type(cb.patience), int)
        self.assertEqual(cb.min_delta, 0.5)
        self.run_config_round_trip(cb)

    def test_config_round_trip(self):
        cb = EarlyStopping(monitor="val_mae", patience=4, baseline=0.5,
                           restore_best_weights=True, start_from_epoch=2)
        self.run_config_round_trip(cb)


def regression_data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3 * rng.normal(size=(n, 1)))
    return x, y.astype("float32")


class RecordWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


class FitTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = regression_data()
        # A validation set whose loss goes down then up (overfitting-like):
        # targets shifted away from the training relation.
        self.xv, _ = regression_data(32, seed=1)
        self.yv = (self.xv @ np.array([[0.7], [-1.4], [0.35]])).astype(
            "float32")

    def model(self, jit=False):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse",
                      jit_compile=jit and self.jit_compile_setting())
        return model

    def fit(self, model, callbacks, epochs=30, initial_epoch=0):
        return model.fit(self.x, self.y, batch_size=16, epochs=epochs,
                         shuffle=False, verbose=0, callbacks=callbacks,
                         validation_data=(self.xv, self.yv),
                         initial_epoch=initial_epoch)

    def test_same_stop_as_keras_and_restores_best(self):
        keras_cb = keras.callbacks.EarlyStopping(patience=2)
        ref = self.fit(self.model(jit=True), [keras_cb])
        record = RecordWeights()
        cb = EarlyStopping(patience=2, restore_best_weights=True)
        model = self.model()
        history = self.fit(model, [cb, record])
        val = history.history["val_loss"]
        self.assertLess(len(val), 30, "should stop early")
        self.assertEqual(cb.stopped_epoch, keras_cb.stopped_epoch)
        self.assertEqual(cb.best_epoch, int(np.argmin(val)))
        self.assertAllClose(cb.best, min(val))
        self.assertAllClose(ref.history["val_loss"], val, atol=1e-6)
        for a, b in zip(model.get_weights(), record.weights[cb.best_epoch]):
            self.assertAllClose(a, b)
        self.assertAllClose(model.evaluate(self.xv, self.yv, batch_size=16,
                                           verbose=0),
                            min(val), rtol=1e-5)

    def test_f1_score_of_one_output_unit_as_keras(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(64, 3)).astype("float32")
        y = (x[:, :1] + rng.normal(size=(64, 1)) > 0).astype("float32")

        def fit(callback):
            keras.utils.set_random_seed(1)
            model = keras.Sequential([keras.Input((3,)),
                                      keras.layers.Dense(1, "sigmoid")])
            model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy",
                          metrics=[keras.metrics.F1Score(threshold=0.5)])
            history = model.fit(x[:48], y[:48], validation_data=(x[48:],
                                                                 y[48:]),
                                epochs=20, batch_size=16, shuffle=False,
                                verbose=0, callbacks=[callback])
            return history, model.get_weights()

        keras_cb = keras.callbacks.EarlyStopping(
            monitor="val_f1_score", patience=2, restore_best_weights=True)
        ours = EarlyStopping(monitor="val_f1_score", patience=2,
                             restore_best_weights=True)
        keras_history, keras_weights = fit(keras_cb)
        self.assertEqual(np.shape(keras_history.history["val_f1_score"][0]),
                         (1,))
        history, weights = fit(ours)
        self.assertEqual(len(history.epoch), len(keras_history.epoch))
        self.assertEqual(ours.stopped_epoch, keras_cb.stopped_epoch)
        self.assertEqual(ours.best_epoch, keras_cb.best_epoch)
        self.assertAllClose(ours.best, np.squeeze(keras_cb.best))
        for a, b in zip(weights, keras_weights):
            self.assertAllClose(a, b)

    def test_restore_when_running_out_and_reuse(self):
        cb = EarlyStopping(patience=100, restore_best_weights=True)
        record = RecordWeights()
        model = self.model()
        history = self.fit(model, [cb, record], epochs=12)
        val = history.history["val_loss"]
        self.assertEqual(len(val), 12)
        self.assertEqual(cb.stopped_epoch, 0)
        self.assertEqual(cb.best_epoch, int(np.argmin(val)))
        self.assertLess(cb.best_epoch, 11)
        for a, b in zip(model.get_weights(), record.weights[cb.best_epoch]):
            self.assertAllClose(a, b)
        # A second fit starts afresh.
        history = self.fit(model, [cb], epochs=3)
        self.assertEqual(cb.best_epoch,
                         int(np.argmin(history.history["val_loss"])))

    def assert_same_stop(self, model, second, history, full, ref_weights,
                         cut):
        """A fit resumed at epoch `cut` stopped as the uninterrupted one
        (`full`, which left `ref_weights`)."""
        self.assertEqual(len(history.history["loss"]),
                         full.stopped_epoch + 1 - cut)
        self.assertEqual(second.stopped_epoch, full.stopped_epoch)
        self.assertEqual(second.best_epoch, full.best_epoch)
        self.assertAllClose(second.best, full.best, rtol=1e-6)
        for a, b in zip(model.get_weights(), ref_weights):
            self.assertAllClose(a, b, atol=1e-6)

    def test_resume_after_interruption_gives_same_result(self):
        full = EarlyStopping(patience=2, restore_best_weights=True)
        model = self.model()
        self.fit(model, [full])
        stop = full.stopped_epoch
        self.assertGreater(stop, 3)
        ref_weights = model.get_weights()
        for kind in ("keras", "kreg"):
            with self.subTest(pairing=kind), backup_pairing(kind) as pairing:
                backup = pairing.backup
                callbacks = pairing.callbacks

                def early_stopping():
                    return EarlyStopping(patience=2, restore_best_weights=True,
                                         backup_dir=pairing.backup_dir)

                # Interrupt after the best epoch so that the best weights
                # and the wait counter must come back from the backup.
                cut = stop - 1
                model = self.model()
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    self.fit(model, callbacks(early_stopping(), Interrupt(cut)))
                self.assertTrue(os.path.exists(
                    os.path.join(backup, "kreg_early_stopping.npz")))
                model = self.model()
                second = early_stopping()
                history = self.fit(model, callbacks(second))
                self.assertFalse(os.path.exists(
                    os.path.join(backup, "kreg_early_stopping.npz")))
                self.assert_same_stop(model, second, history, full,
                                      ref_weights, cut)

    def test_model_checkpoint_file_resumes_the_state(self):
        full = EarlyStopping(patience=2, restore_best_weights=True)
        model = self.model()
        self.fit(model, [full])
        stop = full.stopped_epoch
        ref_weights = model.get_weights()
        # Resumed at the stopping epoch from the file of the epoch before,
        # which is after the best one: best value and weights and the wait
        # counter must all come back.
        cut = stop
        self.assertLess(full.best_epoch, cut - 1)
        with tempfile.TemporaryDirectory() as folder:
            pattern = os.path.join(folder, "e{epoch}.keras")
            model = self.model()
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                # The checkpoint listed first: the state beside the file is
                # still the one after the epoch was counted.
                self.fit(model, [
                    ModelCheckpoint(pattern),
                    EarlyStopping(patience=2, restore_best_weights=True),
                    Interrupt(cut)])
            file = pattern.format(epoch=cut)
            model = keras.models.load_model(file)
            second = EarlyStopping(patience=2, restore_best_weights=True,
                                   resume_from=file)
            history = self.fit(model, [second], initial_epoch=cut)
            self.assert_same_stop(model, second, history, full, ref_weights,
                                  cut)
            with self.assertRaisesRegex(ValueError, "resume_from="):
                self.fit(model, [EarlyStopping(
                    resume_from=os.path.join(folder, "none.keras"))])

    def two_stops(self, backup_dir=None, resume_from=None):
        """One EarlyStopping on val_loss that stops, one on loss that
        does not: different states."""
        return (EarlyStopping(patience=2, restore_best_weights=True,
                              backup_dir=backup_dir, resume_from=resume_from),
                EarlyStopping(monitor="loss", patience=50,
                              backup_dir=backup_dir, resume_from=resume_from))

    def assert_same_states(self, got, expected):
        for a, b in zip(got, expected):
            self.assertEqual(a.stopped_epoch, b.stopped_epoch)
            self.assertEqual(a.best_epoch, b.best_epoch)
            self.assertAllClose(a.best, b.best, rtol=1e-6)
            self.assertEqual(a.wait, b.wait)

    def test_two_early_stoppings_resume_their_own_states(self):
        full = self.two_stops()
        self.fit(self.model(), list(full))
        cut = full[0].stopped_epoch - 1
        self.assertGreater(cut, full[0].best_epoch)
        for kind in ("keras", "kreg"):
            with self.subTest(pairing=kind), backup_pairing(kind) as pairing:
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    self.fit(self.model(), pairing.callbacks(
                        *self.two_stops(pairing.backup_dir), Interrupt(cut)))
                second = self.two_stops(pairing.backup_dir)
                self.fit(self.model(), pairing.callbacks(*second))
                self.assert_same_states(second, full)
        with tempfile.TemporaryDirectory() as folder:
            pattern = os.path.join(folder, "e{epoch}.keras")
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                self.fit(self.model(), [ModelCheckpoint(pattern),
                                        *self.two_stops(), Interrupt(cut)])
            file = pattern.format(epoch=cut)
            second = self.two_stops(resume_from=file)
            self.fit(keras.models.load_model(file), list(second),
                     initial_epoch=cut)
            self.assert_same_states(second, full)

    def test_state_of_another_epoch_warns(self):
        with tempfile.TemporaryDirectory() as folder:
            pattern = os.path.join(folder, "e{epoch}.keras")
            self.fit(self.model(), [ModelCheckpoint(pattern),
                                    EarlyStopping(patience=50)], epochs=3)
            file = pattern.format(epoch=2)  # after epochs 0 and 1
            for initial_epoch, warns in ((2, False), (1, True)):
                with self.subTest(initial_epoch=initial_epoch):
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        self.fit(keras.models.load_model(file), [
                            EarlyStopping(patience=50, resume_from=file)],
                            epochs=3, initial_epoch=initial_epoch)
                    told = [w for w in caught
                            if "has counted 2 epochs" in str(w.message)]
                    self.assertEqual(len(told), int(warns))
