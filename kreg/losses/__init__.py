"""kreg.losses: the lecture's label smoothing and a loss that uses it.

- `smooth_labels(y, epsilon, num_classes=None)`: targets ``1 - epsilon`` for
  the true class and ``epsilon / (k - 1)`` for the others (not Keras's
  ``epsilon / k``), from one-hot or integer labels.
- `LabelSmoothingCrossentropy(epsilon, from_logits)` and its function form
  `label_smoothing_crossentropy`: cross-entropy against those targets,
  accepting one-hot or integer labels.
"""

from kreg.losses.label_smoothing_crossentropy import LabelSmoothingCrossentropy
from kreg.losses.label_smoothing_crossentropy import (
    label_smoothing_crossentropy,
)
from kreg.losses.smooth_labels import smooth_labels

__all__ = [
    "LabelSmoothingCrossentropy",
    "label_smoothing_crossentropy",
    "smooth_labels",
]
