"""kreg's callback state files: atomic writes, epoch stamps, damaged files.

A "kill" between two writes is simulated by making the n-th file operation
of a save raise: whatever n, what is on disk must load as the old complete
state or the new complete state.
"""

import json
import os
import re
import tempfile
import unittest
import warnings
from unittest import mock

import numpy as np

from kreg.callbacks import _state_files as state_files


class Killed(Exception):
    pass


def kill_at_call(count, real):
    """A stand-in for `real` that raises `Killed` at call number `count`
    (1-based) and calls `real` before that."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == count:
            raise Killed(f"killed at call {count}")
        return real(*args, **kwargs)

    fake.calls = calls
    return fake


def state(epoch, fill):
    return ({"epoch": epoch, "wait": epoch * 10},
            [np.full((2, 3), fill, "float32"), np.arange(fill, dtype="int64")])


def save(folder, saved, keep_previous):
    options = {"keep_previous": True} if keep_previous else {}
    state_files.save_state(folder, "s", *saved, **options)


class StateFilesTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.folder))

    def assert_state(self, loaded, expected):
        self.assertIsNotNone(loaded)
        numbers, arrays = loaded
        self.assertEqual(numbers["epoch"], expected[0]["epoch"])
        self.assertEqual(numbers["wait"], expected[0]["wait"])
        self.assertEqual(len(arrays), len(expected[1]))
        for a, b in zip(arrays, expected[1]):
            np.testing.assert_array_equal(a, b)
            self.assertEqual(a.dtype, b.dtype)

    def test_round_trip(self):
        numbers, arrays = state(3, 4)
        state_files.save_state(self.folder, "s", numbers, arrays)
        self.assert_state(state_files.load_state(self.folder, "s"),
                          (numbers, arrays))
        state_files.save_state(self.folder, "empty", {"epoch": 1}, [])
        self.assertEqual(state_files.load_state(self.folder, "empty"),
                         ({"epoch": 1}, []))
        self.assertIsNone(state_files.load_state(self.folder, "none"))

    def test_numbers_and_arrays_are_one_file(self):
        # One os.replace publishes a state: no mix of two epochs possible.
        state_files.save_state(self.folder, "s", *state(1, 1))
        self.assertEqual(sorted(os.listdir(self.folder)), ["s.npz"])

    def test_kill_at_any_write_leaves_old_or_new_state(self):
        old, new = state(2, 1), state(3, 5)
        for keep_previous in (False, True):
            for operation in ("replace", "savez"):
                for count in range(1, 10):
                    with self.subTest(keep_previous=keep_previous,
                                      operation=operation, count=count):
                        folder = tempfile.mkdtemp(dir=self.folder)
                        save(folder, old, keep_previous)
                        target = ("os.replace" if operation == "replace"
                                  else "numpy.savez")
                        real = os.replace if operation == "replace" \
                            else np.savez
                        fake = kill_at_call(count, real)
                        with mock.patch(target, fake):
                            try:
                                save(folder, new, keep_previous)
                                killed = False
                            except Killed:
                                killed = True
                        loaded = state_files.load_state(folder, "s")
                        if not killed:
                            self.assert_state(loaded, new)
                            break
                        numbers = loaded[0]
                        self.assert_state(
                            loaded, new if numbers["epoch"] == 3 else old)
                        # The next save after the kill works.
                        state_files.save_state(folder, "s", *new)
                        self.assert_state(
                            state_files.load_state(folder, "s"), new)
                else:
                    self.fail("the save never ran to its end")
                self.assertGreaterEqual(count, 2)

    def test_partial_write_keeps_old_state(self):
        old, new = state(2, 1), state(3, 5)
        state_files.save_state(self.folder, "s", *old)

        def savez_dies_half_way(file, **arrays):
            file.write(b"PK\x03\x04 partial")
            raise Killed()

        with mock.patch("numpy.savez", savez_dies_half_way):
            with self.assertRaises(Killed):
                state_files.save_state(self.folder, "s", *new)
        self.assert_state(state_files.load_state(self.folder, "s"), old)

    def test_resume_state_picks_the_generation_of_the_resume_epoch(self):
        for epoch in (1, 2, 3):
            state_files.save_state(self.folder, "kreg_early_stopping",
                                   *state(epoch, epoch), keep_previous=True)
        for epoch in (3, 2):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                self.assert_state(
                    state_files.resume_state(self.folder,
                                             "kreg_early_stopping", epoch),
                    state(epoch, epoch))

    def test_resume_state_older_than_the_resume_epoch(self):
        state_files.save_state(self.folder, "kreg_early_stopping",
                               *state(3, 3), keep_previous=True)
        path = os.path.join(self.folder, "kreg_early_stopping.npz")
        # Ignored by default, with what happens next.
        with self.assertWarnsRegex(UserWarning, re.escape(path)) as told:
            self.assertIsNone(state_files.resume_state(
                self.folder, "kreg_early_stopping", 5))
        text = str(told.warning)
        self.assertIn("has counted 3 epochs", text)
        self.assertIn("resumes at epoch 5", text)
        self.assertIn("starts over", text)
        # Used, when the caller says what that means.
        with self.assertWarnsRegex(UserWarning, "epochs 3 to 4 are not "
                                   "counted.*stops late"):
            self.assert_state(state_files.resume_state(
                self.folder, "kreg_early_stopping", 5,
                use_older="it stops late"), state(3, 3))

    def test_resume_state_newer_than_the_resume_epoch_is_ignored(self):
        state_files.save_state(self.folder, "kreg_ema", *state(4, 1),
                               keep_previous=True)
        with self.assertWarnsRegex(UserWarning, "has counted 4 epochs.*"
                                   "resumes at epoch 2.*ignored.*EMA "
                                   "average restarts"):
            self.assertIsNone(state_files.resume_state(
                self.folder, "kreg_ema", 2, use_older="used"))

    def test_resume_state_missing(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            self.assertIsNone(state_files.resume_state(
                self.folder, "kreg_early_stopping", 0))
        path = os.path.join(self.folder, "kreg_early_stopping.npz")
        with self.assertWarnsRegex(UserWarning, re.escape(path) +
                                   ".*does not exist.*starts over"):
            self.assertIsNone(state_files.resume_state(
                self.folder, "kreg_early_stopping", 4))

    def test_damaged_arrays_file_is_an_error_naming_it(self):
        state_files.save_state(self.folder, "kreg_ema", *state(2, 3))
        path = os.path.join(self.folder, "kreg_ema.npz")
        with open(path, "rb") as f:
            content = f.read()
        flipped = bytearray(content)
        flipped[len(flipped) // 2] ^= 0xFF
        for kind, damaged in (("truncated", content[:len(content) // 2]),
                              ("empty", b""),
                              ("garbage", b"not a state" * 20),
                              ("flipped byte", bytes(flipped))):
            with self.subTest(kind=kind):
                with open(path, "wb") as f:
                    f.write(damaged)
                with self.assertRaisesRegex(
                        ValueError, re.escape(repr(path))) as caught:
                    state_files.load_state(self.folder, "kreg_ema")
                text = str(caught.exception)
                self.assertIn("kreg.callbacks.EMA", text)
                self.assertIn("delete it", text)
                self.assertIn("average restarts", text)

    def test_garbage_numbers_file_is_an_error_naming_it(self):
        state_files.save_state(self.folder, "kreg_early_stopping",
                               *state(2, 3))
        path = os.path.join(self.folder, "kreg_early_stopping.json")
        with open(path, "w") as f:
            f.write("{garbage")
        with self.assertRaisesRegex(ValueError, re.escape(repr(path)) +
                                    ".*EarlyStopping.*delete it"):
            state_files.load_state(self.folder, "kreg_early_stopping")
        state_files.save_json(self.folder, "kreg_retrain_phase2_logs",
                              {"rows": []})
        path = os.path.join(self.folder, "kreg_retrain_phase2_logs.json")
        with open(path, "w") as f:
            f.write("[1, 2")
        with self.assertRaisesRegex(ValueError, re.escape(repr(path))):
            state_files.load_json(self.folder, "kreg_retrain_phase2_logs")

    def test_numbers_update_keeps_the_arrays(self):
        # RetrainOnFullData saves its arrays once, then only its numbers.
        numbers, arrays = state(1, 2)
        state_files.save_state(self.folder, "s", numbers, arrays)
        state_files.save_json(self.folder, "s", {"epoch": 5, "wait": 7})
        loaded_numbers, loaded_arrays = state_files.load_state(self.folder,
                                                               "s")
        self.assertEqual(loaded_numbers, {"epoch": 5, "wait": 7})
        for a, b in zip(loaded_arrays, arrays):
            np.testing.assert_array_equal(a, b)
        # New arrays replace the numbers update; a kill before the update
        # is removed leaves it stale, and it is not used.
        new = state(9, 4)
        with mock.patch("os.remove", kill_at_call(1, os.remove)):
            with self.assertRaises(Killed):
                state_files.save_state(self.folder, "s", *new)
        self.assertTrue(os.path.exists(os.path.join(self.folder, "s.json")))
        self.assert_state(state_files.load_state(self.folder, "s"), new)

    def test_numbers_and_arrays_pair_without_stamp(self):
        # A state as a pair: numbers (with num_arrays) in the .json, the
        # arrays alone in the .npz.
        arrays = [np.ones(3), np.zeros((2, 2))]
        np.savez(os.path.join(self.folder, "s.npz"),
                 **{f"a{i:05d}": a for i, a in enumerate(arrays)})
        with open(os.path.join(self.folder, "s.json"), "w") as f:
            json.dump({"epoch": 2, "num_arrays": 2}, f)
        numbers, loaded = state_files.load_state(self.folder, "s")
        self.assertEqual(numbers["epoch"], 2)
        for a, b in zip(loaded, arrays):
            np.testing.assert_array_equal(a, b)

    def test_numbers_without_arrays_file_warns(self):
        with open(os.path.join(self.folder, "kreg_ema.json"), "w") as f:
            json.dump({"epoch": 2, "num_arrays": 2}, f)
        path = os.path.join(self.folder, "kreg_ema.npz")
        with self.assertWarnsRegex(UserWarning, re.escape(repr(path)) +
                                   ".*missing.*average restarts"):
            self.assertIsNone(state_files.load_state(self.folder,
                                                     "kreg_ema"))

    def test_delete_state_removes_every_generation_and_leftover(self):
        for epoch in (1, 2):
            state_files.save_state(self.folder, "kreg_ema", *state(epoch, 1),
                                   keep_previous=True)
        state_files.save_json(self.folder, "kreg_ema", {"epoch": 2})
        state_files.save_state(self.folder, "kreg_ema_2", *state(1, 1))
        # What a kill in the middle of a write leaves.
        with open(os.path.join(self.folder, ".kreg_ema.npz.0a1b.tmp"),
                  "wb") as f:
            f.write(b"PK partial")
        self.assertEqual(state_files.state_names(self.folder, "kreg_ema"),
                         ["kreg_ema", "kreg_ema_2"])
        state_files.delete_state(self.folder, "kreg_ema")
        self.assertEqual(sorted(os.listdir(self.folder)), ["kreg_ema_2.npz"])
        self.assertFalse(state_files.has_state(self.folder, "kreg_ema"))
        self.assertTrue(state_files.has_state(self.folder, "kreg_ema_2"))

    def test_write_folder_round_trip(self):
        state_files.save_state(os.path.join(self.folder, "a", "b"), "s",
                               *state(1, 2))
        files = state_files.read_folder(self.folder)
        other = os.path.join(self.folder, "copy")
        state_files.write_folder(other, files)
        self.assert_state(state_files.load_state(
            os.path.join(other, "a", "b"), "s"), state(1, 2))
