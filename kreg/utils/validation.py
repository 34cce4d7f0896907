"""Argument checks with Keras-style messages: argument, expectation, value.

Every public kreg constructor validates its arguments with these helpers, so
that a bad value fails at construction with a message such as::

    Invalid value received for argument `rate`. Expected a finite float
    value in [0, 1). Received: rate=1.5
"""

import math
import numbers
import os

import numpy as np


def _fail(name, expectation, value, error=ValueError):
    raise error(
        f"Invalid value received for argument `{name}`. Expected "
        f"{expectation}. Received: {name}={value!r}"
    )


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def check_number(name, value, low=None, high=None, low_inclusive=True,
                 high_inclusive=True, allow_inf=False):
    """Returns `value` as a float after checking it lies in the interval.

    NaN is always refused, and so are ``inf`` and ``-inf`` unless
    ``allow_inf=True`` (for an argument where infinity means "no limit").

    Args:
        name: the argument's name, used in the error message.
        value: the value to check (Python or NumPy number); bools and
            non-numbers raise `TypeError`.
        low, high: bounds of the interval, `None` for unbounded.
        low_inclusive, high_inclusive: whether each bound is allowed.
        allow_inf: whether an infinite value (inside the bounds) is allowed.
            Defaults to `False`.
    """
    left = "[" if low_inclusive and low is not None else "("
    right = "]" if high_inclusive and high is not None else ")"
    interval = (
        f"{left}{'-inf' if low is None else low}, "
        f"{'inf' if high is None else high}{right}"
    )
    expectation = (
        f"a float value in {interval}" if allow_inf
        else f"a finite float value in {interval}"
    )
    if _is_bool(value) or not isinstance(value, numbers.Real):
        _fail(name, expectation, value, TypeError)
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        _fail(name, expectation, value)
    too_low = low is not None and (
        value < low if low_inclusive else value <= low
    )
    too_high = high is not None and (
        value > high if high_inclusive else value >= high
    )
    if too_low or too_high:
        _fail(name, expectation, value)
    return value


def check_integer(name, value, low=None, high=None, allow_none=False):
    """Returns `value` as a Python int after checking it is an integer in
    ``[low, high]``.

    Python and NumPy integers (``np.int64``, ``np.int32``, ...) are
    accepted; bools, floats (also ``2.0``) and other types raise
    `TypeError`, an integer outside the bounds `ValueError`.

    Args:
        name: the argument's name, used in the error message.
        value: the value to check.
        low, high: inclusive bounds, `None` for unbounded.
        allow_none: whether `None` is accepted (and returned). Defaults to
            `False`.
    """
    if allow_none and value is None:
        return None
    if low is not None and high is not None:
        expectation = f"an integer in [{low}, {high}]"
    elif low is not None:
        expectation = f"an integer >= {low}"
    elif high is not None:
        expectation = f"an integer <= {high}"
    else:
        expectation = "an integer"
    if allow_none:
        expectation = f"None or {expectation}"
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        _fail(name, expectation, value, TypeError)
    if (low is not None and value < low) or (
        high is not None and value > high
    ):
        _fail(name, expectation, value)
    return int(value)


def get_keras_object(name, getter, value):
    """``getter(value)`` (``keras.initializers.get``, ...), its error naming
    the argument and the value."""
    try:
        return getter(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Invalid value received for argument `{name}`. {error}. "
            f"Received: {name}={value!r}") from None


def check_bool(name, value):
    """Returns `value` as a Python bool after checking it is a bool (Python
    or NumPy)."""
    if not _is_bool(value):
        _fail(name, "a bool (True or False)", value, TypeError)
    return bool(value)


def check_optional_seed(name, value):
    """Returns `value` after checking it is `None` or a non-negative int."""
    return check_integer(name, value, low=0, allow_none=True)


def check_optional_positive(name, value):
    """Returns `None` or `value` as a float after checking it is > 0."""
    if value is None:
        return None
    return check_number(name, value, low=0, low_inclusive=False)


def check_one_of(name, value, choices):
    """Returns `value` after checking it is one of `choices` (strings)."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        _fail(name, f"one of {options}", value)
    return value


def check_optional_path(name, value):
    """Returns `None` or `value` as a string after checking it is a path
    (a string or an `os.PathLike`)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        _fail(name, "None or a path (str or os.PathLike)", value, TypeError)
    return os.fspath(value)


def check_optional_dtype(name, value):
    """Returns `value` after checking it is `None`, a dtype name or a dtype
    policy that Keras knows."""
    if value is None:
        return None
    import keras

    try:
        keras.dtype_policies.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Invalid value received for argument `{name}`. Expected None, "
            "a float dtype name such as 'float32' or a dtype policy. "
            f"Received: {name}={value!r}"
        ) from error
    return value
