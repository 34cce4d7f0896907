import os
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
