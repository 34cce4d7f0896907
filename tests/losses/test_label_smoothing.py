import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized

from kreg.losses import LabelSmoothingCrossentropy
from kreg.losses import label_smoothing_crossentropy
from kreg.losses import smooth_labels
from kreg.optimizers import ClippedOptimizer
from kreg.testing import TestCase

LABELS = np.array([0, 3, 1, 2, 3])
ONE_HOT = np.eye(4, dtype="float32")[LABELS]


def numpy_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_targets(labels, k, eps):
    t = np.full((len(labels), k), eps / (k - 1))
    t[np.arange(len(labels)), labels] = 1 - eps
    return t


class SmoothLabelsTest(TestCase):
    def test_lecture_values_k4_eps03(self):
        expected = np.array([[0.7, 0.1, 0.1, 0.1]] * 5)
        expected = np.take_along_axis(
            expected, (np.arange(4)[None] - LABELS[:, None]) % 4, axis=1
        )
        from_one_hot = smooth_labels(ONE_HOT, 0.3)
        from_int = smooth_labels(LABELS, 0.3, num_classes=4)
        self.assertAllClose(from_one_hot, expected, atol=1e-7)
        self.assertAllClose(from_int, expected, atol=1e-7)
        self.assertAllClose(self.to_numpy(from_int).sum(-1), np.ones(5))
        self.assertEqual(self.to_numpy(from_int).dtype, np.float32)

    def test_rows_sum_to_one_and_special_values(self):
        rng = np.random.RandomState(0)
        for k in (2, 3, 10):
            labels = rng.randint(0, k, size=(6, 2))
            for eps in (0.0, 0.05, 0.5, (k - 1) / k, 1.0):
                t = self.to_numpy(smooth_labels(labels, eps, num_classes=k))
                self.assertEqual(t.shape, (6, 2, k))
                self.assertAllClose(t.sum(-1), np.ones((6, 2)), atol=1e-6)
                on = np.take_along_axis(t, labels[..., None], -1)
                self.assertAllClose(on, np.full((6, 2, 1), 1 - eps),
                                    atol=1e-6)
        uniform = smooth_labels(ONE_HOT, 0.75)
        self.assertAllClose(uniform, np.full((5, 4), 0.25), atol=1e-7)
        self.assertAllClose(smooth_labels(ONE_HOT, 0.0), ONE_HOT)

    def test_differs_from_keras_and_reproduces_it(self):
        y_pred = numpy_softmax(
            np.random.RandomState(1).normal(size=(5, 4))
        ).astype("float32")
        keras_loss = keras.losses.CategoricalCrossentropy(
            label_smoothing=0.2
        )(ONE_HOT, y_pred)
        ours_same = LabelSmoothingCrossentropy(0.2 * 3 / 4)(ONE_HOT, y_pred)
        ours = LabelSmoothingCrossentropy(0.2)(ONE_HOT, y_pred)
        self.assertAllClose(ours_same, keras_loss, atol=1e-6)
        self.assertGreater(
            abs(float(self.to_numpy(ours)) - float(self.to_numpy(keras_loss))),
            1e-3,
        )

    def test_bad_arguments(self):
        for bad in (-0.1, 1.5, float("nan")):
            with self.assertRaisesRegex(ValueError, "`epsilon`.*epsilon="):
                smooth_labels(ONE_HOT, bad)
        with self.assertRaisesRegex(TypeError, "`epsilon`"):
            smooth_labels(ONE_HOT, "0.1")
        for bad in (1, 0, -3):
            with self.assertRaisesRegex(ValueError, "`num_classes`"):
                smooth_labels(LABELS, 0.1, num_classes=bad)
        for bad in (2.5, True, "4"):
            with self.assertRaisesRegex(TypeError, "`num_classes`"):
                smooth_labels(LABELS, 0.1, num_classes=bad)
        with self.assertRaisesRegex(ValueError, "`y`"):
            smooth_labels(np.ones((3, 1)), 0.1)


