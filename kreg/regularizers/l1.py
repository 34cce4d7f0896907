"""L1 (Lasso) weight penalty."""

import keras

from kreg.regularizers._utils import check_strength


@keras.saving.register_keras_serializable(package="kreg")
class L1(keras.regularizers.Regularizer):
    """The lecture's L1 (Lasso) penalty on a weight tensor.

    ``penalty(w) = l1 * sum(|w|)``, whose (sub)gradient is
    ``l1 * sign(w)``. It pushes weights to exactly zero (sparse weights).

    Same value as `keras.regularizers.L1(l1)`; unlike it, a negative or
    non-finite ``l1`` is refused at construction.

    Args:
        l1: float >= 0, the penalty strength. Defaults to ``0.01``.

    Example:
        >>> layer = keras.layers.Dense(
        ...     3, kernel_regularizer=kreg.regularizers.L1(1e-4))

    Reference:
        Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016,
        section 7.1.2 (L1 regularization).
    """

    def __init__(self, l1=0.01):
        self.l1 = check_strength("l1", l1)

    def __call__(self, x):
        x = keras.ops.convert_to_tensor(x)
        return keras.ops.cast(self.l1, x.dtype) * keras.ops.sum(
            keras.ops.abs(x)
        )

    def get_config(self):
        return {"l1": self.l1}
