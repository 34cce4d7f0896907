import os
import pathlib
import tempfile
import warnings

import keras
import numpy as np
import pytest

from kreg.callbacks import EMA
from kreg.callbacks import BackupAndRestore
from kreg.callbacks import EarlyStopping
from kreg.callbacks import ModelCheckpoint
from kreg.callbacks import RetrainOnFullData
from kreg.testing import TestCase
from tests.callbacks.helpers import Interrupt
from tests.callbacks.helpers import backup_pairing


def data(n, seed):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    return x, y


def optimizer_values(model):
    return [keras.ops.convert_to_numpy(v.value)
            for v in model.optimizer.variables]


class RecordStart(keras.callbacks.Callback):
    """The weights and optimizer state a (phase-2) fit starts from."""

    def on_train_begin(self, logs=None):
        self.weights = self.model.get_weights()
        self.iterations = int(keras.ops.convert_to_numpy(
            self.model.optimizer.iterations.value))
        self.optimizer = optimizer_values(self.model)


class RetrainData:
    """Data, model and fit of the tests below (a mixin for TestCase)."""

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
                      loss="mse",
                      jit_compile=jit and self.jit_compile_setting())
        return model

    def assert_phase_2_from_initial(self, stop, retrain, start, initial):
        """Phase 2 ran best_epoch + 1 epochs from the `initial` weights,
        with a fresh optimizer (step counter 0)."""
        self.assertGreater(stop.best_epoch, 0)
        self.assertEqual(retrain.retrain_epochs, stop.best_epoch + 1)
        for a, b in zip(start.weights, initial):
            self.assertAllEqual(a, b)
        self.assertEqual(start.iterations, 0)

    def fit(self, model, callbacks, validation=True, epochs=30, **kwargs):
        return model.fit(
            self.x, self.y, batch_size=16, epochs=epochs, shuffle=False,
            verbose=0, callbacks=callbacks,
            validation_data=(self.xv, self.yv) if validation else None,
            **kwargs,
        )


