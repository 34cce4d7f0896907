"""Initialization procedures that need the data: `lsuv`.

The lecture's rules themselves are Keras's: `keras.initializers.LecunNormal`
(weights scaled by 1/sqrt(n_in)), a small positive `bias_initializer`
(`keras.initializers.Constant(0.01)`) for ReLU layers, and an adapted
`keras.layers.Normalization` for the inputs.
"""

from kreg.initializers.lsuv import lsuv

__all__ = ["lsuv"]
