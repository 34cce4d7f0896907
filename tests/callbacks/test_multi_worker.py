"""Only the chief writes shared folders: a worker of a fake cluster (its
task patched, or TF_CONFIG on TensorFlow) writes a temporary folder and
resumes from the chief's files."""

import json
import os
import shutil
import tempfile
from unittest import mock

import keras
import numpy as np

from kreg.callbacks import EMA
from kreg.callbacks import BackupAndRestore
from kreg.callbacks import EarlyStopping
from kreg.callbacks import ModelCheckpoint
from kreg.testing import TestCase
from kreg.utils import distribute
from tests.callbacks.helpers import Interrupt


def _data():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    return x, y


def _model():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _snapshot(folder):
    """``{relative path: (bytes, mtime)}`` of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = (
                    f.read(), os.stat(path).st_mtime_ns)
    return files


class _ListFolder(keras.callbacks.Callback):
    """Records the files in `folder()` at the end of every epoch."""

    def __init__(self, folder):
        super().__init__()
        self.folder = folder
        self.listings = []

    def on_epoch_end(self, epoch, logs=None):
        folder = self.folder()
        self.listings.append(
            sorted(os.listdir(folder)) if os.path.isdir(folder) else [])


def as_worker(index=1):
    """This process plays worker `index` (not the chief)."""
    return mock.patch.object(distribute, "worker_task",
                             return_value=("worker", index))


class WorkerPathTest(TestCase):
    def test_chief_writes_the_path_itself(self):
        with mock.patch.object(distribute, "worker_task", return_value=None):
            self.assertTrue(distribute.is_chief())
            self.assertEqual(distribute.worker_path("/a/b"), "/a/b")

    def test_other_worker_writes_under_a_temporary_folder(self):
        with as_worker(1):
            self.assertFalse(distribute.is_chief())
            path = distribute.worker_path("/a/b")
            self.assertIn("kreg_workertemp_1_", path)
            self.assertTrue(path.endswith(os.path.join("a", "b")))
            self.assertTrue(path.startswith(tempfile.gettempdir()))
            # Mapped once: a path under the temporary folder stays.
            self.assertEqual(distribute.worker_path(path), path)
            self.assertEqual(distribute.worker_path("/a/b/c"),
                             os.path.join(path, "c"))
        with as_worker(2):
            self.assertNotEqual(distribute.worker_path("/a/b"), path)

    def test_tf_config(self):
        if keras.backend.backend() != "tensorflow":
            self.skipTest("TF_CONFIG is read on the TensorFlow backend")
        workers = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
        with_chief = {"chief": ["127.0.0.1:3"], **workers}
        cases = [
            (None, None),
            ({"cluster": workers}, None),
            ({"cluster": workers, "task": {"type": "worker", "index": 0}},
             None),
            ({"cluster": workers, "task": {"type": "worker", "index": 1}},
             ("worker", 1)),
            ({"cluster": with_chief, "task": {"type": "chief", "index": 0}},
             None),
            ({"cluster": with_chief, "task": {"type": "worker", "index": 0}},
             ("worker", 0)),
            ({"cluster": with_chief,
              "task": {"type": "evaluator", "index": 0}},
             ("evaluator", 0)),
        ]
        for config, expected in cases:
            value = {} if config is None else {"TF_CONFIG": json.dumps(config)}
            with mock.patch.dict(os.environ, value, clear=False):
                if config is None:
                    os.environ.pop("TF_CONFIG", None)
                self.assertEqual(distribute.worker_task(), expected,
                                 msg=str(config))
                self.assertEqual(distribute.is_chief(), expected is None)
        with mock.patch.dict(os.environ, {"TF_CONFIG": "{not json"}):
            with self.assertRaisesRegex(ValueError, "`TF_CONFIG`"):
                distribute.is_chief()
        with mock.patch.dict(os.environ, {"TF_CONFIG": '{"task": 3}'}):
            with self.assertRaisesRegex(ValueError, "`TF_CONFIG`"):
                distribute.is_chief()


class WorkerBackupTest(TestCase):
    def _interrupted_chief_run(self, backup):
        """A chief's fit interrupted at epoch 2: its backup in `backup`."""
        x, y = _data()
        model = _model()
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            model.fit(x, y, epochs=5, batch_size=8, validation_split=0.25,
                      verbose=0, callbacks=[
                          EMA(0.9), EarlyStopping(patience=10),
                          BackupAndRestore(backup), Interrupt(2)])

    def _resume(self, backup, listing=None):
        x, y = _data()
        model = _model()
        ema, stop = EMA(0.9), EarlyStopping(patience=10)
        callbacks = [ema, stop, BackupAndRestore(backup)]
        if listing is not None:
            callbacks.append(listing)
        history = model.fit(x, y, epochs=5, batch_size=8,
                            validation_split=0.25, verbose=0,
                            callbacks=callbacks)
        return model, history, ema, stop

    def test_worker_resumes_from_the_chief_files_and_leaves_them(self):
        with tempfile.TemporaryDirectory() as folder:
            backup = os.path.join(folder, "backup")
            self._interrupted_chief_run(backup)
            chief_files = _snapshot(backup)
            self.assertIn("kreg_ema.npz", chief_files)
            self.assertIn("kreg_early_stopping.npz", chief_files)
            # The chief's own resumed run, on a copy of its folder.
            copy = os.path.join(folder, "copy")
            shutil.copytree(backup, copy)
            chief_model, chief_history, chief_ema, chief_stop = (
                self._resume(copy))
            self.assertFalse(os.path.exists(copy))

            with as_worker(1):
                written = distribute.worker_path(backup)
                listing = _ListFolder(lambda: written)
                model, history, ema, stop = self._resume(backup, listing)

            # The shared folder is exactly as the chief left it.
            self.assertEqual(_snapshot(backup), chief_files)
            # The worker wrote its backup and kreg's state elsewhere.
            self.assertNotEqual(written, backup)
            for names in listing.listings:
                for name in ("latest.weights.h5", "kreg_ema.npz",
                             "kreg_early_stopping.npz"):
                    self.assertIn(name, names)
            self.assertFalse(os.path.exists(written))  # deleted at the end
            # It resumed from the chief's files: as the chief resumes.
            self.assertEqual(history.epoch, [2, 3, 4])
            self.assertEqual(history.epoch, chief_history.epoch)
            self.assertEqual(ema.steps, chief_ema.steps)
            self.assertEqual(stop.best_epoch, chief_stop.best_epoch)
            self.assertAllClose(history.history["loss"],
                                chief_history.history["loss"])
            for a, b in zip(model.get_weights(), chief_model.get_weights()):
                self.assertAllClose(a, b)

    def test_worker_interrupted_leaves_no_file_in_the_shared_folder(self):
        x, y = _data()
        with tempfile.TemporaryDirectory() as folder:
            backup = os.path.join(folder, "backup")
            with as_worker(1):
                with self.assertRaisesRegex(RuntimeError, "interrupted"):
                    _model().fit(x, y, epochs=4, batch_size=8,
                                 validation_split=0.25, verbose=0,
                                 callbacks=[EMA(0.9), EarlyStopping(),
                                            BackupAndRestore(backup),
                                            Interrupt(2)])
                written = distribute.worker_path(backup)
                self.assertIn("kreg_ema.npz", os.listdir(written))
            self.assertFalse(os.path.exists(backup))

    def test_model_checkpoint_on_a_worker(self):
        x, y = _data()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "ckpt", "model.keras")
            with as_worker(1):
                checkpoint = ModelCheckpoint(path)
                _model().fit(x, y, epochs=2, batch_size=8,
                             validation_split=0.25, verbose=0,
                             callbacks=[EMA(0.9), checkpoint])
                written = distribute.worker_path(path)
            self.assertEqual(checkpoint.filepath, written)
            self.assertTrue(os.path.exists(written))
            self.assertIn("kreg_ema.npz",
                          os.listdir(written + ".kreg"))
            self.assertEqual(os.listdir(folder), [])
