"""The lecture's label smoothing: 1 - epsilon and epsilon / (k - 1)."""

import numbers

import keras
import numpy as np

from kreg.utils.validation import check_integer
from kreg.utils.validation import check_number


def check_num_classes(num_classes):
    """Returns ``num_classes`` after checking it is ``None`` or an int >= 2."""
    return check_integer("num_classes", num_classes, low=2, allow_none=True)


def host_array(y):
    """``y`` as a NumPy array when it is host data (a NumPy array, a list,
    a number), else ``None`` (a backend tensor, perhaps symbolic)."""
    if isinstance(y, (np.ndarray, np.generic, list, tuple, numbers.Number)):
        return np.asarray(y)
    return None


def check_class_indices(name, labels, num_classes):
    """Checks host labels: every entry an integer in [0, num_classes)."""
    values = np.asarray(labels)
    if values.dtype.kind not in "biuf":
        raise TypeError(
            f"Invalid value received for argument `{name}`. Expected "
            f"integer class indices. Received: {name} of dtype {values.dtype}"
        )
    bad = (values < 0) | (values >= num_classes)
    if values.dtype.kind == "f":
        bad |= values != np.floor(values)  # also NaN
    if np.any(bad):
        raise ValueError(
            f"Invalid value received for argument `{name}`. Expected "
            f"integer class indices in [0, {num_classes}) "
            f"(num_classes={num_classes}). Received: {name} with "
            f"{int(np.sum(bad))} other entries, e.g. "
            f"{values[bad].ravel()[:5].tolist()}"
        )


def one_hot_or_nan(labels, num_classes, dtype):
    """One-hot rows of integer labels; a row of NaN for a label outside
    [0, num_classes) (a cheap in-graph mark: the loss becomes NaN)."""
    labels = keras.ops.cast(labels, "int32")
    valid = keras.ops.logical_and(labels >= 0, labels < num_classes)
    one_hot = keras.ops.one_hot(
        keras.ops.clip(labels, 0, num_classes - 1), num_classes, dtype=dtype
    )
    nan = keras.ops.cast(float("nan"), dtype)
    return keras.ops.where(keras.ops.expand_dims(valid, -1), one_hot, nan)


def _check_one_hot(values):
    """Checks host one-hot (or soft) labels: entries in [0, 1], rows
    summing to 1."""
    values = np.asarray(values, dtype="float64")
    if values.ndim == 0:
        return
    rows = values.reshape(-1, values.shape[-1])
    outside = (rows < 0) | (rows > 1) | np.isnan(rows)
    wrong = np.any(outside, axis=-1) | (
        np.abs(rows.sum(axis=-1) - 1) > 1e-3)
    if np.any(wrong):
        raise ValueError(
            "Invalid value received for argument `y`. Expected one-hot (or "
            "soft) labels, entries in [0, 1] and each row summing to 1, "
            "when num_classes=None (integer class indices need "
            "`num_classes`). Received: y with "
            f"{int(np.sum(wrong))} other rows, e.g. "
            f"{rows[np.argmax(wrong)].tolist()}"
        )


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
            ``k >= 2`` for integer ``y`` (needed: a 1-D integer ``y`` holds
            class indices). Defaults to ``None``.

    Labels given as NumPy arrays or lists are checked (a ``ValueError``
    names the bad entries): class indices in ``[0, num_classes)``, or
    one-hot rows in ``[0, 1]`` summing to 1. Backend tensors are not read
    back (no device sync, fine inside a compiled step): there a class index
    outside ``[0, num_classes)`` gives a row of NaN, never a silently wrong
    row.

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
    host = host_array(y)
    y = keras.ops.convert_to_tensor(y)
    if num_classes is None:
        is_float = keras.backend.is_float_dtype(y.dtype)
        if not is_float and len(y.shape) <= 1:
            raise ValueError(
                "Invalid value received for argument `num_classes`. "
                "Integer labels `y` of shape "
                f"{tuple(y.shape)} are class indices: expected their number "
                "of classes, an integer >= 2 (or one-hot `y`). Received: "
                "num_classes=None"
            )
        if host is not None:
            _check_one_hot(host)
        if not is_float:
            y = keras.ops.cast(y, keras.config.floatx())
        return smooth_one_hot(y, epsilon)
    if host is not None:
        check_class_indices("y", host, num_classes)
    one_hot = one_hot_or_nan(y, num_classes, keras.config.floatx())
    return smooth_one_hot(one_hot, epsilon)
