"""Argument checks with Keras-style messages: argument, expectation, value.

Every public kreg constructor validates its arguments with these helpers, so
that a bad value fails at construction with a message such as::

    Invalid value received for argument `rate`. Expected a float value in
    [0, 1). Received: rate=1.5
"""

import numbers
import os


def _fail(name, expectation, value, error=ValueError):
    raise error(
        f"Invalid value received for argument `{name}`. Expected "
        f"{expectation}. Received: {name}={value!r}"
    )


def check_number(name, value, low=None, high=None, low_inclusive=True,
                 high_inclusive=True):
    """Returns `value` as a float after checking it lies in the interval.

    Args:
        name: the argument's name, used in the error message.
        value: the value to check; bools and non-numbers raise `TypeError`.
        low, high: bounds of the interval, `None` for unbounded.
        low_inclusive, high_inclusive: whether each bound is allowed.
    """
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    interval = (
        f"{left}{'-inf' if low is None else low}, "
        f"{'inf' if high is None else high}{right}"
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, f"a float value in {interval}", value, TypeError)
    value = float(value)
    if value != value:  # NaN
        _fail(name, f"a float value in {interval}", value)
    too_low = low is not None and (
        value < low if low_inclusive else value <= low
    )
    too_high = high is not None and (
        value > high if high_inclusive else value >= high
    )
    if too_low or too_high:
        _fail(name, f"a float value in {interval}", value)
    return value


def check_bool(name, value):
    """Returns `value` after checking it is a Python bool."""
    if not isinstance(value, bool):
        _fail(name, "a bool (True or False)", value, TypeError)
    return value


def check_optional_seed(name, value):
    """Returns `value` after checking it is `None` or a non-negative int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, "None or a non-negative integer", value, TypeError)
    if value < 0:
        _fail(name, "None or a non-negative integer", value)
    return int(value)


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