class LabelSmoothingCrossentropyTest(TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.logits = np.random.RandomState(2).normal(
            size=(5, 4)
        ).astype("float32")
        self.probs = numpy_softmax(self.logits).astype("float32")

    @parameterized.parameters(
        ("one_hot", True), ("one_hot", False), ("int", True),
        ("int", False), ("int_column", True), ("int_column", False),
    )
    def test_equals_hand_cross_entropy(self, form, from_logits):
        y_true = {
            "one_hot": ONE_HOT, "int": LABELS, "int_column": LABELS[:, None],
        }[form]
        y_pred = self.logits if from_logits else self.probs
        targets = numpy_targets(LABELS, 4, 0.3)
        per_sample = -(targets * np.log(self.probs)).sum(-1)
        loss = LabelSmoothingCrossentropy(0.3, from_logits=from_logits)
        self.assertAllClose(loss(y_true, y_pred), per_sample.mean(),
                            atol=1e-5)
        self.assertAllClose(
            label_smoothing_crossentropy(y_true, y_pred, 0.3, from_logits),
            per_sample, atol=1e-5,
        )
        weights = np.array([1.0, 0.0, 2.0, 1.0, 0.5], "float32")
        self.assertAllClose(
            loss(y_true, y_pred, sample_weight=weights),
            (per_sample * weights).sum() / 5, atol=1e-5,
        )

    def test_epsilon_zero_equals_keras(self):
        for from_logits in (True, False):
            y_pred = self.logits if from_logits else self.probs
            ours = LabelSmoothingCrossentropy(0.0, from_logits=from_logits)
            self.assertAllClose(
                ours(ONE_HOT, y_pred),
                keras.losses.CategoricalCrossentropy(
                    from_logits=from_logits)(ONE_HOT, y_pred),
                atol=1e-6,
            )
            self.assertAllClose(
                ours(LABELS, y_pred),
                keras.losses.SparseCategoricalCrossentropy(
                    from_logits=from_logits)(LABELS, y_pred),
                atol=1e-6,
            )

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "`epsilon`.*epsilon=2"):
            LabelSmoothingCrossentropy(2.0)
        with self.assertRaisesRegex(TypeError, "`from_logits`"):
            LabelSmoothingCrossentropy(0.1, from_logits="yes")
        with self.assertRaisesRegex(ValueError, "`y_pred`"):
            LabelSmoothingCrossentropy(0.1)(np.ones((3, 1)),
                                            np.ones((3, 1)))

    def test_config_round_trip(self):
        loss = LabelSmoothingCrossentropy(0.25, from_logits=True,
                                          reduction="sum", name="ls")
        _, revived = self.run_config_round_trip(loss)
        self.assertAllClose(revived(LABELS, self.logits),
                            loss(LABELS, self.logits))

    def model(self):
        return keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(4),
        ])

    def test_compiled_fit_with_integer_labels_and_save(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(32, 6)).astype("float32")
        labels = rng.randint(0, 4, size=(32,))
        model = self.model()
        loss = LabelSmoothingCrossentropy(0.2, from_logits=True)
        self.run_compiled_fit(model, x, labels, loss=loss)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "m.keras")
            model.save(path)
            reloaded = keras.models.load_model(path)
        self.assertIsInstance(reloaded.loss, LabelSmoothingCrossentropy)
        self.assertEqual(reloaded.loss.epsilon, 0.2)
        self.assertTrue(reloaded.loss.from_logits)
        self.assertAllClose(
            reloaded.evaluate(x, labels, verbose=0),
            model.evaluate(x, labels, verbose=0), atol=1e-5,
        )

    def test_mixed_float16(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(16, 6)).astype("float32")
        labels = rng.randint(0, 4, size=(16,))
        with self.mixed_precision("mixed_float16"):
            model = self.model()
            self.run_compiled_fit(
                model, x, labels,
                loss=LabelSmoothingCrossentropy(0.1, from_logits=True),
            )
        value = LabelSmoothingCrossentropy(0.1, from_logits=True)(
            LABELS, self.logits.astype("float16")
        )
        self.assertEqual(self.to_numpy(value).dtype, np.float32)


class LabelRangeTest(TestCase):
    """Labels outside [0, k) or integer labels without `num_classes`: an
    error for NumPy labels, NaN rows (never silently wrong rows) for
    backend tensors."""

    def test_numpy_labels_outside_the_classes_raise(self):
        for labels in ([0, 1, 4], [-1, 0, 2], [0, 1.5, 2], [0, np.nan, 1]):
            with self.assertRaisesRegex(
                    ValueError, r"`y`.*\[0, 3\).*num_classes=3"):
                smooth_labels(np.array(labels), 0.1, num_classes=3)
        with self.assertRaisesRegex(ValueError, r"`y_true`.*\[0, 4\)"):
            label_smoothing_crossentropy(np.array([0, 4]), ONE_HOT[:2])

    def test_integer_labels_without_num_classes_raise(self):
        with self.assertRaisesRegex(
                ValueError, "`num_classes`.*Received: num_classes=None"):
            smooth_labels(np.array([0, 1, 4]), 0.1)
        with self.assertRaisesRegex(
                ValueError, "`num_classes`.*Received: num_classes=None"):
            smooth_labels(keras.ops.convert_to_tensor([0, 1, 2]), 0.1)
        # Not one-hot: entries outside [0, 1], or rows not summing to 1.
        for y in ([0.0, 1.0, 4.0], [[0.0, 1.0], [1.0, 1.0]]):
            with self.assertRaisesRegex(ValueError, "`y`.*one-hot"):
                smooth_labels(np.array(y), 0.1)

    def test_numpy_integers_and_integer_one_hot_accepted(self):
        self.assertAllClose(
            smooth_labels(LABELS, 0.3, num_classes=np.int64(4)),
            numpy_targets(LABELS, 4, 0.3))
        self.assertAllClose(
            smooth_labels(ONE_HOT.astype("int32"), 0.3),
            numpy_targets(LABELS, 4, 0.3))

    def test_tensor_labels_outside_give_nan_rows(self):
        labels = keras.ops.convert_to_tensor(np.array([0, 4, -1, 2]))
        got = self.to_numpy(smooth_labels(labels, 0.3, num_classes=4))
        self.assertAllClose(got[[0, 3]], numpy_targets([0, 2], 4, 0.3))
        self.assertTrue(np.all(np.isnan(got[[1, 2]])))
        y_pred = keras.ops.convert_to_tensor(ONE_HOT[:4] * 0.7 + 0.075)
        loss = self.to_numpy(LabelSmoothingCrossentropy(
            0.1, reduction=None)(labels, y_pred))
        self.assertTrue(np.all(np.isfinite(loss[[0, 3]])))
        self.assertTrue(np.all(np.isnan(loss[[1, 2]])))

    def test_out_of_range_label_in_fit_gives_nan_loss(self):
        # With a ClippedOptimizer the NaN step is skipped: weights intact.
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
        model.compile(ClippedOptimizer(keras.optimizers.SGD(0.1)),
                      LabelSmoothingCrossentropy(0.1, from_logits=True))
        x = np.ones((4, 2), "float32")
        before = model.get_weights()
        history = model.fit(x, np.array([0, 1, 2, 3]), verbose=0)
        self.assertTrue(np.isnan(history.history["loss"][0]))
        for a, b in zip(model.get_weights(), before):
            self.assertAllEqual(a, b)
        history = model.fit(x, np.array([0, 1, 2, 2]), verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][0]))
