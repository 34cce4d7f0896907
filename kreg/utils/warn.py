"""Warnings attributed to the user's code, not to kreg's or Keras's."""

import inspect
import os
import sys
import warnings

# Packages whose frames sit between the user's `model.fit(...)` and a
# callback: a warning issued in a callback points past them.
_LIBRARIES = ("kreg", "keras", "tensorflow", "jax", "jaxlib", "torch",
              "optree")


def _library_directories():
    directories = []
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            directories.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(directories)


def user_stacklevel():
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the
    first frame outside kreg, Keras and the backends: the user's line, e.g.
    ``model.fit(...)``. 1 (the caller) when there is none."""
    directories = _library_directories()
    frame = inspect.currentframe().f_back
    level = 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(directories):
            return level
        frame = frame.f_back
        level += 1
    return 1


def warn_user(message, category=UserWarning):
    """``warnings.warn(message)`` attributed to the user's code."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
