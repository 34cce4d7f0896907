"""LabelSmoothingCrossentropy in the combinations of COMBINATIONS.md: every
reduction with sample weights, logits and probabilities, integer and
one-hot labels, sequence outputs, class weights and several outputs in a
compiled fit, against NumPy and Keras's CategoricalCrossentropy."""

import keras
import numpy as np
from absl.testing import parameterized

from kreg.losses import LabelSmoothingCrossentropy
from kreg.testing import TestCase

REDUCTIONS = ("sum_over_batch_size", "sum", "mean_with_sample_weight",
              "none")


def numpy_loss(labels, logits, weights, epsilon, reduction):
    """The lecture's smoothed cross-entropy of integer `labels`, reduced
    as Keras reduces weighted per-sample losses."""
    k = logits.shape[-1]
    targets = np.full(logits.shape, epsilon / (k - 1))
    np.put_along_axis(targets, labels[..., None], 1.0 - epsilon, axis=-1)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    weighted = -(targets * log_p).sum(axis=-1) * weights
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if reduction == "sum_over_batch_size":
        return weighted.sum() / weighted.size
    return weighted.sum() / np.broadcast_to(weights, weighted.shape).sum()


class ReductionTest(TestCase, parameterized.TestCase):
    @parameterized.product(from_logits=[True, False], shape=[(6,), (3, 4)])
    def test_every_reduction_with_sample_weight(self, from_logits, shape):
        # Integer and one-hot labels; per-sample outputs (batch,) and
        # sequence outputs (batch, steps) with per-step weights.
        rng = np.random.RandomState(0)
        k, epsilon, keras_epsilon = 4, 0.3, 0.3 * 4 / 3
        labels = rng.randint(0, k, shape)
        logits = rng.randn(*shape, k).astype("float32")
        weights = rng.uniform(0.2, 2.0, shape).astype("float32")
        y_pred = logits if from_logits else self.to_numpy(
            keras.ops.softmax(logits))
        one_hot = np.eye(k, dtype="float32")[labels]
        for reduction in REDUCTIONS:
            with self.subTest(reduction=reduction):
                expected = numpy_loss(labels, logits.astype("float64"),
                                      weights, epsilon, reduction)
                loss = LabelSmoothingCrossentropy(
                    epsilon, from_logits=from_logits, reduction=reduction)
                keras_loss = keras.losses.CategoricalCrossentropy(
                    from_logits=from_logits, label_smoothing=keras_epsilon,
                    reduction=reduction)
                reference = keras_loss(one_hot, y_pred,
                                       sample_weight=weights)
                self.assertAllClose(reference, expected, atol=1e-5,
                                    rtol=1e-5)
                for y_true in (labels, one_hot):
                    actual = loss(y_true, y_pred, sample_weight=weights)
                    self.assertAllClose(actual, expected, atol=1e-5,
                                        rtol=1e-5)


def _data(n=32, k=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 5).astype("float32")
    labels = rng.randint(0, k, n)
    return x, labels, np.eye(k, dtype="float32")[labels]


class FitTest(TestCase, parameterized.TestCase):
    """A model trained with kreg's loss on integer labels equals the same
    model trained with Keras's CategoricalCrossentropy(label_smoothing=e)
    on one-hot labels (``epsilon = e * (k - 1) / k``)."""

    def _model(self, outputs=1):
        keras.utils.set_random_seed(2)
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(6, activation="tanh")(inputs)
        heads = [keras.layers.Dense(3, name=f"head{i}")(hidden)
                 for i in range(outputs)]
        return keras.Model(inputs, heads if outputs > 1 else heads[0])

    def _fit_both(self, make_losses, fit_kwargs, ours, theirs,
                  loss_weights=None, outputs=1, jit="auto"):
        weights = []
        for losses, y in ((make_losses(True), ours),
                          (make_losses(False), theirs)):
            model = self._model(outputs)
            model.compile(keras.optimizers.SGD(0.2), losses,
                          loss_weights=loss_weights,
                          jit_compile=jit)
            model.fit(*y, epochs=2, shuffle=False, verbose=0, **fit_kwargs)
            weights.append(model.get_weights())
        for a, b in zip(*weights):
            self.assertAllClose(a, b, atol=1e-5, rtol=1e-5)

    def test_class_weight_sum_reduction_and_logits(self):
        x, labels, one_hot = _data()

        def losses(kreg_loss):
            if kreg_loss:
                return LabelSmoothingCrossentropy(0.2, from_logits=True,
                                                  reduction="sum")
            return keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=0.3, reduction="sum")

        self._fit_both(losses, {"class_weight": {0: 0.5, 1: 2.0, 2: 1.0},
                                "batch_size": 8},
                       (x, labels), (x, one_hot),
                       jit=self.jit_compile_setting())

    def test_two_outputs_sample_weight_and_tf_data(self):
        import tensorflow as tf

        x, labels, one_hot = _data()
        _, labels2, one_hot2 = _data(seed=1)
        weights = np.random.RandomState(3).uniform(0.1, 2, 32).astype(
            "float32")

        def losses(kreg_loss):
            if kreg_loss:
                return [LabelSmoothingCrossentropy(
                            0.2, from_logits=True,
                            reduction="mean_with_sample_weight"),
                        LabelSmoothingCrossentropy(0.4, from_logits=True)]
            return [keras.losses.CategoricalCrossentropy(
                        from_logits=True, label_smoothing=0.3,
                        reduction="mean_with_sample_weight"),
                    keras.losses.CategoricalCrossentropy(
                        from_logits=True, label_smoothing=0.6)]

        def dataset(first, second):
            return (tf.data.Dataset.from_tensor_slices(
                (x, (first, second), weights)).batch(8),)

        self._fit_both(losses, {}, dataset(labels, labels2),
                       dataset(one_hot, one_hot2), loss_weights=[1.0, 0.5],
                       outputs=2)
