"""Checks of the data arguments of ``fit`` (``x``, ``y``, ``sample_weight``,
``steps_per_epoch``, ``validation_data``, ``class_weight``, ``callbacks``)
with Keras-style messages, for kreg APIs that keep them for a later
``fit`` (`kreg.callbacks.RetrainOnFullData`): a bad value fails when it is
given, not after a first training. Also the number of batches per epoch
that ``fit`` makes of the data."""

import collections.abc
import math
import numbers

import keras
import numpy as np

INFINITE = -1  # tf.data.INFINITE_CARDINALITY


def is_dataset(x):
    """Whether `x` is a data set (`tf.data.Dataset`, `keras.utils.PyDataset`,
    a DataLoader, any iterable of batches) rather than arrays."""
    return hasattr(x, "element_spec") or (
        hasattr(x, "__iter__") and not hasattr(x, "shape")
        and not isinstance(x, (list, tuple, dict, str, bytes))
    )


def cardinality(x):
    """A tf.data.Dataset's number of batches (-1: endless, -2: unknown);
    None for anything else."""
    if not hasattr(x, "cardinality"):
        return None
    try:
        return int(x.cardinality())
    except Exception:
        return None


def check_data(name, data):
    """Arrays (or a list/tuple/dict of them, or nested lists of numbers) or
    a dataset, as `fit` takes."""
    if is_dataset(data):
        return
    leaves = keras.tree.flatten(data)
    if leaves and all(hasattr(leaf, "shape") for leaf in leaves):
        return
    try:
        numeric = np.asarray(data).dtype.kind in "biuf" and np.ndim(data)
    except (ValueError, TypeError):
        numeric = False
    if not numeric:
        raise TypeError(
            f"Invalid value received for argument `{name}`. Expected arrays "
            "(or a list/dict of arrays) or a dataset, as `fit` takes. "
            f"Received: {name}={data!r}"
        )


def check_x_y(x, y=None, sample_weight=None, steps_per_epoch=None):
    """The data of a ``fit`` of several epochs: arrays ``x`` with targets
    ``y`` (and ``sample_weight``) of as many samples, or a dataset that can
    be iterated once per epoch (an endless one with ``steps_per_epoch``)."""
    if x is None:
        raise ValueError(
            "Invalid value received for argument `x`. Expected arrays or a "
            "dataset, as `fit` takes. Received: x=None"
        )
    if isinstance(x, collections.abc.Iterator):
        raise TypeError(
            "Invalid value received for argument `x`. Expected arrays or a "
            "data set that can be iterated once per epoch (a tf.data."
            "Dataset, a keras.utils.PyDataset, a DataLoader); a generator "
            f"or iterator gives one pass. Received: x={x!r}"
        )
    check_data("x", x)
    if not is_dataset(x):
        _check_counts(x, y, sample_weight)
        return
    for name, value, what in (("y", y, "targets are its batches' second"), (
            "sample_weight", sample_weight, "weights are its batches' third")):
        if value is not None:
            raise ValueError(
                f"Invalid value received for argument `{name}`. With a "
                f"dataset `x` the {what} element, as in `fit`. Received: "
                f"{name}={type(value).__name__}"
            )
    if steps_per_epoch is None and cardinality(x) == INFINITE:
        raise ValueError(
            "Invalid value received for argument `steps_per_epoch`. `x` is "
            "an endless (repeated) dataset, so its epochs need a length: "
            "pass steps_per_epoch, or a dataset without .repeat(). "
            "Received: steps_per_epoch=None"
        )


def _check_counts(x, y, sample_weight):
    """Array data: targets given, each of `x`, `y` and `sample_weight`
    an array (or a list/dict of arrays) of as many samples as `x`."""
    if y is None:
        raise ValueError(
            "Invalid value received for argument `y`. Expected targets "
            "for the array inputs `x`. Received: y=None"
        )
    counts = {}
    for name, data in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        if data is None:
            continue
        if is_dataset(data):
            raise TypeError(
                f"Invalid value received for argument `{name}`. Expected "
                "arrays, as `x` holds arrays. Received: "
                f"{name}={type(data).__name__}"
            )
        check_data(name, data)
        leaves = keras.tree.flatten(data)
        if all(hasattr(leaf, "shape") for leaf in leaves):
            sizes = [np.shape(a)[0] if np.ndim(a) else 0 for a in leaves]
        else:  # nested lists of numbers
            sizes = [np.shape(data)[0]]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"Invalid value received for argument `{name}`. Expected "
                "arrays of the same number of samples. Received: "
                f"{name} with {sizes} samples"
            )
        counts[name] = sizes[0]
    for name, count in counts.items():
        if count != counts["x"]:
            raise ValueError(
                f"Invalid value received for argument `{name}`. Expected "
                f"as many samples as `x` ({counts['x']}). Received: {name} "
                f"with {count} samples"
            )


def check_validation_data(data):
    """None, a dataset, or a tuple/list ``(x, y)`` / ``(x, y, weights)``;
    returns it."""
    if data is None or is_dataset(data):
        return data
    if not isinstance(data, (tuple, list)):
        raise TypeError(
            "Invalid value received for argument `validation_data`. "
            "Expected None, a dataset, or a tuple (x, y) or (x, y, "
            f"sample_weight). Received: validation_data={data!r}"
        )
    if len(data) not in (2, 3):
        raise ValueError(
            "Invalid value received for argument `validation_data`. "
            "Expected a tuple (x, y) or (x, y, sample_weight). Received: "
            f"validation_data, a {type(data).__name__} of {len(data)} items"
        )
    check_data("validation_data", data[0])
    return data


def check_class_weight(class_weight):
    """None or a dict {class index: weight >= 0}, as `fit` takes; returns
    it."""
    if class_weight is None:
        return None
    valid = isinstance(class_weight, collections.abc.Mapping) and all(
        isinstance(k, numbers.Integral) and not isinstance(k, bool)
        and isinstance(v, numbers.Real) and not isinstance(v, bool)
        and math.isfinite(v) and v >= 0
        for k, v in class_weight.items()
    )
    if not valid:
        raise TypeError(
            "Invalid value received for argument `class_weight`. Expected "
            "None or a dict {class index (int): weight (finite float >= "
            "0)}, as in `fit`. "
            f"Received: class_weight={class_weight!r}"
        )
    return class_weight


def check_callbacks(callbacks):
    """A list of `keras.callbacks.Callback` instances from None or a
    list/tuple of them."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)) or not all(
        isinstance(c, keras.callbacks.Callback) for c in callbacks
    ):
        raise TypeError(
            "Invalid value received for argument `callbacks`. Expected None "
            "or a list of keras.callbacks.Callback instances. Received: "
            f"callbacks={callbacks!r}"
        )
    return list(callbacks)


def batches_per_epoch(x, batch_size=None, steps_per_epoch=None):
    """The number of batches in an epoch of ``fit`` over `x` (checked by
    `check_x_y`), or None where it is not known."""
    if steps_per_epoch is not None:
        return steps_per_epoch
    if not is_dataset(x):  # every array holds as many samples
        first = keras.tree.flatten(x)[0]
        return math.ceil(np.shape(first)[0] / (batch_size or 32))
    if isinstance(x, keras.utils.PyDataset):
        return x.num_batches or None
    count = cardinality(x)
    if count is None and hasattr(x, "__len__"):
        count = len(x)  # e.g. a DataLoader
    return count if count and count > 0 else None
