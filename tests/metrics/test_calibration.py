import os
import re
import tempfile

import keras
import numpy as np
from sklearn.metrics import brier_score_loss

from kreg.metrics import BrierScore
from kreg.metrics import ExpectedCalibrationError
from kreg.testing import TestCase


def ece_by_hand(labels, probabilities, num_bins, weights=None):
    weights = np.ones(len(labels)) if weights is None else weights
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    total = 0.0
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        inside = (confidence >= low) & (
            (confidence < high) if b < num_bins - 1 else confidence <= high)
        if not inside.any():
            continue
        w = weights[inside]
        accuracy = np.sum(w * correct[inside]) / w.sum()
        mean_confidence = np.sum(w * confidence[inside]) / w.sum()
        total += w.sum() * abs(accuracy - mean_confidence)
    return total / weights.sum()


class CalibrationTest(TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(0)
        self.logits = rng.normal(0, 2, (500, 4)).astype("float32")
        self.p = self.to_numpy(keras.ops.softmax(self.logits))
        self.labels = rng.randint(0, 4, 500)

    def test_ece_against_numpy(self):
        for bins in (1, 10, 15):
            metric = ExpectedCalibrationError(num_bins=bins)
            metric.update_state(self.labels, self.p)
            self.assertAlmostEqual(float(metric.result()),
                                   ece_by_hand(self.labels, self.p, bins),
                                   places=5)

    def test_ece_accumulates_batches_weights_and_one_hot(self):
        weights = np.random.RandomState(1).uniform(0, 2, 500)
        metric = ExpectedCalibrationError(num_bins=10, from_logits=True)
        one_hot = np.eye(4)[self.labels]
        for start in range(0, 500, 128):
            part = slice(start, start + 128)
            metric.update_state(one_hot[part], self.logits[part],
                                sample_weight=weights[part])
        self.assertAlmostEqual(
            float(metric.result()),
            ece_by_hand(self.labels, self.p, 10, weights), places=5)
        metric.reset_state()
        metric.update_state(self.labels, self.logits)
        self.assertAlmostEqual(float(metric.result()),
                               ece_by_hand(self.labels, self.p, 10),
                               places=5)

    def test_ece_is_zero_when_confidence_matches_accuracy(self):
        # Confidence 1 and always right; confidence 0.5 and right half the
        # time.
        p = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
        metric = ExpectedCalibrationError(num_bins=4)
        metric.update_state(np.array([0, 1, 0, 1]), p)
        self.assertAlmostEqual(float(metric.result()), 0.0, places=6)
        metric.reset_state()
        metric.update_state(np.array([1, 0]), p[:2])  # confident, wrong
        self.assertAlmostEqual(float(metric.result()), 1.0, places=6)

    def test_brier_against_numpy_and_scikit_learn(self):
        metric = BrierScore()
        metric.update_state(self.labels, self.p)
        expected = np.mean(np.sum((self.p - np.eye(4)[self.labels]) ** 2, 1))
        self.assertAlmostEqual(float(metric.result()), expected, places=5)
        y = (self.labels > 1).astype(int)
        logit = self.logits[:, :1]
        metric = BrierScore(from_logits=True)
        metric.update_state(y, logit)
        self.assertAlmostEqual(
            float(metric.result()),
            brier_score_loss(y, 1 / (1 + np.exp(-logit[:, 0]))), places=5)

    def test_metrics_in_compile_fit_and_serialization(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), metrics=[
                BrierScore(from_logits=True),
                ExpectedCalibrationError(num_bins=5, from_logits=True)])
        history = model.fit(self.logits, self.labels, epochs=1, verbose=0,
                            validation_split=0.2)
        for key in ("brier_score", "ece", "val_brier_score", "val_ece"):
            self.assertTrue(np.isfinite(history.history[key][0]), key)
        logs = model.evaluate(self.logits, self.labels, verbose=0,
                              return_dict=True)
        p = self.to_numpy(keras.ops.softmax(model.predict(self.logits,
                                                          verbose=0)))
        self.assertAlmostEqual(logs["ece"], ece_by_hand(self.labels, p, 5),
                               places=4)
        for metric in (BrierScore(from_logits=True),
                       ExpectedCalibrationError(num_bins=7)):
            self.run_config_round_trip(metric)
        stop = keras.callbacks.EarlyStopping("val_ece", mode="auto")
        model.fit(self.logits, self.labels, epochs=1, verbose=0,
                  validation_split=0.2, callbacks=[stop])
        self.assertTrue(bool(stop.monitor_op(0.1, 0.2)))  # lower is better

    def test_bad_arguments(self):
        for kwargs, error, text in (
                (dict(num_bins=0), ValueError, "num_bins=0"),
                (dict(num_bins=2.5), TypeError, "num_bins=2.5"),
                (dict(num_bins=True), TypeError, "num_bins=True"),
                (dict(dtype="bogus"), ValueError, "dtype='bogus'")):
            with self.assertRaisesRegex(error, text):
                ExpectedCalibrationError(**kwargs)
        with self.assertRaisesRegex(TypeError, "from_logits"):
            BrierScore(from_logits="yes")
        self.assertEqual(
            ExpectedCalibrationError(num_bins=np.int64(3)).num_bins, 3)


