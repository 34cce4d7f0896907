"""Cross-entropy against the lecture's smoothed labels."""

import keras

from kreg.losses.smooth_labels import check_class_indices
from kreg.losses.smooth_labels import host_array
from kreg.losses.smooth_labels import one_hot_or_nan
from kreg.losses.smooth_labels import smooth_one_hot
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_number
from kreg.utils.validation import check_optional_dtype


def _targets(y_true, y_pred, epsilon, host_labels=None):
    """Smoothed one-hot targets from one-hot or integer ``y_true``
    (``host_labels``: its NumPy values, checked, if it was host data)."""
    k = y_pred.shape[-1]
    if k is None or k < 2:
        raise ValueError(
            "Invalid value received for argument `y_pred`. Expected a known "
            f"last (class) dimension >= 2. Received: y_pred of shape "
            f"{y_pred.shape}"
        )
    one_hot = len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] in (
        k, None
    )
    if not one_hot:
        labels = y_true
        if len(labels.shape) == len(y_pred.shape):  # (..., 1) integer labels
            labels = keras.ops.squeeze(labels, axis=-1)
        if host_labels is not None:
            check_class_indices("y_true", host_labels, k)
        y_true = one_hot_or_nan(labels, k, y_pred.dtype)
    else:
        y_true = keras.ops.cast(y_true, y_pred.dtype)
    return smooth_one_hot(y_true, epsilon)


def label_smoothing_crossentropy(y_true, y_pred, epsilon=0.1,
                                 from_logits=False):
    """Per-sample cross-entropy against the lecture's smoothed labels.

    ``-sum_c t_c * log p_c`` with ``t = smooth_labels(y_true, epsilon)``
    (``1 - epsilon`` on the true class, ``epsilon / (k - 1)`` elsewhere) and
    ``p = softmax(y_pred)`` if ``from_logits`` else ``y_pred`` (normalized to
    sum 1 and clipped to ``[1e-7, 1 - 1e-7]``, as Keras does). ``y_true`` is
    one-hot (same shape as ``y_pred``) or integer class indices (shape
    ``y_pred.shape[:-1]`` or with a trailing 1). Integer labels given as
    NumPy arrays or lists must lie in ``[0, k)`` (else ``ValueError``); in
    backend tensors a label outside gives a NaN loss for that sample.
    """
    epsilon = check_number("epsilon", epsilon, 0.0, 1.0)
    from_logits = check_bool("from_logits", from_logits)
    host_labels = host_array(y_true)
    y_pred = keras.ops.convert_to_tensor(y_pred)
    y_true = keras.ops.convert_to_tensor(y_true)
    targets = _targets(y_true, y_pred, epsilon, host_labels)
    if from_logits:
        log_p = keras.ops.log_softmax(y_pred, axis=-1)
    else:
        p = y_pred / keras.ops.sum(y_pred, axis=-1, keepdims=True)
        tiny = keras.config.epsilon()
        log_p = keras.ops.log(keras.ops.clip(p, tiny, 1.0 - tiny))
    return -keras.ops.sum(targets * log_p, axis=-1)


@keras.saving.register_keras_serializable(package="kreg")
class LabelSmoothingCrossentropy(keras.losses.Loss):
    """Cross-entropy with the lecture's label smoothing, one-hot or integer.

    ``loss = -sum_c t_c * log p_c`` with smoothed targets
    ``t_c = 1 - epsilon`` for the true class and ``epsilon / (k - 1)`` for
    each of the other ``k - 1`` classes (see `kreg.losses.smooth_labels`).

    A drop-in for `keras.losses.CategoricalCrossentropy` and
    `keras.losses.SparseCategoricalCrossentropy` at once: ``y_true`` may be
    one-hot (same shape as ``y_pred``) or integer class indices (shape
    ``y_pred.shape[:-1]``, or with a trailing 1), told apart by their shape.
    Differences from Keras: the smoothing is the lecture's
    ``epsilon / (k - 1)`` (Keras's ``label_smoothing=e`` equals
    ``epsilon = e * (k - 1) / k`` here), and integer labels can be smoothed
    (Keras's sparse loss cannot). With ``epsilon=0`` it equals Keras's
    categorical / sparse categorical cross-entropy. Classes are on the last
    axis. An integer label outside ``[0, k)`` gives that sample a NaN loss
    (marked in-graph, no device sync; Keras's sparse loss fails on CPU and
    gives NaN on GPU): a NaN loss in ``fit`` points at the labels.

    Args:
        epsilon: float in [0, 1], the label-noise probability. Defaults to
            ``0.1``.
        from_logits: whether ``y_pred`` are logits (softmax applied here) or
            probabilities. Defaults to ``False``.
        reduction: as in `keras.losses.Loss`. Defaults to
            ``"sum_over_batch_size"``.
        name: the loss name. Defaults to
            ``"label_smoothing_crossentropy"``.
        dtype: the computation dtype. Defaults to ``None`` (floatx).

    Example:
        >>> model.compile(
        ...     optimizer="adam",
        ...     loss=kreg.losses.LabelSmoothingCrossentropy(
        ...         0.1, from_logits=True))
        >>> model.fit(x, integer_labels)

    Reference:
        Szegedy et al., "Rethinking the Inception Architecture for Computer
        Vision", CVPR 2016.
    """

    def __init__(self, epsilon=0.1, from_logits=False,
                 reduction="sum_over_batch_size",
                 name="label_smoothing_crossentropy", dtype=None):
        check_optional_dtype("dtype", dtype)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.epsilon = check_number("epsilon", epsilon, 0.0, 1.0)
        self.from_logits = check_bool("from_logits", from_logits)

    def call(self, y_true, y_pred):
        return label_smoothing_crossentropy(
            y_true, y_pred, epsilon=self.epsilon, from_logits=self.from_logits
        )

    def get_config(self):
        config = {"epsilon": self.epsilon, "from_logits": self.from_logits}
        return {**super().get_config(), **config}
