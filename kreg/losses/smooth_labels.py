"""The lecture's label smoothing: 1 - epsilon and epsilon / (k - 1)."""

import numbers

import keras

from kreg.utils.validation import check_number


def check_num_classes(num_classes):
    """Returns ``num_classes`` after checking it is ``None`` or an int >= 2."""
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(
        num_classes, numbers.Integral
    ):
        raise TypeError(
            "Invalid value received for argument `num_classes`. Expected "
            f"None or an integer >= 2. Received: num_classes={num_classes!r}"
        )
    if num_classes < 2:
        raise ValueError(
            "Invalid value received for argument `num_classes`. Expected "
            f"None or an integer >= 2. Received: num_classes={num_classes!r}"
        )
    return int(num_classes)


def smooth_one_hot(one_hot, epsilon):
    """Smooths float one-hot (or soft) targets over their last axis."""
    k = one_hot.shape[-1]
    if k is None or k < 2:
        raise ValueError(
            "Invalid value received for argument `y`. Expected one-hot "
            "labels with a known last dimension k >= 2 (or integer labels "
            f"with `num_classes`). Received: y of shape {one_hot.shape}"
        )
    on = 1.0 - epsilon
    off = epsilon / (k - 1)
    on = keras.ops.cast(on, one_hot.dtype)
    off = keras.ops.cast(off, one_hot.dtype)
    return one_hot * on + (1 - one_hot) * off


def smooth_labels(y, epsilon, num_classes=None):
    """Soft targets as in the lecture: ``1 - epsilon`` and ``epsilon/(k-1)``.

    With ``k`` classes, the correct class gets ``1 - epsilon`` and each of the
    other ``k - 1`` classes ``epsilon / (k - 1)`` (labels assumed wrong with
    probability ``epsilon``, the error spread evenly over the wrong classes).
    Each row still sums to 1. For one-hot rows::

        smoothed = y * (1 - epsilon) + (1 - y) * epsilon / (k - 1)

    This is NOT Keras's ``label_smoothing=epsilon``, which gives
    ``1 - epsilon + epsilon / k`` and ``epsilon / k``.
    ``smooth_labels(y, e * (k - 1) / k)`` reproduces Keras's ``e``.

    Args:
        y: one-hot (or soft) labels with the classes on the last axis when
            ``num_classes`` is ``None``; integer class indices of any shape
            otherwise (the class axis is appended).
        epsilon: float in [0, 1], the label-noise probability. ``0`` leaves
            one-hot labels unchanged; ``(k - 1) / k`` gives uniform targets.
        num_classes: ``None`` for one-hot ``y``, or the number of classes
            ``k >= 2`` for integer ``y``. Defaults to ``None``.

    Returns:
        A float tensor of shape ``y.shape`` (one-hot) or
        ``y.shape + (num_classes,)`` (integer), in ``y``'s float dtype or in
        ``keras.config.floatx()`` for integer input.

    Example:
        >>> kreg.losses.smooth_labels([0, 2], 0.3, num_classes=4)
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]]

    Reference:
        Szegedy et al., "Rethinking the Inception Architecture for Computer
        Vision", CVPR 2016 (label smoothing); Goodfellow, Bengio & Courville,
        "Deep Learning", section 7.5.1.
    """
    epsilon = check_number("epsilon", epsilon, 0.0, 1.0)
    num_classes = check_num_classes(num_classes)
    y = keras.ops.convert_to_tensor(y)
    if num_classes is None:
        if not keras.backend.is_float_dtype(y.dtype):
            y = keras.ops.cast(y, keras.config.floatx())
        return smooth_one_hot(y, epsilon)
    one_hot = keras.ops.one_hot(
        keras.ops.cast(y, "int32"), num_classes, dtype=keras.config.floatx()
    )
    return smooth_one_hot(one_hot, epsilon)
