"""Expected calibration error (ECE) of the predicted class probabilities."""

import keras
from keras import ops

from kreg.metrics._probabilities import probabilities_and_one_hot
from kreg.metrics._probabilities import weights_per_prediction
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_integer
from kreg.utils.validation import check_optional_dtype


@keras.saving.register_keras_serializable(package="kreg")
class ExpectedCalibrationError(keras.metrics.Metric):
    """How far the confidence is from the accuracy, over confidence bins.

    Each sample's confidence is its largest predicted probability
    ``c_i = max_c p_ic``, its prediction correct when that class is the
    label. With the samples grouped into ``num_bins`` equal bins of
    confidence over [0, 1], ``B_b``::

        ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|

    in [0, 1] (0: perfectly calibrated; lower is better). Sample weights
    weigh the counts.

    Args:
        num_bins: the number of confidence bins. Defaults to `15`.
        from_logits: whether `y_pred` holds logits (softmax, or sigmoid for
            one unit). Defaults to `False`.
        name: the metric's name. Defaults to `"ece"`.
        dtype: the metric's dtype. Defaults to `None`.

    `y_true` holds integer labels, or one-hot rows of `y_pred`'s shape.
    Every prediction counts, over all leading axes (samples, time steps);
    ``sample_weight`` of shape ``(samples,)`` weighs every step of a
    sample, ``(samples, steps)`` (a mask) each step.

    Example:

    ```python
    metric = kreg.metrics.ExpectedCalibrationError(num_bins=10)
    metric.update_state(y_test, model.predict(x_test))
    print(float(metric.result()))
    ```

    Reference:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017;
        Naeini et al., AAAI 2015.
    """

    def __init__(self, num_bins=15, from_logits=False, name="ece",
                 dtype=None):
        check_optional_dtype("dtype", dtype)
        super().__init__(name=name, dtype=dtype)
        self.num_bins = check_integer("num_bins", num_bins, low=1)
        self.from_logits = check_bool("from_logits", from_logits)
        self._direction = "down"
        self.counts, self.confidences, self.hits = (
            self.add_variable(shape=(self.num_bins,), initializer="zeros",
                              name=name)
            for name in ("counts", "confidences", "hits"))

    def update_state(self, y_true, y_pred, sample_weight=None):
        p, t = probabilities_and_one_hot(y_true, y_pred, self.from_logits)
        confidence = ops.max(p, axis=-1)
        hit = ops.cast(ops.equal(ops.argmax(p, axis=-1),
                                 ops.argmax(t, axis=-1)), "float32")
        bins = ops.minimum(
            ops.cast(ops.floor(confidence * self.num_bins), "int32"),
            self.num_bins - 1)
        member = ops.one_hot(bins, self.num_bins)  # (samples, bins)
        if sample_weight is not None:
            weight = weights_per_prediction(sample_weight, y_pred)
            member = member * weight[:, None]
        for variable, values in ((self.counts, None),
                                 (self.confidences, confidence),
                                 (self.hits, hit)):
            rows = member if values is None else member * values[:, None]
            variable.assign(variable + ops.cast(ops.sum(rows, axis=0),
                                                variable.dtype))

    def result(self):
        total = ops.maximum(ops.sum(self.counts), 1e-12)
        return ops.sum(ops.abs(self.hits - self.confidences)) / total

    def reset_state(self):
        for variable in (self.counts, self.confidences, self.hits):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype,
                "num_bins": self.num_bins, "from_logits": self.from_logits}
