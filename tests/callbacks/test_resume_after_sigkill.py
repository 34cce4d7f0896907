"""A fit killed with SIGKILL between its epoch-end writes, then resumed.

Each run is a subprocess (the same backend as the suite's): one without a
kill gives the reference, then for each kill point one run that kills
itself and one that resumes from the backup folder. Slow (a Keras import
per process): ``pytest -m slow``.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

SCRIPT = r'''
import json, os, signal, sys, warnings
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
import numpy as np
from kreg.callbacks import BackupAndRestore, EarlyStopping

folder, order, kill_epoch, out = sys.argv[1:5]
kill_epoch = int(kill_epoch)
rng = np.random.RandomState(0)
x = rng.normal(size=(64, 3)).astype("float32")
y = (x @ np.array([[1.0], [-2.0], [0.5]])
     + 0.3 * rng.normal(size=(64, 1))).astype("float32")
xv = np.random.RandomState(1).normal(size=(32, 3)).astype("float32")
yv = (xv @ np.array([[0.7], [-1.4], [0.35]])).astype("float32")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class Kill(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == kill_epoch:
            die()


if order == "in-write" and kill_epoch >= 0:
    # Dies putting epoch kill_epoch's state in place (its old state was
    # already moved aside).
    real, seen = os.replace, []

    def replace(source, destination):
        if os.fspath(destination).endswith("kreg_early_stopping.npz"):
            seen.append(destination)
            if len(seen) == kill_epoch + 1:
                die()
        return real(source, destination)

    os.replace = replace

keras.utils.set_random_seed(3)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
stop = EarlyStopping(patience=2, restore_best_weights=True)
backup = BackupAndRestore(folder)
callbacks = {"state-first": [stop, Kill(), backup],
             "in-write": [stop, backup],
             "keras-first": [backup, Kill(), stop]}[order]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    history = model.fit(x, y, batch_size=16, epochs=30, shuffle=False,
                        verbose=0, validation_data=(xv, yv),
                        callbacks=callbacks)
with open(out, "w") as f:
    json.dump({"epochs": history.epoch, "stopped_epoch": stop.stopped_epoch,
               "best_epoch": stop.best_epoch, "best": stop.best,
               "weights": [w.tolist() for w in model.get_weights()],
               "warnings": [str(w.message) for w in caught
                            if "kreg" in str(w.message)]}, f)
'''


def run(folder, order, kill_epoch, out):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, folder, order, str(kill_epoch), out],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return done


@pytest.mark.slow
@unittest.skipUnless(hasattr(signal, "SIGKILL"), "needs SIGKILL (POSIX)")
class ResumeAfterSigkillTest(unittest.TestCase):
    def result(self, folder, order, kill_epoch):
        out = os.path.join(folder, f"{order}-{kill_epoch}.json")
        done = run(os.path.join(folder, "backup"), order, kill_epoch, out)
        if kill_epoch >= 0:
            self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
            return None
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(out) as f:
            return json.load(f)

    def test_killed_at_each_point_of_the_epoch_end(self):
        with tempfile.TemporaryDirectory() as folder:
            reference = self.result(folder, "state-first", -1)
        stopped = reference["stopped_epoch"]
        self.assertGreater(stopped, 3)
        cut = stopped - 1  # after the best epoch
        self.assertGreater(cut, reference["best_epoch"])
        for order in ("state-first", "in-write", "keras-first"):
            with self.subTest(order=order), \
                    tempfile.TemporaryDirectory() as folder:
                self.result(folder, order, cut)
                resumed = self.result(folder, order, -1)
                if order == "keras-first":
                    # Keras's backup has epoch `cut`, the state has not.
                    self.assertEqual(resumed["epochs"][0], cut + 1)
                    self.assertEqual(len(resumed["warnings"]), 1)
                    self.assertIn("kreg_early_stopping.npz",
                                  resumed["warnings"][0])
                    self.assertIn(f"epoch {cut} is not counted",
                                  resumed["warnings"][0])
                    self.assertIn(resumed["stopped_epoch"],
                                  (stopped, stopped + 1))
                    continue
                self.assertEqual(resumed["warnings"], [])
                self.assertEqual(resumed["epochs"][0], cut)
                self.assertEqual(resumed["epochs"][-1],
                                 reference["epochs"][-1])
                for key in ("stopped_epoch", "best_epoch"):
                    self.assertEqual(resumed[key], reference[key])
                np.testing.assert_allclose(resumed["best"],
                                           reference["best"], rtol=1e-6)
                for a, b in zip(resumed["weights"], reference["weights"]):
                    np.testing.assert_allclose(a, b, atol=1e-6)
