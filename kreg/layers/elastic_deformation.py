"""Elastic distortion of images (Simard, Steinkraus & Platt, 2003)."""

import functools

import keras
import numpy as np

from kreg.utils.distribute import ReplicaSeedGenerator
from kreg.utils.validation import check_number
from kreg.utils.validation import check_one_of
from kreg.utils.validation import check_optional_seed

INTERPOLATIONS = ("bilinear", "nearest")
FILL_MODES = ("constant", "nearest", "reflect", "mirror", "wrap")


@keras.saving.register_keras_serializable(package="kreg")
class ElasticDeformation(keras.layers.Layer):
    """Displaces every pixel by a smooth random field, in training only.

    Per image, two independent fields of ``U(-1, 1)`` noise (one for rows,
    one for columns) are each smoothed by a normalized Gaussian of standard
    deviation ``sigma`` pixels (as ``scipy.ndimage.gaussian_filter``:
    truncated at 4 ``sigma``, borders reflected) and multiplied by ``alpha``
    pixels; the image is resampled at ``(row + dy, column + dx)``. Every
    channel of an image moves with the same field. Away from the borders the
    displacement's standard deviation is ``alpha * sqrt(1/3) * sum(k**2)``
    for the 1-D kernel ``k``, about ``alpha / (sqrt(12 pi) sigma)``. Small
    ``sigma`` gives a random, large ``sigma`` an almost rigid displacement.
    Outside training, and for ``alpha=0``, the input is returned unchanged.

    Unlike Keras's ``RandomElasticTransform``, the two fields are drawn
    independently (Keras 3.15 moves every pixel along the diagonal on
    TensorFlow and JAX), every image is warped, and ``alpha``, ``sigma`` are
    the paper's pixels. Under `tf.distribute` every replica draws its own
    fields. Works in a `tf.data` map on the TensorFlow backend.

    Args:
        alpha: float >= 0, the scale of the displacement in pixels.
            Defaults to `34.0` (the paper's MNIST value).
        sigma: float > 0, the Gaussian's standard deviation in pixels.
            Defaults to `4.0`.
        seed: optional non-negative int for reproducible fields. Defaults to
            `None`.
        interpolation: `"bilinear"` or `"nearest"`. Defaults to
            `"bilinear"`.
        fill_mode: how pixels outside the image are read: `"constant"`
            (`fill_value`), `"nearest"`, `"reflect"` (d c b a | a b c d),
            `"mirror"` (c d c b | a b c d) or `"wrap"`. Defaults to
            `"constant"`.
        fill_value: float, the value outside the image for
            `fill_mode="constant"`. Defaults to `0.0`.
        data_format: `"channels_last"` or `"channels_first"`. Defaults to
            `None` (`keras.config.image_data_format()`).
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: a 4-D batch of images with known height and width.
        training: whether the layer runs in training mode.

    Example:

    >>> augment = ElasticDeformation(alpha=34.0, sigma=4.0, seed=1)
    >>> images = np.random.rand(2, 28, 28, 1).astype("float32")
    >>> augment(images, training=True).shape
    (2, 28, 28, 1)

    Reference:
        Simard, Steinkraus & Platt, "Best Practices for Convolutional Neural
        Networks Applied to Visual Document Analysis", ICDAR 2003.
    """

    def __init__(self, alpha=34.0, sigma=4.0, seed=None,
                 interpolation="bilinear", fill_mode="constant",
                 fill_value=0.0, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.alpha = check_number("alpha", alpha, 0.0)
        self.sigma = check_number("sigma", sigma, 0.0, low_inclusive=False)
        self.seed = check_optional_seed("seed", seed)
        self.interpolation = check_one_of("interpolation", interpolation,
                                          INTERPOLATIONS)
        self.fill_mode = check_one_of("fill_mode", fill_mode, FILL_MODES)
        self.fill_value = check_number("fill_value", fill_value)
        self.data_format = check_one_of(
            "data_format", data_format or keras.config.image_data_format(),
            ("channels_last", "channels_first"))
        self.seed_generator = ReplicaSeedGenerator(self.seed)

    def __call__(self, inputs, *args, **kwargs):
        if keras.backend.backend() != "tensorflow" and type(
                inputs).__module__.startswith("tensorflow"):
            raise ValueError(
                "Invalid value received for argument `inputs`. Expected a "
                f"tensor of the {keras.backend.backend()} backend: in a "
                "`tf.data` pipeline the layer needs the TensorFlow backend "
                "(elsewhere, put it in the model). Received: "
                f"inputs={inputs!r}")
        return super().__call__(inputs, *args, **kwargs)

    def build(self, input_shape):
        self._image_size(input_shape)
        self.built = True

    def _image_size(self, shape):
        shape = tuple(shape)
        spatial = shape[1:3] if self.data_format == "channels_last" else \
            shape[2:4]
        if len(shape) != 4 or None in spatial:
            raise ValueError(
                "Invalid value received for argument `inputs`. Expected a "
                "4-D batch of images with known height and width "
                f"({self.data_format}). Received: inputs.shape={shape}")
        return spatial

    def call(self, inputs, training=False):
        if not training or self.alpha == 0:
            return inputs
        ops = keras.ops
        height, width = self._image_size(inputs.shape)
        images = ops.cast(inputs, "float32")
        if self.data_format == "channels_first":
            images = ops.transpose(images, (0, 2, 3, 1))
        batch = ops.shape(images)[0]
        noise = keras.random.uniform((batch, 2, height, width), -1.0, 1.0,
                                     seed=self.seed_generator)
        rows_filter = ops.convert_to_tensor(_smoothing(height, self.sigma))
        cols_filter = ops.convert_to_tensor(_smoothing(width, self.sigma))
        field = ops.matmul(ops.matmul(rows_filter, noise),
                           ops.transpose(cols_filter)) * self.alpha
        rows = field[:, 0] + ops.reshape(
            ops.arange(height, dtype="float32"), (height, 1))
        cols = field[:, 1] + ops.arange(width, dtype="float32")
        outputs = self._resample(images, rows, cols, batch, height, width)
        if self.data_format == "channels_first":
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        return ops.cast(outputs, self.compute_dtype)

    def _resample(self, images, rows, cols, batch, height, width):
        ops = keras.ops
        if self.interpolation == "nearest":
            corners = [(ops.floor(rows + 0.5), ops.floor(cols + 0.5), None)]
        else:
            top, left = ops.floor(rows), ops.floor(cols)
            down, right = rows - top, cols - left
            corners = [(top, left, (1 - down) * (1 - right)),
                       (top, left + 1, (1 - down) * right),
                       (top + 1, left, down * (1 - right)),
                       (top + 1, left + 1, down * right)]
        channels = ops.shape(images)[3]
        pixels = ops.reshape(images, (-1, channels))
        first = ops.reshape(ops.arange(batch, dtype="int32") * (height * width),
                            (-1, 1, 1))
        outputs = 0.0
        for row, col, weight in corners:
            row, row_inside = self._read_index(row, height)
            col, col_inside = self._read_index(col, width)
            index = first + ops.cast(row * width + col, "int32")
            values = ops.reshape(
                ops.take(pixels, ops.reshape(index, (-1,)), axis=0),
                ops.shape(images))
            if self.fill_mode == "constant":
                inside = ops.expand_dims(row_inside & col_inside, -1)
                values = ops.where(inside, values, self.fill_value)
            outputs = values if weight is None else \
                outputs + ops.expand_dims(weight, -1) * values
        return outputs

    def _read_index(self, index, size):
        """The pixel read for an integer-valued float `index` on an axis of
        `size` pixels under `fill_mode`, and whether it lies inside."""
        ops = keras.ops
        inside = (index >= 0) & (index <= size - 1)
        if self.fill_mode in ("constant", "nearest"):
            return ops.clip(index, 0, size - 1), inside
        if self.fill_mode == "wrap":
            return ops.mod(index, size), inside
        if self.fill_mode == "reflect":  # d c b a | a b c d | d c b a
            period, last = 2 * size, 2 * size - 1
        else:  # mirror: c d c b | a b c d | c b a b
            period, last = max(2 * size - 2, 1), 2 * size - 2
        index = ops.mod(index, period)
        return ops.where(index >= size, last - index, index), inside

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {
            "alpha": self.alpha,
            "sigma": self.sigma,
            "seed": self.seed,
            "interpolation": self.interpolation,
            "fill_mode": self.fill_mode,
            "fill_value": self.fill_value,
            "data_format": self.data_format,
        }
        return {**super().get_config(), **config}


@functools.lru_cache(maxsize=32)
def _smoothing(size, sigma):
    """The (size, size) float32 matrix of ``scipy.ndimage.gaussian_filter1d``
    on `size` samples (truncated at 4 sigma, ``mode="reflect"``)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    matrix = np.zeros((size, size))
    for i in range(size):
        source = np.mod(i + offsets, 2 * size)
        source = np.where(source >= size, 2 * size - 1 - source, source)
        np.add.at(matrix[i], source, kernel)
    return matrix.astype("float32")

