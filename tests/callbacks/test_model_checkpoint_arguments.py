import os
import re
import tempfile

import keras
import numpy as np

from kreg.callbacks import ModelCheckpoint
from kreg.testing import TestCase


class ModelCheckpointArgumentsTest(TestCase):
    def test_bad_arguments(self):
        cases = [
            (dict(save_freq=0), ValueError, "save_freq=0"),
            (dict(save_freq=-1), ValueError, "save_freq=-1"),
            (dict(save_freq=True), TypeError, "save_freq=True"),
            (dict(save_freq="batch"), ValueError, "save_freq='batch'"),
            (dict(filepath=None), TypeError, "filepath=None"),
            (dict(monitor=""), TypeError, "monitor=''"),
            (dict(mode="up"), ValueError, "mode='up'"),
            (dict(verbose=-1), ValueError, "verbose=-1"),
            (dict(save_best_only="yes"), TypeError, "save_best_only='yes'"),
            (dict(initial_value_threshold=float("nan")), ValueError,
             "initial_value_threshold=nan"),
        ]
        for kwargs, error, text in cases:
            with self.subTest(kwargs=kwargs):
                arguments = {"filepath": "m.keras", **kwargs}
                with self.assertRaisesRegex(error, re.escape(text)):
                    ModelCheckpoint(**arguments)

    def test_numpy_integer_save_freq(self):
        x = np.random.RandomState(0).normal(size=(32, 3)).astype("float32")
        y = x.sum(axis=1, keepdims=True)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        with tempfile.TemporaryDirectory() as folder:
            pattern = os.path.join(folder, "b{batch}.weights.h5")
            checkpoint = ModelCheckpoint(pattern, save_weights_only=True,
                                         save_freq=np.int64(2))
            self.assertIs(type(checkpoint.save_freq), int)
            model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                      callbacks=[checkpoint])
            self.assertEqual(sorted(os.listdir(folder)),
                             ["b2.weights.h5", "b4.weights.h5"])
