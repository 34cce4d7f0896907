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
