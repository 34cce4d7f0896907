"""BulkVariables: the EMA's whole-model reads, writes and comparisons (one
compiled call each on TensorFlow) against per-variable NumPy."""

import unittest

import keras
import numpy as np

from kreg.callbacks import EMA
from kreg.callbacks._bulk_variables import BulkVariables
from kreg.testing import TestCase
from kreg.testing.distribution import mirrored_strategy

SHAPES = [(3, 4), (4,), (2, 2, 2)]


def variables(seed):
    rng = np.random.RandomState(seed)
    return [keras.Variable(rng.normal(size=s).astype("float32"))
            for s in SHAPES]


def numpy_values(group):
    return [keras.ops.convert_to_numpy(v) for v in group.values()]


class BulkVariablesTest(TestCase):
    def test_copies_are_snapshots(self):
        group = BulkVariables(variables(0))
        before = numpy_values(group)
        copies = group.copies()
        group.assign([np.zeros(s, "float32") for s in SHAPES])
        for copy, expected in zip(copies, before):
            self.assertAllClose(keras.ops.convert_to_numpy(copy), expected)
        for value in numpy_values(group):
            self.assertAllClose(value, np.zeros_like(value))
        # Assigning the snapshots restores the values.
        group.assign(copies)
        for value, expected in zip(numpy_values(group), before):
            self.assertAllClose(value, expected)

    def test_exchange_and_assign_from(self):
        first, second = BulkVariables(variables(8)), BulkVariables(
            variables(9))
        first_values, second_values = numpy_values(first), numpy_values(
            second)
        previous = first.exchange(second)
        for value, expected in zip(previous, first_values):
            self.assertAllClose(keras.ops.convert_to_numpy(value), expected)
        for value, expected in zip(numpy_values(first), second_values):
            self.assertAllClose(value, expected)
        # The exchanged-in values are copies: changing `second` leaves
        # `first` alone.
        second.assign([np.zeros(s, "float32") for s in SHAPES])
        for value, expected in zip(numpy_values(first), second_values):
            self.assertAllClose(value, expected)
        second.assign_from(first)
        self.assertTrue(second.equals(first))
        first.assign(previous)
        for value, expected in zip(numpy_values(second), second_values):
            self.assertAllClose(value, expected)
        for value, expected in zip(numpy_values(first), first_values):
            self.assertAllClose(value, expected)

    def test_groups_of_equal_shapes_stay_apart(self):
        # A compiled function per group: one traced for a group must not
        # read or write another group's variables of the same shapes.
        first, second = BulkVariables(variables(1)), BulkVariables(
            variables(2))
        expected_second = numpy_values(second)
        first_copies = first.copies()
        second_copies = second.copies()
        for copy, expected in zip(second_copies, expected_second):
            self.assertAllClose(keras.ops.convert_to_numpy(copy), expected)
        first.assign([c * 0 + 7 for c in first_copies])
        for value, expected in zip(numpy_values(second), expected_second):
            self.assertAllClose(value, expected)
        self.assertTrue(all(np.all(v == 7) for v in numpy_values(first)))

    def test_equals(self):
        first, second = BulkVariables(variables(3)), BulkVariables(
            variables(4))
        self.assertFalse(first.equals(second))
        second.assign(first.copies())
        self.assertTrue(first.equals(second))
        last = second.variables[-1]
        changed = keras.ops.convert_to_numpy(last).copy()
        changed[1, 1, 1] += 1.0
        last.assign(changed)
        self.assertFalse(first.equals(second))
        self.assertFalse(second.equals(first))

    def test_assign_checks_the_count(self):
        group = BulkVariables(variables(5))
        with self.assertRaisesRegex(ValueError, "2 values for 3 variables"):
            group.assign(group.copies()[:2])

    def test_two_emas_on_models_of_equal_shapes(self):
        # Each EMA swaps its own model's averaged weights in and out.
        def model_and_data(seed):
            keras.utils.set_random_seed(seed)
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            rng = np.random.RandomState(seed)
            x = rng.normal(size=(16, 3)).astype("float32")
            return model, x, rng.normal(size=(16, 2)).astype("float32")

        fitted = []
        for seed in (0, 1):
            model, x, y = model_and_data(seed)
            ema = EMA(decay=0.5, keep_averaged=False)
            model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                      callbacks=[ema])
            fitted.append((model, ema, model.get_weights()))
        for model, ema, raw in fitted:
            averaged = ema.averaged_model_weights()
            with ema.averaged_weights():
                for value, expected in zip(model.get_weights(), averaged):
                    self.assertAllClose(value, expected)
            for value, expected in zip(model.get_weights(), raw):
                self.assertAllClose(value, expected)

    @unittest.skipUnless(keras.backend.backend() == "tensorflow",
                         "tf.distribute is TensorFlow only")
    def test_distributed_variables(self):
        with mirrored_strategy().scope():
            group = BulkVariables(variables(6))
            other = BulkVariables(variables(7))
        other.assign(group.copies())
        self.assertTrue(group.equals(other))
        for value, expected in zip(numpy_values(other), numpy_values(group)):
            self.assertAllClose(value, expected)


if __name__ == "__main__":
    unittest.main()
