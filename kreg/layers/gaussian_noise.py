"""Additive Gaussian noise, a regularizer for inputs and hidden units."""

import keras

from kreg.layers.dropout import _builds_at_init
from kreg.utils.distribute import ReplicaSeedGenerator
from kreg.utils.validation import check_number
from kreg.utils.validation import check_optional_seed


@keras.saving.register_keras_serializable(package="kreg")
class GaussianNoise(keras.layers.Layer):
    """Adds zero-mean Gaussian noise in training only.

    ``y = x + n`` with ``n ~ N(0, stddev^2)`` drawn independently for every
    entry at every step (data augmentation on inputs or on hidden units, as in
    the lecture's "Rauschen in den hidden Units"). Outside training the layer
    returns its input unchanged.

    A drop-in for `keras.layers.GaussianNoise`; unlike it, any
    ``stddev >= 0`` is accepted (Keras refuses values above 1, which rules out
    noise on unscaled inputs). Under `tf.distribute` every replica draws its
    own noise (Keras's layer gives all replicas the same).

    Args:
        stddev: finite float >= 0, the standard deviation of the noise.
        seed: optional non-negative int for reproducible noise. Defaults to
            ``None``.
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: a tensor of any rank.
        training: whether the layer runs in training mode.

    Reference:
        Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016,
        section 7.5 (noise robustness).
    """

    def __init__(self, stddev, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.stddev = check_number("stddev", stddev, 0.0, float("inf"),
                                   high_inclusive=False)
        self.seed = check_optional_seed("seed", seed)
        self.seed_generator = ReplicaSeedGenerator(self.seed)
        self.supports_masking = True
        if _builds_at_init(self):
            self.built = True

    def call(self, inputs, training=False):
        if training and self.stddev > 0:
            noise = keras.random.normal(
                keras.ops.shape(inputs),
                stddev=self.stddev,
                dtype=self.compute_dtype,
                seed=self.seed_generator,
            )
            return inputs + noise
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {"stddev": self.stddev, "seed": self.seed}
        return {**super().get_config(), **config}
