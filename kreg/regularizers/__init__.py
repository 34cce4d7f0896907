"""kreg.regularizers: the lecture's weight penalties.

- `L1(l1)`: ``l1 * sum(|w|)``.
- `L2(l2)`: Tikhonov, ``l2 * 0.5 * sum(w**2)`` (gradient ``l2 * w``); equals
  ``keras.regularizers.L2(l2 / 2)``.
- `L1L2(l1, l2)`: the sum of the two.
- `ParameterSharing(strength, reference)`: ``strength * ||w - reference||^2``
  and `tie_weights` to tie two models' weights at once.
- `apply_weight_decay(model, regularizer, ...)`: penalizes the kernels (not
  biases, not normalization parameters) of an already built model.
- `anchor_weights(model, strength, ...)`: pulls the kernels of a built model
  toward a copy of their current values (L2-SP, fine-tuning).
"""

from kreg.regularizers.apply_weight_decay import anchor_weights
from kreg.regularizers.apply_weight_decay import apply_weight_decay
from kreg.regularizers.l1 import L1
from kreg.regularizers.l1_l2 import L1L2
from kreg.regularizers.l2 import L2
from kreg.regularizers.parameter_sharing import ParameterSharing
from kreg.regularizers.tie_weights import tie_weights

__all__ = [
    "L1",
    "L1L2",
    "L2",
    "ParameterSharing",
    "anchor_weights",
    "apply_weight_decay",
    "tie_weights",
]
