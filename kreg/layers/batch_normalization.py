"""Batch normalization (Ioffe & Szegedy, 2015) as the lecture defines it."""

import numbers

import keras
from keras import ops

from kreg.utils import distribute
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_number
from kreg.utils.validation import get_keras_object

_LOW_PRECISION = ("float16", "bfloat16")


@keras.saving.register_keras_serializable(package="kreg")
class BatchNormalization(keras.layers.Layer):
    """Normalizes each feature with the statistics of the mini-batch.

    In training (``training=True`` and the layer trainable), for every feature
    along ``axis`` over the ``m`` values of the batch::

        mu_B      = 1/m * sum_i x_i
        sigma_B^2 = 1/m * sum_i (x_i - mu_B)^2          (biased variance)
        x_hat_i   = (x_i - mu_B) / sqrt(sigma_B^2 + epsilon)
        y_i       = gamma * x_hat_i + beta

    and the moving statistics used at inference are updated as
    ``m <- momentum * m + (1 - momentum) * batch_stat`` (the biased batch
    variance, as Keras does). At inference, and whenever the layer is frozen
    (``trainable=False``, Keras's fine-tuning convention), the moving
    statistics replace ``mu_B`` and ``sigma_B^2``.

    A drop-in for `keras.layers.BatchNormalization`: same defaults, same
    weights in the same order. Beyond it, ``axis`` may name several axes and
    ``synchronized=True`` works on every backend; a batch with non-finite
    statistics leaves the moving statistics as they were (docs/layers.md).

    Args:
        axis: int or list/tuple of ints, the feature axis or axes (e.g. ``1``
            for channels-first images). With several axes, ``gamma`` and the
            other weights have the shape of those axes. Defaults to ``-1``.
        momentum: float in [0, 1], the moving statistics' decay. Defaults to
            ``0.99``.
        epsilon: float > 0 added to the variance. Defaults to ``1e-3``.
        center: whether to add the learned offset ``beta``. Defaults to
            ``True``.
        scale: whether to multiply by the learned ``gamma``. Defaults to
            ``True``.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer, beta_regularizer, gamma_regularizer,
        beta_constraint, gamma_constraint: as in Keras.
        synchronized: statistics over the global batch of all replicas.
            Defaults to ``False``.
        **kwargs: base layer keyword arguments (``name``, ``dtype``, ...).

    Call arguments:
        inputs: a tensor of any rank.
        training: normalize with the batch statistics (and update the
            moving ones) rather than the moving statistics.
        mask: optional boolean tensor; masked-out positions do not count.

    Example:

    >>> x = np.array([[10., 20., 30.], [15., 25., 35.],
    ...               [20., 30., 40.], [25., 35., 45.]])
    >>> kreg.layers.BatchNormalization(epsilon=1e-5)(x, training=True)
    ... # each column: [-1.3416, -0.4472, 0.4472, 1.3416]

    Reference:
        Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network
        Training by Reducing Internal Covariate Shift", ICML 2015.
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = _validate_axis(axis)
        self.momentum = check_number("momentum", momentum, 0.0, 1.0)
        self.epsilon = check_number(
            "epsilon", epsilon, 0.0, None, low_inclusive=False
        )
        self.center = check_bool("center", center)
        self.scale = check_bool("scale", scale)
        self.synchronized = check_bool("synchronized", synchronized)
        for name, getter, value in (
                ("beta_initializer", keras.initializers.get,
                 beta_initializer),
                ("gamma_initializer", keras.initializers.get,
                 gamma_initializer),
                ("moving_mean_initializer", keras.initializers.get,
                 moving_mean_initializer),
                ("moving_variance_initializer", keras.initializers.get,
                 moving_variance_initializer),
                ("beta_regularizer", keras.regularizers.get,
                 beta_regularizer),
                ("gamma_regularizer", keras.regularizers.get,
                 gamma_regularizer),
                ("beta_constraint", keras.constraints.get, beta_constraint),
                ("gamma_constraint", keras.constraints.get,
                 gamma_constraint)):
            setattr(self, name, get_keras_object(name, getter, value))
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    def build(self, input_shape):
        ndim = len(input_shape)
        axes = []
        for axis in self._axes_list():
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"Invalid value received for argument `axis`: {axis} is "
                    f"out of bounds for inputs of rank {ndim} (input shape "
                    f"{tuple(input_shape)}). Received: axis={self.axis}"
                )
            axes.append(axis % ndim)
        if len(set(axes)) != len(axes):
            raise ValueError(
                "Invalid value received for argument `axis`: it names the "
                f"same axis twice. Received: axis={self.axis}"
            )
        self._feature_axes = sorted(axes)
        for axis in self._feature_axes:
            if input_shape[axis] is None:
                raise ValueError(
                    f"The feature axis {axis} of the inputs must have a known "
                    f"size. Received: input_shape={tuple(input_shape)}"
                )
        self._reduction_axes = [
            i for i in range(ndim) if i not in self._feature_axes
        ]
        self._broadcast_shape = [
            input_shape[i] if i in self._feature_axes else 1
            for i in range(ndim)
        ]
        # Weights are stored with the plain shape of the feature axes; a
        # single trailing feature axis needs no reshape in `call`.
        self._needs_reshape = self._feature_axes != [ndim - 1]
        shape = tuple(input_shape[i] for i in self._feature_axes)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )
        self.input_spec = keras.layers.InputSpec(
            ndim=ndim, axes={i: input_shape[i] for i in self._feature_axes}
        )

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask must have one dimension less than the inputs. "
                f"Received: mask.shape={tuple(mask.shape)}, "
                f"inputs.shape={tuple(inputs.shape)}"
            )
        # Statistics in float32 at least: float16 overflows on sums of
        # squares (Keras does the same).
        stats_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, stats_dtype)

        if training and self.trainable:
            mean, variance = self._batch_moments(x, mask)
            self._update_moving_statistics(mean, variance, stats_dtype)
        else:
            mean = ops.cast(self.moving_mean, stats_dtype)
            variance = ops.cast(self.moving_variance, stats_dtype)

        # y = gamma * (x - mu) / sqrt(var + eps) + beta, folded into one
        # multiply-add: y = x * inv + (beta - mu * inv).
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.cast(self.gamma, stats_dtype)
        shift = -mean * inv
        if self.center:
            shift = shift + ops.cast(self.beta, stats_dtype)
        if self._needs_reshape:
            inv = ops.reshape(inv, self._broadcast_shape)
            shift = ops.reshape(shift, self._broadcast_shape)
        outputs = x * inv + shift
        return ops.cast(outputs, self.compute_dtype)

    def _update_moving_statistics(self, mean, variance, stats_dtype):
        """``m <- momentum * m + (1 - momentum) * batch_stat``, unless a
        batch statistic is not finite: then both stay as they were."""
        momentum = self.momentum
        old_mean = ops.cast(self.moving_mean, stats_dtype)
        old_variance = ops.cast(self.moving_variance, stats_dtype)
        # An in-graph select on one flag for the whole layer: no host sync.
        finite = ops.logical_and(
            ops.all(ops.isfinite(mean)), ops.all(ops.isfinite(variance))
        )
        self.moving_mean.assign(ops.where(
            finite, old_mean * momentum + mean * (1.0 - momentum), old_mean
        ))
        self.moving_variance.assign(ops.where(
            finite,
            old_variance * momentum + variance * (1.0 - momentum),
            old_variance,
        ))

    def _batch_moments(self, x, mask):
        """Biased mean and variance over the reduction axes, feature-shaped."""
        if mask is None and not self.synchronized:
            return ops.moments(x, axes=self._reduction_axes)
        if mask is None:
            weights = None
            count = 1
            for axis in self._reduction_axes:
                count = count * ops.shape(x)[axis]
            count = ops.cast(count, x.dtype)
        else:
            weights = ops.expand_dims(ops.cast(mask, x.dtype), axis=-1)
            weights = ops.broadcast_to(weights, ops.shape(x))
            count = ops.sum(weights, axis=self._reduction_axes)
        weighted = x if weights is None else x * weights
        total = ops.sum(weighted, axis=self._reduction_axes)
        if self.synchronized:
            # var = E[x^2] - E[x]^2 from sums that add up across replicas.
            total_sq = ops.sum(weighted * x, axis=self._reduction_axes)
            count = ops.broadcast_to(count, ops.shape(total))
            total, total_sq, count = distribute.all_reduce_sum(
                [total, total_sq, count]
            )
            count = ops.maximum(count, keras.config.epsilon())
            mean = total / count
            variance = ops.maximum(total_sq / count - ops.square(mean), 0.0)
            return mean, variance
        count = ops.maximum(count, keras.config.epsilon())
        mean = total / count
        centered = x - ops.reshape(mean, self._broadcast_shape)
        variance = (
            ops.sum(ops.square(centered) * weights, axis=self._reduction_axes)
            / count
        )
        return mean, variance

    def compute_output_shape(self, input_shape):
        return input_shape

    def _axes_list(self):
        return list(self.axis) if isinstance(self.axis, list) else [self.axis]

    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": keras.initializers.serialize(
                self.beta_initializer
            ),
            "gamma_initializer": keras.initializers.serialize(
                self.gamma_initializer
            ),
            "moving_mean_initializer": keras.initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": keras.initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": keras.regularizers.serialize(
                self.beta_regularizer
            ),
            "gamma_regularizer": keras.regularizers.serialize(
                self.gamma_regularizer
            ),
            "beta_constraint": keras.constraints.serialize(
                self.beta_constraint
            ),
            "gamma_constraint": keras.constraints.serialize(
                self.gamma_constraint
            ),
            "synchronized": self.synchronized,
        }
        return {**super().get_config(), **config}


def _validate_axis(axis):
    """Returns an int, or a list of ints for several axes."""

    def is_int(value):
        return isinstance(value, numbers.Integral) and not isinstance(
            value, bool
        )

    if is_int(axis):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(map(is_int, axis)):
        axes = [int(a) for a in axis]
        return axes[0] if len(axes) == 1 else axes
    raise TypeError(
        "Invalid value received for argument `axis`. Expected an int or a "
        f"non-empty list of ints. Received: axis={axis!r}"
    )
