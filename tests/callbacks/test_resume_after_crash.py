"""Resuming after a fit died between two of its epoch-end writes.

An exception raised at a chosen point of the epoch end stands for a kill
there (the files on disk are what a kill would leave; the real SIGKILL
version is tests/callbacks/test_resume_after_sigkill.py). Whatever the
point, the resumed fit must equal the uninterrupted one, or warn naming the
state file and saying what it does instead.
"""

import os
import re
import warnings
from unittest import mock

import keras
import numpy as np

from kreg.callbacks import EMA
from kreg.callbacks import BackupAndRestore
from kreg.callbacks import EarlyStopping
from kreg.callbacks import _state_files as state_files
from kreg.testing import TestCase
from tests.callbacks.helpers import backup_pairing

ES_FILE = "kreg_early_stopping.npz"


class Killed(Exception):
    pass


class KillAtEpochEnd(keras.callbacks.Callback):
    """Raises `Killed` in `on_epoch_end` of epoch `epoch`: the callbacks
    listed before it have written their files, the ones after have not."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Killed(f"killed at the end of epoch {epoch}")


class CountEpochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.begun = []

    def on_epoch_begin(self, epoch, logs=None):
        self.begun.append(epoch)


def kill_on_replace(suffix, count):
    """`os.replace` that raises `Killed` at its `count`-th call whose
    destination ends with `suffix` (1-based)."""
    real = os.replace
    seen = []

    def fake(source, destination):
        if os.fspath(destination).endswith(suffix):
            seen.append(destination)
            if len(seen) == count:
                raise Killed(f"killed replacing {destination}")
        return real(source, destination)

    return fake


def kreg_warnings(caught):
    return [str(w.message) for w in caught
            if "kreg" in str(w.message) or "state" in str(w.message)]


class ResumeAfterCrashTest(TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(0)
        self.x = rng.normal(size=(64, 3)).astype("float32")
        self.y = (self.x @ np.array([[1.0], [-2.0], [0.5]])
                  + 0.3 * rng.normal(size=(64, 1))).astype("float32")
        self.xv = np.random.RandomState(1).normal(size=(32, 3)).astype(
            "float32")
        # Validation targets off the training relation: val_loss goes
        # down, then up, and early stopping stops.
        self.yv = (self.xv @ np.array([[0.7], [-1.4], [0.35]])).astype(
            "float32")
        self.full = self.stop()
        model = self.model()
        self.fit(model, [self.full])
        self.full_weights = model.get_weights()
        self.assertGreater(self.full.stopped_epoch, 3)
        # The cut is after the best epoch: the wait counter and the best
        # weights must come back from the state.
        self.cut = self.full.stopped_epoch - 1
        self.assertGreater(self.cut, self.full.best_epoch)

    def model(self):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
        return model

    def fit(self, model, callbacks, epochs=30):
        return model.fit(self.x, self.y, batch_size=16, epochs=epochs,
                         shuffle=False, verbose=0, callbacks=callbacks,
                         validation_data=(self.xv, self.yv))

    def stop(self, backup_dir=None):
        return EarlyStopping(patience=2, restore_best_weights=True,
                             backup_dir=backup_dir)

    def resume(self, pairing):
        """The resumed fit: ``(EarlyStopping, history, warnings)``."""
        stop = self.stop(pairing.backup_dir)
        model = self.model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = self.fit(model, pairing.callbacks(stop))
        self.resumed_weights = model.get_weights()
        return stop, history, kreg_warnings(caught)

    def assert_same_as_uninterrupted(self, stop, history, resumed_at):
        self.assertEqual(history.epoch[0], resumed_at)
        self.assertEqual(history.epoch[-1], self.full.stopped_epoch)
        self.assertEqual(stop.stopped_epoch, self.full.stopped_epoch)
        self.assertEqual(stop.best_epoch, self.full.best_epoch)
        self.assertAllClose(stop.best, self.full.best, rtol=1e-6)
        for a, b in zip(self.resumed_weights, self.full_weights):
            self.assertAllClose(a, b, atol=1e-6)

    def test_killed_after_the_state_before_keras_backup(self):
        # BackupAndRestore listed last: the state of epoch `cut` is written,
        # Keras's backup still resumes at `cut`; the state kept from the
        # epoch before is the one that belongs to it.
        for kind in ("keras", "kreg"):
            with self.subTest(pairing=kind), backup_pairing(kind) as pairing:
                with self.assertRaises(Killed):
                    self.fit(self.model(), self.listed_last(
                        pairing, self.stop(pairing.backup_dir),
                        KillAtEpochEnd(self.cut)))
                stop, history, told = self.resume(pairing)
                self.assertEqual(told, [])
                self.assert_same_as_uninterrupted(stop, history, self.cut)

    def listed_last(self, pairing, *callbacks):
        """The callbacks, then the pairing's BackupAndRestore."""
        if pairing.kind == "kreg":
            return [*callbacks, BackupAndRestore(pairing.backup)]
        return [*callbacks, keras.callbacks.BackupAndRestore(pairing.backup)]

    def listed_first(self, pairing, *callbacks):
        if pairing.kind == "kreg":
            return [BackupAndRestore(pairing.backup), *callbacks]
        return [keras.callbacks.BackupAndRestore(pairing.backup), *callbacks]

    def test_killed_after_keras_backup_before_the_state_warns(self):
        # BackupAndRestore listed first: Keras's backup resumes at cut + 1,
        # the state has counted `cut` epochs. Nothing can bring epoch
        # `cut` back: the warning names the file and says so.
        for kind in ("keras", "kreg"):
            with self.subTest(pairing=kind), backup_pairing(kind) as pairing:
                with self.assertRaises(Killed):
                    self.fit(self.model(), self.listed_first(
                        pairing, KillAtEpochEnd(self.cut),
                        self.stop(pairing.backup_dir)))
                stop, history, told = self.resume(pairing)
                path = os.path.join(pairing.backup, ES_FILE)
                self.assertEqual(len(told), 1, told)
                self.assertRegex(told[0], re.escape(repr(path)))
                self.assertIn(f"has counted {self.cut} epochs", told[0])
                self.assertIn(f"resumes at epoch {self.cut + 1}", told[0])
                self.assertIn(f"epoch {self.cut} is not counted", told[0])
                self.assertEqual(history.epoch[0], self.cut + 1)
                # One epoch's count missing: it stops at most one later.
                self.assertIn(stop.stopped_epoch, (self.full.stopped_epoch,
                                                   self.full.stopped_epoch + 1))
                self.assertEqual(stop.best_epoch, self.full.best_epoch)

    def test_killed_inside_the_state_write(self):
        # Epoch `cut`'s write dies after the old state became the previous
        # one (or before): Keras's backup resumes at `cut`, and the state
        # of that epoch is still there.
        cases = {
            # The j-th move to .previous is at epoch j (epoch 0 has none).
            "moving the old state aside": (
                ES_FILE.replace(".npz", ".previous.npz"), self.cut),
            # The j-th write of the state is at epoch j - 1.
            "putting the new state in place": (ES_FILE, self.cut + 1),
        }
        for point, (suffix, count) in cases.items():
            with self.subTest(point=point), backup_pairing("kreg") as pairing:
                with mock.patch("os.replace",
                                kill_on_replace(suffix, count)):
                    with self.assertRaises(Killed):
                        self.fit(self.model(), self.listed_last(
                            pairing, self.stop()))
                stop, history, told = self.resume(pairing)
                self.assertEqual(told, [])
                self.assert_same_as_uninterrupted(stop, history, self.cut)

    def interrupted_backup(self, pairing):
        """A backup after epochs 0 .. cut - 1, with the state file."""
        with self.assertRaises(Killed):
            self.fit(self.model(), self.listed_last(
                pairing, self.stop(pairing.backup_dir), _Raise(self.cut)))
        self.assertTrue(os.path.exists(os.path.join(pairing.backup,
                                                    ES_FILE)))

    def test_deleted_state_warns_that_early_stopping_starts_over(self):
        for kind in ("keras", "kreg"):
            with self.subTest(pairing=kind), backup_pairing(kind) as pairing:
                self.interrupted_backup(pairing)
                path = os.path.join(pairing.backup, ES_FILE)
                for leftover in os.listdir(pairing.backup):
                    if leftover.startswith("kreg_early_stopping"):
                        os.remove(os.path.join(pairing.backup, leftover))
                stop, history, told = self.resume(pairing)
                self.assertEqual(len(told), 1, told)
                self.assertRegex(told[0], re.escape(repr(path)) +
                                 ".*does not exist.*starts over")
                self.assertIn(f"resumes at epoch {self.cut}", told[0])
                self.assertEqual(history.epoch[0], self.cut)

    def test_damaged_state_is_an_error_before_training(self):
        for kind, damage in (("truncated", "npz"), ("garbage", "json")):
            with self.subTest(damage=kind), backup_pairing("kreg") as pairing:
                self.interrupted_backup(pairing)
                path = os.path.join(pairing.backup,
                                    "kreg_early_stopping." + damage)
                if damage == "npz":
                    with open(path, "rb") as f:
                        content = f.read()
                    with open(path, "wb") as f:
                        f.write(content[:len(content) // 2])
                else:
                    with open(path, "w") as f:
                        f.write("{garbage")
                count = CountEpochs()
                with self.assertRaisesRegex(ValueError, re.escape(repr(path))
                                            + ".*EarlyStopping.*delete it"):
                    self.fit(self.model(), [count, self.stop(),
                                            BackupAndRestore(pairing.backup)])
                # Raised when the first epoch begins, before any step.
                self.assertEqual(count.begun, [self.cut])

    def test_ema_resumes_or_says_its_state_is_ignored(self):
        # The EMA reads its state with load_state: a kill between its write
        # and Keras's backup gives an equal average or a warning naming the
        # backup folder.
        full = EMA(decay=0.8, keep_averaged=False)
        self.fit(self.model(), [full], epochs=4)
        for order in ("state first", "keras first"):
            with self.subTest(order=order), backup_pairing("kreg") as pairing:
                ema = EMA(decay=0.8, keep_averaged=False)
                kill = KillAtEpochEnd(1)
                callbacks = ([ema, kill, BackupAndRestore(pairing.backup)]
                             if order == "state first" else
                             [BackupAndRestore(pairing.backup), kill, ema])
                with self.assertRaises(Killed):
                    self.fit(self.model(), callbacks, epochs=4)
                second = EMA(decay=0.8, keep_averaged=False)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    self.fit(self.model(), [second,
                                            BackupAndRestore(pairing.backup)],
                             epochs=4)
                told = [str(w.message) for w in caught
                        if "EMA" in str(w.message).split(":")[0]]
                if told:
                    self.assertIn(pairing.backup, told[0])
                    self.assertIn("average restarts", told[0])
                else:
                    self.assertEqual(second.steps, full.steps)
                    for a, b in zip(second.shadow_variables,
                                    full.shadow_variables):
                        self.assertAllClose(a, b, atol=1e-6)

    def test_truncated_ema_state_is_an_error_naming_it(self):
        with backup_pairing("kreg") as pairing:
            with self.assertRaises(Killed):
                self.fit(self.model(), [EMA(0.8), _Raise(2),
                                        BackupAndRestore(pairing.backup)],
                         epochs=4)
            path = state_files.state_path(pairing.backup, "kreg_ema")
            with open(path, "rb") as f:
                content = f.read()
            with open(path, "wb") as f:
                f.write(content[:len(content) // 3])
            count = CountEpochs()
            with self.assertRaisesRegex(ValueError, re.escape(repr(path)) +
                                        ".*EMA.*average restarts"):
                self.fit(self.model(), [EMA(0.8), count,
                                        BackupAndRestore(pairing.backup)],
                         epochs=4)
            self.assertEqual(count.begun, [])  # before the first epoch


class _Raise(keras.callbacks.Callback):
    """Raises `Killed` when epoch `epoch` begins (every file of the epoch
    before is written)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Killed(f"killed when epoch {epoch} begins")
