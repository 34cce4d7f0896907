"""EMA with Keras's checkpoint callbacks: ModelCheckpoint, BackupAndRestore,
and Keras's own EarlyStopping(restore_best_weights=True)."""

import os
import tempfile
import warnings

import keras
import numpy as np

from kreg.callbacks import EMA
from kreg.callbacks import ModelCheckpoint
from kreg.testing import TestCase
from tests.callbacks.helpers import Interrupt


def data(n, seed):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(4, 2))).astype("float32")
    return x, y


class EMACheckpointTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = data(48, 0)
        xv, yv = data(16, 1)
        # Opposite-sign validation targets: val_loss soon rises, so the best
        # epoch is not the last one.
        self.val = (xv, -yv)
        self.folder = tempfile.TemporaryDirectory()
        self.addCleanup(self.folder.cleanup)

    def path(self, name):
        return os.path.join(self.folder.name, name)

    def model(self):
        keras.utils.set_random_seed(5)
        model = keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(2),
        ])
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
                      loss="mse")
        return model

    def fit(self, model, callbacks, epochs=4):
        return model.fit(self.x, self.y, batch_size=8, epochs=epochs,
                         shuffle=False, verbose=0, callbacks=callbacks,
                         validation_data=self.val)

    def test_checkpoints_hold_weights_of_best_logged_val_loss(self):
        weights_file = self.path("best.weights.h5")
        keras_file = self.path("best.keras")
        model = self.model()
        ema = EMA(decay=0.7, keep_averaged=False)
        keras_stop = keras.callbacks.EarlyStopping(
            patience=10, restore_best_weights=True
        )
        callbacks = [
            # Before and after the EMA in the list: both see the averaged
            # weights at epoch end.
            keras.callbacks.ModelCheckpoint(
                weights_file, monitor="val_loss", save_best_only=True,
                save_weights_only=True,
            ),
            keras_stop,
            ema,
            keras.callbacks.ModelCheckpoint(
                keras_file, monitor="val_loss", save_best_only=True,
            ),
        ]
        history = self.fit(model, callbacks)
        val_loss = history.history["val_loss"]
        best = min(val_loss)
        self.assertLess(int(np.argmin(val_loss)), len(val_loss) - 1)

        fresh = self.model()
        fresh.load_weights(weights_file)
        self.assertAllClose(
            fresh.evaluate(*self.val, batch_size=8, verbose=0), best,
                            rtol=1e-5)
        loaded = keras.models.load_model(keras_file)
        # A plain model: the file holds no shadow copy nor step count.
        self.assertEqual(len(loaded.weights), len(model.weights))
        self.assertAllClose(
            loaded.evaluate(*self.val, batch_size=8, verbose=0), best,
                            rtol=1e-5)
        # Keras's EarlyStopping kept the averaged weights of the best epoch,
        # and the EMA (keep_averaged=False) did not overwrite them.
        self.assertAllClose(
            model.evaluate(*self.val, batch_size=8, verbose=0), best,
                            rtol=1e-5)

    def uninterrupted(self):
        """A 4-epoch fit with an EMA: what a resumed fit must reproduce."""
        model = self.model()
        full = EMA(decay=0.8)
        history = self.fit(model, [full])
        final = [self.to_numpy(v) for v in model.weights]
        with full.raw_weights():
            raw = [self.to_numpy(v) for v in model.weights]
        return full, history, final, raw

    def assert_resumed_at_epoch_2(self, model, resumed, history, expected):
        full, full_history, final, raw = expected
        self.assertEqual(resumed.steps, full.steps)
        self.assertAllClose(history.history["val_loss"],
                            full_history.history["val_loss"][2:], rtol=1e-5)
        for a, b in zip(model.weights, final):
            self.assertAllClose(a, b, atol=1e-6)
        with resumed.raw_weights():
            for a, b in zip(model.weights, raw):
                self.assertAllClose(a, b, atol=1e-6)

    def test_backup_and_restore_resumes_shadow_and_raw_weights(self):
        expected = self.uninterrupted()

        backup = self.path("backup")
        # The EMA listed before BackupAndRestore (its on_train_begin runs
        # before the weights are loaded) and validation on: the backup's
        # weights file holds the averaged weights, the EMA's the raw ones.
        model = self.model()
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            self.fit(model, [EMA(decay=0.8, backup_dir=backup),
                             keras.callbacks.BackupAndRestore(backup),
                             Interrupt(2)])
        model = self.model()
        resumed = EMA(decay=0.8, backup_dir=backup)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "error", message=r"(kreg\.callbacks\.)?EMA:")
            history = self.fit(model, [resumed,
                                       keras.callbacks.BackupAndRestore(backup)])
        self.assert_resumed_at_epoch_2(model, resumed, history, expected)
        self.assertFalse(os.path.exists(backup))

    def test_model_checkpoint_resumes_average_and_raw_weights(self):
        expected = self.uninterrupted()
        full_history = expected[1]

        for pattern in ("e{epoch}.keras", "e{epoch}.weights.h5"):
            weights_only = pattern.endswith(".weights.h5")
            with self.subTest(pattern=pattern):
                model = self.model()
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    self.fit(model, [
                        EMA(decay=0.8),
                        ModelCheckpoint(self.path(pattern),
                                        save_weights_only=weights_only),
                        Interrupt(2),
                    ])
                file = self.path(pattern.format(epoch=2))
                if weights_only:
                    model = self.model()
                    model.optimizer.build(model.trainable_variables)
                    model.load_weights(file)
                else:
                    model = keras.models.load_model(file)
                # The file holds the averaged weights of epoch 2 (index 1).
                self.assertAllClose(
                    model.evaluate(*self.val, batch_size=8, verbose=0),
                    full_history.history["val_loss"][1], rtol=1e-5)
                resumed = EMA(decay=0.8, resume_from=file)
                history = model.fit(
                    self.x, self.y, batch_size=8, epochs=4, initial_epoch=2,
                    shuffle=False, verbose=0, callbacks=[resumed],
                    validation_data=self.val)
                self.assert_resumed_at_epoch_2(model, resumed, history,
                                               expected)
                # The state stays beside the checkpoint, as the file does.
                self.assertTrue(os.path.exists(file + ".kreg"))

    def test_state_follows_a_file_saved_again_with_the_same_mtime(self):
        # A file system with coarse timestamps: the file is overwritten
        # every epoch, and its modification time does not change.
        class CoarseTimes(keras.Sequential):
            def save(self, filepath, *args, **kwargs):
                stamp = (os.stat(filepath).st_mtime_ns
                         if os.path.exists(filepath) else None)
                super().save(filepath, *args, **kwargs)
                if stamp is not None:
                    os.utime(filepath, ns=(stamp, stamp))

        def coarse_model():
            model = CoarseTimes(self.model().layers)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            return model

        file = self.path("last.keras")
        self.fit(coarse_model(), [EMA(decay=0.8), ModelCheckpoint(file)],
                 epochs=3)
        resumed = EMA(decay=0.8, resume_from=file)
        coarse_model().fit(self.x, self.y, batch_size=8, epochs=4,
                           initial_epoch=3, shuffle=False, verbose=0,
                           callbacks=[resumed])
        # 6 batches per epoch: the state of epoch 3, then one more epoch.
        self.assertEqual(resumed.steps, 4 * 6)

    def test_resume_from_a_file_without_state_raises(self):
        file = self.path("plain.keras")
        model = self.model()
        self.fit(model, [keras.callbacks.ModelCheckpoint(file)], epochs=1)
        with self.assertRaisesRegex(ValueError, "resume_from="):
            self.fit(model, [EMA(resume_from=file)], epochs=1)

    def test_resume_without_state_warns(self):
        backup = self.path("backup")
        model = self.model()
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            self.fit(model, [keras.callbacks.BackupAndRestore(backup), EMA(),
                             Interrupt(1)], epochs=2)
        model = self.model()
        with self.assertWarnsRegex(UserWarning, "average restarts"):
            self.fit(model, [keras.callbacks.BackupAndRestore(backup), EMA()],
                     epochs=2)
