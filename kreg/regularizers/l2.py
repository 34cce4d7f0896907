"""L2 (Tikhonov, ridge) weight penalty in the lecture's form."""

import keras

from kreg.regularizers._utils import check_strength


@keras.saving.register_keras_serializable(package="kreg")
class L2(keras.regularizers.Regularizer):
    """The lecture's Tikhonov (L2, ridge) penalty on a weight tensor.

    ``penalty(w) = l2 * 0.5 * sum(w**2)``, so its gradient is ``l2 * w``:
    with plain SGD this is exactly PyTorch's ``weight_decay=l2``.

    NOTE: this is HALF of Keras's penalty. ``kreg.regularizers.L2(a)`` equals
    ``keras.regularizers.L2(a / 2)``; ``keras.regularizers.L2(a)`` equals
    ``kreg.regularizers.L2(2 * a)``. Use the lecture's ``alpha`` here as is.

    Args:
        l2: float >= 0, the penalty strength ``alpha``. Defaults to ``0.01``.

    Example:
        >>> layer = keras.layers.Dense(
        ...     3, kernel_regularizer=kreg.regularizers.L2(1e-4))

    Reference:
        Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016,
        section 7.1.1 (L2 parameter regularization).
    """

    def __init__(self, l2=0.01):
        self.l2 = check_strength("l2", l2)

    def __call__(self, x):
        x = keras.ops.convert_to_tensor(x)
        return keras.ops.cast(0.5 * self.l2, x.dtype) * keras.ops.sum(
            keras.ops.square(x)
        )

    def get_config(self):
        return {"l2": self.l2}
