"""Brier score: the mean squared error of the predicted probabilities."""

import keras
from keras import ops

from kreg.metrics._probabilities import check_sample_weight
from kreg.metrics._probabilities import probabilities_and_one_hot
from kreg.metrics._probabilities import rows_shape
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_optional_dtype


def brier_score(y_true, y_pred, from_logits=False):
    """Per prediction: ``sum_c (p_c - t_c)^2`` (multi-class), or
    ``(p - y)^2`` for a single probability unit (binary); shaped as
    `y_pred` without its class axis (one value per sample, or per sample
    and time step), as Keras's metric functions return them."""
    y_pred = ops.convert_to_tensor(y_pred)
    binary = len(y_pred.shape) == 1 or y_pred.shape[-1] == 1
    p, t = probabilities_and_one_hot(y_true, y_pred, from_logits)
    if binary:
        values = ops.square(p[:, 1] - t[:, 1])
    else:
        values = ops.sum(ops.square(p - t), axis=-1)
    return ops.reshape(values, rows_shape(y_pred))


@keras.saving.register_keras_serializable(package="kreg")
class BrierScore(keras.metrics.MeanMetricWrapper):
    """The Brier score, averaged over samples (lower is better).

    ``BS = mean_i sum_c (p_ic - t_ic)^2`` with ``t`` the one-hot label, in
    [0, 2]; for one sigmoid unit the binary form ``mean_i (p_i - y_i)^2``,
    in [0, 1]. A proper scoring rule: it rewards calibrated probabilities
    as well as correct ones.

    Args:
        from_logits: whether `y_pred` holds logits (softmax, or sigmoid for
            one unit). Defaults to `False`.
        name: the metric's name. Defaults to `"brier_score"`.
        dtype: the metric's dtype. Defaults to `None`.

    `y_true` holds integer labels, or one-hot rows of `y_pred`'s shape.
    Predictions may have leading axes besides the samples (time steps):
    ``sample_weight`` of shape ``(samples,)`` weighs every step of a sample,
    ``(samples, steps)`` (a mask) each step, as for Keras's metrics.

    Example:

    ```python
    model.compile("adam", "sparse_categorical_crossentropy",
                  metrics=[kreg.metrics.BrierScore()])
    ```

    Reference:
        Brier, "Verification of forecasts expressed in terms of
        probability", Monthly Weather Review 1950.
    """

    def __init__(self, from_logits=False, name="brier_score", dtype=None):
        self.from_logits = check_bool("from_logits", from_logits)
        check_optional_dtype("dtype", dtype)
        super().__init__(brier_score, name=name, dtype=dtype,
                         from_logits=from_logits)
        self._direction = "down"

    def update_state(self, y_true, y_pred, sample_weight=None):
        check_sample_weight(sample_weight, ops.convert_to_tensor(y_pred))
        return super().update_state(y_true, y_pred,
                                    sample_weight=sample_weight)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype,
                "from_logits": self.from_logits}