class WalkthroughCalibrationTest(TestCase):
    def test_walkthrough_ece_equals_the_metric(self):
        from kreg.walkthrough.runner import calibration_bins
        from kreg.walkthrough.runner import expected_calibration_error

        rng = np.random.RandomState(3)
        logits = rng.normal(0, 3, (300, 5))
        labels = rng.randint(0, 5, 300)
        metric = ExpectedCalibrationError(num_bins=15, from_logits=True)
        metric.update_state(labels, logits.astype("float32"))
        self.assertAlmostEqual(
            expected_calibration_error(calibration_bins(logits, labels)),
            float(metric.result()), places=5)


def brier_by_hand(labels, probabilities):
    """Per prediction: sum_c (p_c - t_c)^2, over every leading axis."""
    one_hot = np.eye(probabilities.shape[-1])[labels]
    return np.sum((probabilities - one_hot) ** 2, axis=-1)


class CalibrationCombinationsTest(TestCase):
    """Sample-weight shapes, time steps, both `from_logits`, several
    outputs, fit/evaluate, `.keras` save/load and bad input."""

    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(4)
        # 6 sequences of 5 time steps, 3 classes; a mask of padded steps.
        self.logits = rng.normal(0, 2, (6, 5, 3)).astype("float32")
        self.p = self.to_numpy(keras.ops.softmax(self.logits))
        self.labels = rng.randint(0, 3, (6, 5))
        self.mask = (rng.uniform(size=(6, 5)) > 0.3).astype("float32")

    def brier(self, labels, predictions, **kwargs):
        metric = BrierScore(from_logits=kwargs.pop("from_logits", False))
        metric.update_state(labels, predictions, **kwargs)
        return float(metric.result())

    def ece(self, labels, predictions, **kwargs):
        metric = ExpectedCalibrationError(
            num_bins=5, from_logits=kwargs.pop("from_logits", False))
        metric.update_state(labels, predictions, **kwargs)
        return float(metric.result())

    def test_brier_with_a_time_step_mask_against_numpy(self):
        per_step = brier_by_hand(self.labels, self.p)
        expected = np.sum(per_step * self.mask) / np.sum(self.mask)
        self.assertAlmostEqual(
            self.brier(self.labels, self.p, sample_weight=self.mask),
            expected, places=5)
        # Keras weighs MeanSquaredError per time step the same way; the
        # Brier score is the class count times the mean squared error.
        mse = keras.metrics.MeanSquaredError()
        mse.update_state(np.eye(3)[self.labels], self.p,
                         sample_weight=self.mask)
        self.assertAlmostEqual(3 * float(mse.result()), expected, places=5)
        # One-hot targets, a trailing axis of 1 on the mask and the labels.
        self.assertAlmostEqual(
            self.brier(np.eye(3)[self.labels], self.p,
                       sample_weight=self.mask[..., None]),
            expected, places=5)
        self.assertAlmostEqual(
            self.brier(self.labels[..., None], self.logits,
                       sample_weight=self.mask, from_logits=True),
            expected, places=5)

    def test_brier_with_one_weight_per_sequence(self):
        weights = np.array([0.0, 1.0, 2.0, 0.5, 1.0, 3.0], "float32")
        per_step = brier_by_hand(self.labels, self.p)
        expected = np.sum(per_step * weights[:, None]) / (5 * weights.sum())
        self.assertAlmostEqual(
            self.brier(self.labels, self.p, sample_weight=weights),
            expected, places=5)
        mse = keras.metrics.MeanSquaredError()
        mse.update_state(np.eye(3)[self.labels], self.p,
                         sample_weight=weights)
        self.assertAlmostEqual(3 * float(mse.result()), expected, places=5)

    def test_binary_brier_per_time_step(self):
        p1 = self.p[..., :1]  # (6, 5, 1): one probability per step
        y = (self.labels > 0).astype("float32")
        expected = (np.sum((p1[..., 0] - y) ** 2 * self.mask)
                    / np.sum(self.mask))
        self.assertAlmostEqual(
            self.brier(y, p1, sample_weight=self.mask), expected, places=5)
        logit = np.log(p1 / (1 - p1))
        self.assertAlmostEqual(
            self.brier(y, logit, sample_weight=self.mask, from_logits=True),
            expected, places=4)

    def test_ece_with_a_time_step_mask_and_sequence_weights(self):
        flat_p = self.p.reshape(-1, 3)
        flat_labels = self.labels.reshape(-1)
        expected = ece_by_hand(flat_labels, flat_p, 5,
                               self.mask.reshape(-1))
        self.assertAlmostEqual(
            self.ece(self.labels, self.p, sample_weight=self.mask),
            expected, places=5)
        self.assertAlmostEqual(
            self.ece(self.labels, self.logits, from_logits=True,
                     sample_weight=self.mask[..., None]),
            expected, places=5)
        weights = np.array([0.0, 1.0, 2.0, 0.5, 1.0, 3.0], "float32")
        self.assertAlmostEqual(
            self.ece(self.labels, self.p, sample_weight=weights),
            ece_by_hand(flat_labels, flat_p, 5, np.repeat(weights, 5)),
            places=5)

    def test_from_logits_both_ways_and_one_sigmoid_unit(self):
        flat_logits = self.logits.reshape(-1, 3)
        flat_p = self.p.reshape(-1, 3)
        flat_labels = self.labels.reshape(-1)
        expected = np.mean(brier_by_hand(flat_labels, flat_p))
        self.assertAlmostEqual(self.brier(flat_labels, flat_p), expected,
                               places=5)
        self.assertAlmostEqual(
            self.brier(flat_labels, flat_logits, from_logits=True),
            expected, places=5)
        # One sigmoid unit, given as (n,) or (n, 1): the binary forms.
        y = (flat_labels > 0).astype(int)
        p1 = flat_p[:, 0]
        two_class = np.stack([1 - p1, p1], axis=1)
        for shape in ((-1,), (-1, 1)):
            self.assertAlmostEqual(self.brier(y, p1.reshape(shape)),
                                   brier_score_loss(y, p1), places=5)
            self.assertAlmostEqual(self.ece(y, p1.reshape(shape)),
                                   ece_by_hand(y, two_class, 5), places=5)
            logit = np.log(p1 / (1 - p1)).reshape(shape)
            self.assertAlmostEqual(
                self.ece(y, logit, from_logits=True),
                ece_by_hand(y, two_class, 5), places=5)

    def several_outputs_model(self):
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(8, activation="relu")(inputs)
        return keras.Model(inputs, {
            "classes": keras.layers.Dense(3, name="classes")(hidden),
            "flag": keras.layers.Dense(1, name="flag")(hidden)})

    def test_several_outputs_fit_evaluate_and_save_load(self):
        rng = np.random.RandomState(5)
        x = rng.normal(size=(64, 4)).astype("float32")
        y = {"classes": rng.randint(0, 3, 64),
             "flag": rng.randint(0, 2, (64, 1)).astype("float32")}
        model = self.several_outputs_model()
        model.compile(
            "sgd",
            loss={"classes": keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  "flag": keras.losses.BinaryCrossentropy(from_logits=True)},
            metrics={"classes": [BrierScore(from_logits=True),
                                 ExpectedCalibrationError(
                                     num_bins=5, from_logits=True)],
                     "flag": [BrierScore(from_logits=True)]})
        history = model.fit(x, y, epochs=1, batch_size=32, verbose=0)
        for key in ("classes_brier_score", "classes_ece",
                    "flag_brier_score"):
            self.assertTrue(np.isfinite(history.history[key][0]), key)
        outputs = model.predict(x, verbose=0)
        p = self.to_numpy(keras.ops.softmax(outputs["classes"]))
        flag = 1 / (1 + np.exp(-outputs["flag"][:, 0].astype("float64")))
        expected = {
            "classes_brier_score": np.mean(brier_by_hand(y["classes"], p)),
            "classes_ece": ece_by_hand(y["classes"], p, 5),
            "flag_brier_score": np.mean((flag - y["flag"][:, 0]) ** 2),
        }
        # Evaluated by the reloaded model (its compiled metrics included).
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.keras")
            model.save(path)
            reloaded = keras.models.load_model(path)
        logs = reloaded.evaluate(x, y, verbose=0, return_dict=True)
        for key, value in expected.items():
            self.assertAlmostEqual(logs[key], value, places=4, msg=key)

    def test_time_steps_with_a_mask_in_fit_and_evaluate(self):
        rng = np.random.RandomState(6)
        x = rng.normal(size=(6, 5, 4)).astype("float32")
        model = keras.Sequential([keras.Input((5, 4)), keras.layers.Dense(3)])
        model.compile(
            "sgd", keras.losses.SparseCategoricalCrossentropy(
                from_logits=True),
            # Keras passes `sample_weight` to the weighted metrics only.
            weighted_metrics=[
                BrierScore(from_logits=True),
                ExpectedCalibrationError(num_bins=5, from_logits=True)])
        history = model.fit(x, self.labels, sample_weight=self.mask,
                            epochs=1, batch_size=3, verbose=0)
        self.assertTrue(np.isfinite(history.history["brier_score"][0]))
        logs = model.evaluate(x, self.labels, sample_weight=self.mask,
                              batch_size=3, verbose=0, return_dict=True)
        p = self.to_numpy(keras.ops.softmax(model.predict(x, verbose=0)))
        per_step = brier_by_hand(self.labels, p)
        self.assertAlmostEqual(
            logs["brier_score"],
            np.sum(per_step * self.mask) / np.sum(self.mask), places=4)
        self.assertAlmostEqual(
            logs["ece"],
            ece_by_hand(self.labels.reshape(-1), p.reshape(-1, 3), 5,
                        self.mask.reshape(-1)), places=4)

    def test_labels_and_weights_that_do_not_fit_the_predictions(self):
        for metric in (BrierScore(), ExpectedCalibrationError()):
            name = type(metric).__name__
            with self.assertRaisesRegex(
                    ValueError, r"`y_true`.*y_true.shape=\(4, 5\)",
                    msg=name):
                metric.update_state(self.labels[:4], self.p)
            with self.assertRaisesRegex(
                    ValueError, r"`y_true`.*y_true.shape=\(6, 5, 4\)",
                    msg=name):
                metric.update_state(np.zeros((6, 5, 4)), self.p)
            for weights in (np.ones(4), np.ones((6, 4)),
                            np.ones((6, 5, 2))):
                with self.assertRaisesRegex(
                        ValueError,
                        r"`sample_weight`.*shape="
                        + re.escape(str(weights.shape)),
                        msg=name):
                    metric.update_state(self.labels, self.p,
                                        sample_weight=weights)
