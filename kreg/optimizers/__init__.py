"""kreg.optimizers: optimizer wrappers.

- `ClippedOptimizer`: value, adaptive (AGC), per-tensor norm and global-norm
  clipping around any Keras optimizer, skipping steps with non-finite
  gradients, with gradient-health statistics for the `fit` logs.
"""

from kreg.optimizers.clipped_optimizer import ClippedOptimizer

__all__ = ["ClippedOptimizer"]
