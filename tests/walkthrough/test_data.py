import gzip
import os
import struct
import tempfile
import unittest
from unittest import mock

import numpy as np
import pytest

from kreg.walkthrough import data

SHARED_MNIST = os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data", "mnist"
)


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(folder, gz=True, n_train=30, n_test=10):
    rng = np.random.RandomState(0)
    arrays = {
        "x_train": rng.randint(0, 256, (n_train, 28, 28)),
        "y_train": rng.randint(0, 10, n_train),
        "x_test": rng.randint(0, 256, (n_test, 28, 28)),
        "y_test": rng.randint(0, 10, n_test),
    }
    for key, stem in data.MNIST_FILES.items():
        write_idx(os.path.join(folder, stem + (".gz" if gz else "")),
                  arrays[key])
    return arrays


class IdxTest(unittest.TestCase):
    def test_round_trip_gzipped_and_plain(self):
        array = np.arange(24).reshape(2, 3, 4)
        with tempfile.TemporaryDirectory() as folder:
            for name in ("a.idx", "b.idx.gz"):
                path = os.path.join(folder, name)
                write_idx(path, array)
                np.testing.assert_array_equal(data.read_idx(path), array)

    def test_bad_header_and_truncated_file(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "bad")
            with open(path, "wb") as f:
                f.write(b"\x01\x02\x03\x04rest")
            with self.assertRaisesRegex(ValueError, "not an IDX file"):
                data.read_idx(path)
            with open(path, "wb") as f:
                f.write(struct.pack(">HBBI", 0, 8, 1, 10) + b"\x00" * 3)
            with self.assertRaisesRegex(ValueError, "holds 3 values"):
                data.read_idx(path)

    def test_load_mnist_idx_standardizes_and_keeps_labels(self):
        for gz in (True, False):
            with tempfile.TemporaryDirectory() as folder:
                arrays = write_fake_mnist(folder, gz=gz)
                mnist = data.load_mnist_idx(folder)
            self.assertEqual(mnist.x_train.shape, (30, 784))
            self.assertEqual(mnist.x_test.shape, (10, 784))
            np.testing.assert_array_equal(mnist.y_train, arrays["y_train"])
            np.testing.assert_allclose(mnist.x_train.mean(0), 0.0, atol=1e-5)
            np.testing.assert_allclose(mnist.x_train.std(0), 1.0, atol=1e-3)

    @pytest.mark.skipif(not os.path.isdir(SHARED_MNIST),
                        reason="real MNIST copy not on this machine")
    def test_real_mnist(self):
        mnist = data.load_mnist_idx(SHARED_MNIST)
        self.assertEqual(mnist.x_train.shape, (60000, 784))
        self.assertEqual(mnist.x_test.shape, (10000, 784))
        self.assertEqual(sorted(np.unique(mnist.y_test)), list(range(10)))


class LoadDatasetTest(unittest.TestCase):
    def test_bundled_sets(self):
        digits = data.load_dataset("digits")
        self.assertEqual(digits.num_classes, 10)
        self.assertEqual(digits.input_dim, 64)
        self.assertEqual(len(digits.x_train) + len(digits.x_test), 1797)
        cancer = data.load_dataset("breast_cancer")
        self.assertEqual((cancer.num_classes, cancer.input_dim), (2, 30))

    def test_missing_mnist_falls_back_with_one_clear_line(self):
        lines = []
        with tempfile.TemporaryDirectory() as folder:
            result = data.load_dataset("mnist", folder, log=lines.append)
        self.assertEqual(result.name, "digits")
        self.assertEqual(len(lines), 1)
        self.assertIn("'mnist' is not available offline", lines[0])
        self.assertIn("falling back", lines[0])

    def test_mnist_from_idx_folder(self):
        with tempfile.TemporaryDirectory() as folder:
            write_fake_mnist(folder)
            result = data.load_dataset("mnist", folder, log=self.fail)
        self.assertEqual(result.name, "mnist")

    def test_subset(self):
        digits = data.load_digits()
        small = digits.subset(100, seed=1)
        self.assertEqual(len(small.x_train), 100)
        self.assertEqual(len(small.x_test), len(digits.x_test))


class LabelledSubsetTest(unittest.TestCase):
    def test_stratified_every_class_and_fraction_respected(self):
        labels = np.repeat(np.arange(5), [100, 120, 80, 3, 97])
        for fraction in (0.01, 0.05, 0.2, 1.0):
            index = data.labelled_indices(labels, fraction, seed=3)
            self.assertEqual(len(np.unique(index)), len(index))
            counts = np.bincount(labels[index], minlength=5)
            self.assertTrue(np.all(counts >= 1))
            for label, total in enumerate(np.bincount(labels)):
                self.assertEqual(counts[label],
                                 max(1, int(round(fraction * total))))
        np.testing.assert_array_equal(
            data.labelled_indices(labels, 0.05, seed=3),
            data.labelled_indices(labels, 0.05, seed=3))
        self.assertFalse(np.array_equal(
            data.labelled_indices(labels, 0.05, seed=3),
            data.labelled_indices(labels, 0.05, seed=4)))
        for bad in (0.0, -0.1, 1.5):
            with self.assertRaisesRegex(ValueError, "fraction"):
                data.labelled_indices(labels, bad, seed=0)

    def test_labelled_subset_keeps_the_test_split(self):
        digits = data.load_digits()
        small = data.labelled_subset(digits, 0.05, seed=0)
        self.assertEqual(len(small.x_train), 60)  # 6 of every digit
        self.assertEqual(len(small.x_test), len(digits.x_test))

    def test_class_split_relabels(self):
        digits = data.load_digits()
        target = data.class_split(digits, (5, 6, 7, 8, 9))
        self.assertEqual(target.num_classes, 5)
        self.assertEqual(sorted(np.unique(target.y_test)), list(range(5)))
        np.testing.assert_array_equal(
            target.x_test, digits.x_test[digits.y_test >= 5])
        np.testing.assert_array_equal(
            target.y_train, digits.y_train[digits.y_train >= 5] - 5)


class TfdsTest(unittest.TestCase):
    def setUp(self):
        self.tfds = pytest.importorskip("tensorflow_datasets")

    def test_unprepared_data_set_is_refused_without_downloading(self):
        builder_class = self.tfds.core.DatasetBuilder
        with self.tfds.testing.mock_data(num_examples=4), mock.patch.object(
            builder_class, "download_and_prepare",
            side_effect=AssertionError("must not download"),
        ), tempfile.TemporaryDirectory() as folder:
            with self.assertRaisesRegex(FileNotFoundError, "not prepared"):
                data.load_tfds("mnist", folder)
            lines = []
            result = data.load_dataset("mnist", folder, log=lines.append)
        self.assertEqual(result.name, "digits")
        self.assertIn("not prepared", lines[0])

    def test_prepared_data_set_is_read_through_tfds(self):
        # DummyMnist generates its random examples locally (no network).
        from tensorflow_datasets.testing import DummyMnist

        with tempfile.TemporaryDirectory() as folder:
            DummyMnist(data_dir=folder).download_and_prepare()
            result = data.load_dataset("dummy_mnist", folder, log=self.fail)
        self.assertEqual(result.x_train.shape[1], 784)
        self.assertEqual(result.num_classes, 10)
        self.assertIn("tensorflow-datasets", result.source)
