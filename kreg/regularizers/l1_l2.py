"""The sum of the L1 and the lecture's L2 penalty (elastic net)."""

import keras

from kreg.regularizers._utils import check_strength


@keras.saving.register_keras_serializable(package="kreg")
class L1L2(keras.regularizers.Regularizer):
    """Both of the lecture's penalties at once.

    ``penalty(w) = l1 * sum(|w|) + l2 * 0.5 * sum(w**2)``; gradient
    ``l1 * sign(w) + l2 * w``.

    NOTE: the L2 part is half of Keras's: ``kreg.regularizers.L1L2(a, b)``
    equals ``keras.regularizers.L1L2(a, b / 2)``.

    Args:
        l1: float >= 0, the L1 strength. Defaults to ``0.0``.
        l2: float >= 0, the L2 (Tikhonov) strength. Defaults to ``0.0``.

    Reference:
        Zou & Hastie, "Regularization and variable selection via the elastic
        net", JRSS-B 2005.
    """

    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = check_strength("l1", l1)
        self.l2 = check_strength("l2", l2)

    def __call__(self, x):
        x = keras.ops.convert_to_tensor(x)
        penalty = keras.ops.zeros((), dtype=x.dtype)
        if self.l1:
            penalty = penalty + keras.ops.cast(self.l1, x.dtype) * (
                keras.ops.sum(keras.ops.abs(x))
            )
        if self.l2:
            penalty = penalty + keras.ops.cast(0.5 * self.l2, x.dtype) * (
                keras.ops.sum(keras.ops.square(x))
            )
        return penalty

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}
