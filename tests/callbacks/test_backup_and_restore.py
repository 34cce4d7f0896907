import os
import re
import tempfile

import keras
import numpy as np

from kreg.callbacks import BackupAndRestore
from kreg.testing import TestCase
from tests.callbacks.helpers import Interrupt


class BackupAndRestoreTest(TestCase):
    def test_next_fit_after_a_resumed_one_runs_all_its_epochs(self):
        # Keras's BackupAndRestore leaves the resumed epoch on the model:
        # the next fit, without any backup, would start at epoch 2 too.
        rng = np.random.RandomState(0)
        x = rng.normal(size=(16, 3)).astype("float32")
        y = x.sum(axis=1, keepdims=True)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        with tempfile.TemporaryDirectory() as folder:
            backup = os.path.join(folder, "backup")
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                model.fit(x, y, epochs=4, verbose=0,
                          callbacks=[BackupAndRestore(backup), Interrupt(2)])
            resumed = model.fit(x, y, epochs=4, verbose=0,
                                callbacks=[BackupAndRestore(backup)])
            self.assertEqual(resumed.epoch, [2, 3])
            self.assertFalse(os.path.exists(backup))
        history = model.fit(x, y, epochs=3, verbose=0)
        self.assertEqual(history.epoch, [0, 1, 2])

    def test_bad_arguments(self):
        cases = [
            (dict(save_freq=0), ValueError, "save_freq=0"),
            (dict(save_freq=-1), ValueError, "save_freq=-1"),
            (dict(save_freq=np.int64(-3)), ValueError,
             "save_freq=np.int64(-3)"),
            (dict(save_freq=True), TypeError, "save_freq=True"),
            (dict(save_freq=False), TypeError, "save_freq=False"),
            (dict(save_freq=2.0), TypeError, "save_freq=2.0"),
            (dict(save_freq="batch"), ValueError, "save_freq='batch'"),
            (dict(backup_dir=""), ValueError, "backup_dir=''"),
            (dict(backup_dir=3), TypeError, "backup_dir=3"),
            (dict(double_checkpoint="yes"), TypeError,
             "double_checkpoint='yes'"),
            (dict(delete_checkpoint=None), TypeError,
             "delete_checkpoint=None"),
        ]
        for kwargs, error, text in cases:
            with self.subTest(kwargs=kwargs):
                arguments = {"backup_dir": "/tmp/unused", **kwargs}
                with self.assertRaisesRegex(
                        error, "`" + text.split("=")[0] + "`.*" +
                        re.escape(text)):
                    BackupAndRestore(**arguments)

    def test_numpy_integer_save_freq_saves_every_that_many_batches(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(40, 3)).astype("float32")
        y = x.sum(axis=1, keepdims=True)

        class Files(keras.callbacks.Callback):
            def __init__(self, folder):
                super().__init__()
                self.folder, self.saved_after = folder, []

            def on_train_batch_end(self, batch, logs=None):
                path = os.path.join(self.folder, "latest.weights.h5")
                if os.path.exists(path):
                    self.saved_after.append(batch)
                    os.remove(path)

        with tempfile.TemporaryDirectory() as folder:
            backup = os.path.join(folder, "backup")
            callback = BackupAndRestore(backup, save_freq=np.int64(2))
            self.assertEqual(callback.save_freq, 2)
            self.assertIs(type(callback.save_freq), int)
            files = Files(backup)
            model = keras.Sequential([keras.Input((3,)),
                                      keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
            model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                      callbacks=[callback, files])
            self.assertEqual(files.saved_after, [1, 3])

    def test_config_round_trip(self):
        callback = BackupAndRestore("/tmp/b", save_freq=np.int32(3),
                                    double_checkpoint=True)
        self.assertEqual(
            (callback.backup_dir, callback.save_freq,
             callback.double_checkpoint, callback.delete_checkpoint),
            ("/tmp/b", 3, True, True))