class RetrainTest(RetrainData, TestCase):
    def test_restart_default_runs_best_epoch_plus_one_from_initial(self):
        model = self.model(jit=True)
        initial = model.get_weights()
        start = RecordStart()
        stop = EarlyStopping(patience=2, restore_best_weights=True)
        retrain = RetrainOnFullData(self.x_full, self.y_full, batch_size=16,
                                    callbacks=[start])
        # RetrainOnFullData listed first: order must not matter.
        history = self.fit(model, [retrain, stop])
        self.assert_phase_2_from_initial(stop, retrain, start, initial)
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
        # the compiled train step (the update is part of it): phase 2
        # reuses phase 1's train function.
        class TrainFunction(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                self.function = self.model.train_function

        for order in ("ema first", "ema last"):
            with self.subTest(order=order):
                model = self.model(jit=True)
                outer, inner = EMA(decay=0.8), EMA(decay=0.8)
                seen1, seen2 = TrainFunction(), TrainFunction()
                stop = EarlyStopping(patience=2, restore_best_weights=True)
                retrain = RetrainOnFullData(
                    self.x_full, self.y_full, batch_size=16,
                    callbacks=[inner, seen2])
                callbacks = [outer, stop, seen1, retrain]
                if order == "ema last":
                    callbacks = [retrain, stop, seen1, outer]
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
                self.assertIs(seen2.function, seen1.function)

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
        with self.assertRaisesRegex(TypeError, "shuffle='yes'"):
            RetrainOnFullData(self.x_full, self.y_full, shuffle="yes")
        with self.assertRaisesRegex(TypeError, "backup_dir=3"):
            RetrainOnFullData(self.x_full, self.y_full, backup_dir=3)
        with self.assertRaisesRegex(TypeError, "resume_from=3"):
            RetrainOnFullData(self.x_full, self.y_full, resume_from=3)
        with self.assertRaisesRegex(ValueError, "resume_from="):
            self.fit(self.model(), [EarlyStopping(), RetrainOnFullData(
                self.x_full, self.y_full, resume_from="none.keras")],
                epochs=2)
        # A pathlib path is a path.
        self.assertEqual(RetrainOnFullData(
            self.x_full, self.y_full, backup_dir=pathlib.Path("b")
        ).backup_dir, "b")
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


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


class RetrainResumeTest(RetrainData, TestCase):
    """An interrupted two-phase fit, run again, ends as an uninterrupted one:
    phase 1 resumed keeps the initial weights and the logged epochs; phase 2
    resumed does not train phase 1 again."""

    def run_both(self, outer=(), inner=(), algorithm="restart",
                 backup_dir=None, epochs=30, model=None, resume_from=None):
        model = model or self.model()
        stop = EarlyStopping(patience=2, restore_best_weights=True,
                             backup_dir=backup_dir)
        # "continue" with a validation part whose loss stays above the best
        # training loss: phase 2 runs to its cap.
        kwargs = dict(validation_data=(self.xv, 2 * self.yv),
                      max_epochs=4) if algorithm == "continue" else {}
        retrain = RetrainOnFullData(
            self.x_full, self.y_full, batch_size=16, algorithm=algorithm,
            callbacks=list(inner), backup_dir=backup_dir, shuffle=False,
            resume_from=resume_from, **kwargs)
        history = self.fit(model, [stop, retrain, *outer], epochs=epochs)
        return model, stop, retrain, history

    def assert_same_run(self, got, expected):
        model, stop, retrain, history = got
        model0, stop0, retrain0, history0 = expected
        self.assertEqual(stop.best_epoch, stop0.best_epoch)
        self.assertEqual(stop.stopped_epoch, stop0.stopped_epoch)
        self.assertEqual(retrain.retrain_epochs, retrain0.retrain_epochs)
        self.assertEqual(history.history["phase"], history0.history["phase"])
        self.assertAllClose(history.history["loss"], history0.history["loss"],
                            rtol=1e-5)
        self.assertEqual(len(retrain.retrain_history.epoch),
                         retrain.retrain_epochs)
        for a, b in zip(model.get_weights(), model0.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)

    def test_interrupted_in_phase_1(self):
        for algorithm in ("restart", "continue"):
            expected = self.run_both(algorithm=algorithm)
            self.assertGreater(expected[1].stopped_epoch, 2)
            for kind in ("keras", "kreg"):
                with self.subTest(algorithm=algorithm, kind=kind), \
                        backup_pairing(kind) as pairing:
                    with self.assertRaisesRegex(RuntimeError, "interrupted"):
                        self.run_both(pairing.callbacks(Interrupt(2)),
                                      algorithm=algorithm,
                                      backup_dir=pairing.backup_dir)
                    got = self.run_both(pairing.callbacks(),
                                        algorithm=algorithm,
                                        backup_dir=pairing.backup_dir)
                    self.assert_same_run(got, expected)
                    self.assertFalse(os.path.exists(pairing.backup))

    def test_interrupted_in_phase_2(self):
        for algorithm in ("restart", "continue"):
            expected = self.run_both(algorithm=algorithm)
            self.assertGreater(expected[2].retrain_epochs, 2)
            for kind in ("keras", "kreg"):
                with self.subTest(algorithm=algorithm, kind=kind), \
                        backup_pairing(kind) as pairing:
                    with self.assertRaisesRegex(RuntimeError, "interrupted"):
                        self.run_both(pairing.callbacks(), inner=[Interrupt(2)],
                                      algorithm=algorithm,
                                      backup_dir=pairing.backup_dir)
                    outer, inner = CountBatches(), CountBatches()
                    got = self.run_both(pairing.callbacks(outer),
                                        inner=[inner], algorithm=algorithm,
                                        backup_dir=pairing.backup_dir)
                    self.assert_same_run(got, expected)
                    self.assertEqual(outer.batches, 0)  # no phase 1 again
                    # 4 batches of 16 per full-data epoch, from epoch 2 on.
                    self.assertEqual(inner.batches,
                                     4 * (expected[2].retrain_epochs - 2))
                    self.assertFalse(os.path.exists(pairing.backup))

    def test_phase_1_resumed_from_a_model_checkpoint_file(self):
        expected = self.run_both()
        cut = 2
        self.assertGreater(expected[1].stopped_epoch, cut)

        def callbacks(resume_from=None):
            return (
                EarlyStopping(patience=2, restore_best_weights=True,
                              resume_from=resume_from),
                RetrainOnFullData(self.x_full, self.y_full, batch_size=16,
                                  shuffle=False, resume_from=resume_from),
            )

        with tempfile.TemporaryDirectory() as folder:
            pattern = os.path.join(folder, "e{epoch}.keras")
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                # The checkpoint listed first: the state beside the file
                # is written once RetrainOnFullData has logged the epoch.
                self.fit(self.model(), [ModelCheckpoint(pattern),
                                        *callbacks(), Interrupt(cut)])
            file = pattern.format(epoch=cut)  # after epoch cut - 1
            model = keras.models.load_model(file)
            stop, retrain = callbacks(resume_from=file)
            history = self.fit(model, [stop, retrain], initial_epoch=cut)
            self.assert_same_run((model, stop, retrain, history), expected)
            self.assertEqual(history.epoch[:cut + 1], list(range(cut + 1)))
            # Without the state, phase 2 would not start from the initial
            # weights (and the earlier epochs' logs would be missing).
            model = keras.models.load_model(file)
            with self.assertWarnsRegex(UserWarning, "not the initial"):
                self.fit(model, list(callbacks()), initial_epoch=cut)

    def test_phase_2_resumed_from_a_model_checkpoint_file(self):
        for algorithm in ("restart", "continue"):
            expected = self.run_both(algorithm=algorithm)
            cut = 2
            self.assertGreater(expected[2].retrain_epochs, cut)
            with self.subTest(algorithm=algorithm), \
                    tempfile.TemporaryDirectory() as folder:
                pattern = os.path.join(folder, "phase2-{epoch}.keras")
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    # A checkpoint in phase 2 (listed before RetrainOnFull-
                    # Data's own phase-2 callbacks) writes its state.
                    self.run_both(inner=[ModelCheckpoint(pattern),
                                         Interrupt(cut)], algorithm=algorithm)
                file = pattern.format(epoch=cut)  # after phase-2 epoch cut-1
                outer, inner = CountBatches(), CountBatches()
                got = self.run_both(
                    [outer], [inner, ModelCheckpoint(pattern)],
                    algorithm=algorithm, resume_from=file,
                    model=keras.models.load_model(file))
                self.assert_same_run(got, expected)
                self.assertEqual(outer.batches, 0)  # no phase 1 again
                # 4 batches of 16 per full-data epoch, from epoch `cut` on.
                self.assertEqual(inner.batches,
                                 4 * (expected[2].retrain_epochs - cut))
                # The resumed fit's checkpoints carry the state on: from
                # the last one, no epoch is left to run.
                last = pattern.format(epoch=expected[2].retrain_epochs)
                inner = CountBatches()
                got = self.run_both(
                    inner=[inner], algorithm=algorithm, resume_from=last,
                    model=keras.models.load_model(last))
                self.assert_same_run(got, expected)
                self.assertEqual(inner.batches, 0)

    def test_phase_2_resume_refused_when_keras_backup_restores_phase_1(self):
        # Keras's BackupAndRestore in a folder of its own, listed after
        # RetrainOnFullData: its phase-1 backup outlives phase 1 and would
        # train phase 1 again; a clear error instead.
        with tempfile.TemporaryDirectory() as folder:
            own = os.path.join(folder, "retrain")
            keras_backup = os.path.join(folder, "keras")
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                self.run_both([keras.callbacks.BackupAndRestore(keras_backup)],
                              inner=[Interrupt(1)], backup_dir=own)
            with self.assertRaisesRegex(ValueError, "before RetrainOnFullData"):
                self.run_both([keras.callbacks.BackupAndRestore(keras_backup)],
                              backup_dir=own)

    def test_resumed_phase_1_without_saved_state_warns(self):
        with backup_pairing("keras") as pairing:
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                self.run_both(pairing.callbacks(Interrupt(2)))
            with self.assertWarnsRegex(UserWarning, "not the initial"):
                _, stop, retrain, history = self.run_both(pairing.callbacks())
            # Keras leaves the epoch the resumed fit began at on the model;
            # phase 2 still runs all its epochs.
            self.assertEqual(retrain.retrain_epochs, stop.best_epoch + 1)
            # The History holds the epochs logged, numbered as run.
            phase1 = history.history["phase"].count(1)
            self.assertEqual(history.epoch,
                             list(range(2, 2 + phase1))
                             + list(range(retrain.retrain_epochs)))
            self.assertFalse(np.any(np.isnan(history.history["loss"])))

    def test_interrupted_in_phase_2_with_an_ema_in_each_phase(self):
        # README's example, resumed: the outer EMA (phase 1) skips the
        # resumed fit's missing epochs; the inner one (phase 2) resumes its
        # average from phase 2's backup.
        def run(order, backup, interrupt):
            model = self.model(jit=True)
            outer, inner = EMA(decay=0.8), EMA(decay=0.8)
            stop = EarlyStopping(patience=2, restore_best_weights=True)
            retrain = RetrainOnFullData(
                self.x_full, self.y_full, batch_size=16, shuffle=False,
                callbacks=[inner] + ([Interrupt(2)] if interrupt else []))
            callbacks = [outer, stop, retrain]
            if order == "ema last":
                callbacks = [retrain, stop, outer]
            if backup is not None:
                callbacks.append(BackupAndRestore(backup))
            self.fit(model, callbacks)
            return model, inner, retrain

        model0, inner0, retrain0 = run("ema first", None, False)
        for order in ("ema first", "ema last"):
            with self.subTest(order=order), \
                    tempfile.TemporaryDirectory() as folder:
                backup = os.path.join(folder, "backup")
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    run(order, backup, True)
                with warnings.catch_warnings():
                    # Neither EMA restarts its average.
                    warnings.filterwarnings(
                        "error", message=r"(kreg\.callbacks\.)?EMA:")
                    model, inner, retrain = run(order, backup, False)
                self.assertEqual(retrain.retrain_epochs,
                                 retrain0.retrain_epochs)
                self.assertEqual(inner.steps, inner0.steps)
                for a, b in zip(model.get_weights(), model0.get_weights()):
                    self.assertAllClose(a, b, atol=1e-6)
                for w, s in zip(model.trainable_variables,
                                inner.shadow_variables):
                    self.assertAllClose(w, s, atol=1e-6)

    def test_phase_2_resumed_from_a_mid_epoch_checkpoint(self):
        # A checkpoint saved every 3 batches: the resumed fit runs the
        # epoch the file was saved in again, from the file's weights.
        expected = self.run_both()
        with tempfile.TemporaryDirectory() as folder:
            pattern = os.path.join(folder, "phase2-{epoch}-{batch}.keras")
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                self.run_both(inner=[ModelCheckpoint(pattern, save_freq=3),
                                     Interrupt(2)])
            # Phase-2 batches 3 and 6 of 4 per epoch: epoch 1, batch 2.
            file = pattern.format(epoch=2, batch=2)
            inner = CountBatches()
            _, stop, retrain, history = self.run_both(
                inner=[inner], resume_from=file,
                model=keras.models.load_model(file))
        self.assertEqual(retrain.retrain_epochs, expected[2].retrain_epochs)
        self.assertEqual(inner.batches, 4 * (retrain.retrain_epochs - 1))
        self.assertEqual(history.history["phase"],
                         expected[3].history["phase"])
        # Phase 2's epoch 0 was logged before the file, epoch 1 again now.
        phase2 = history.history["phase"].index(2)
        self.assertAllClose(history.history["loss"][:phase2 + 1],
                            expected[3].history["loss"][:phase2 + 1],
                            rtol=1e-5)

    def test_phase_2_resumed_from_a_checkpoint_with_an_ema(self):
        # The EMA of phase 2 resumes its average from beside the same file
        # (the file holds the averaged weights; the raw ones come back).
        def run(inner, resume_from=None, model=None):
            model = model or self.model(jit=True)
            retrain = RetrainOnFullData(
                self.x_full, self.y_full, batch_size=16, shuffle=False,
                callbacks=inner, resume_from=resume_from)
            stop = EarlyStopping(patience=2, restore_best_weights=True)
            self.fit(model, [EMA(decay=0.8), stop, retrain])
            return model, retrain

        ema0 = EMA(decay=0.8)
        model0, retrain0 = run([ema0])
        cut = 2
        self.assertGreater(retrain0.retrain_epochs, cut)
        with tempfile.TemporaryDirectory() as folder:
            pattern = os.path.join(folder, "phase2-{epoch}.keras")
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                run([EMA(decay=0.8), ModelCheckpoint(pattern),
                     Interrupt(cut)])
            file = pattern.format(epoch=cut)
            ema = EMA(decay=0.8, resume_from=file)
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "error", message=r"(kreg\.callbacks\.)?EMA:")
                model, retrain = run([ema], resume_from=file,
                                     model=keras.models.load_model(file))
        self.assertEqual(retrain.retrain_epochs, retrain0.retrain_epochs)
        self.assertEqual(ema.steps, ema0.steps)
        for a, b in zip(model.get_weights(), model0.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)
        for a, b in zip(ema.shadow_variables, ema0.shadow_variables):
            self.assertAllClose(a, b, atol=1e-6)
