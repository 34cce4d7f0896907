"""Test helpers for kreg's own suite and for code that extends kreg."""

from kreg.testing.distribution import jax_data_parallel
from kreg.testing.distribution import mirrored_strategy
from kreg.testing.test_case import TestCase

__all__ = ["TestCase", "jax_data_parallel", "mirrored_strategy"]
