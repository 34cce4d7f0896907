"""kreg.optimizers: optimizer wrappers.

- `ClippedOptimizer`: value, adaptive (AGC), per-tensor norm and global-norm
  clipping around any Keras optimizer, skipping steps with non-finite
  gradients, with gradient-health statistics for the `fit` logs.
- `AveragingOptimizer`: the exponential moving average of the weights that
  `kreg.callbacks.EMA` puts around a model's optimizer.
- `FineTuningOptimizer`: a pre-trained base's own optimizer state and lower
  learning rate, for `kreg.callbacks.FineTuning`.
"""

from kreg.optimizers.averaging_optimizer import AveragingOptimizer
from kreg.optimizers.clipped_optimizer import ClippedOptimizer
from kreg.optimizers.fine_tuning_optimizer import FineTuningOptimizer

__all__ = ["AveragingOptimizer", "ClippedOptimizer", "FineTuningOptimizer"]
