"""Gaussian noise on a wrapped layer's weights, in training only."""

import inspect

import keras

from kreg.utils.layers import KERNEL_NAMES
from kreg.utils.layers import short_name
from kreg.utils.validation import check_number
from kreg.utils.validation import check_optional_seed


@keras.saving.register_keras_serializable(package="kreg")
class WeightNoise(keras.layers.Wrapper):
    """Adds zero-mean Gaussian noise to a layer's kernels in training only.

    The lecture's noise "auch in den Netzwerkgewichten selbst": at every
    training step the wrapped layer runs with perturbed kernels::

        y = layer(x; W + N, b),    N ~ N(0, stddev^2) per entry, fresh each step

    The stored weights are never changed (the noise lives only in that step's
    forward pass; gradients are taken at ``W + N`` and applied to ``W``), and
    outside training the wrapper returns exactly ``layer(x)``. Only kernels
    (``kernel``, ``depthwise_kernel``, ``pointwise_kernel``,
    ``recurrent_kernel``, ``embeddings``) get noise, never biases or
    normalization parameters, nor frozen kernels: a frozen layer
    (``trainable=False``, as in fine-tuning) runs as the layer it wraps.
    For a `Dense` layer and a fixed input ``x``, each output unit gets
    extra noise ``N(0, stddev^2 * ||x||^2)``.

    One draw per step serves the whole batch; under a distribution
    (`tf.distribute`, `keras.distribution`) every replica of a step uses
    that same draw, so the training is the one-device training.

    Keras has no built-in equivalent. The wrapped layer runs through its
    public ``stateless_call`` with the noisy kernel values, so any Keras
    layer with a kernel works, on every backend and in compiled ``fit``.

    Args:
        layer: a `keras.layers.Layer` with at least one kernel (e.g. `Dense`,
            `Conv2D`, `DepthwiseConv2D`, `Embedding`).
        stddev: finite float >= 0, the noise's standard deviation (absolute,
            in the kernel's units).
        seed: optional non-negative int for reproducible noise. Defaults to
            ``None``.
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: the wrapped layer's inputs.
        training: whether to add noise.

    Example:
        >>> layer = kreg.layers.WeightNoise(keras.layers.Dense(64), stddev=0.01)

    Reference:
        Graves, "Practical Variational Inference for Neural Networks",
        NeurIPS 2011; Goodfellow, Bengio & Courville, "Deep Learning",
        section 7.5 (noise injected at the weights).
    """

    def __init__(self, layer, stddev, seed=None, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                "Invalid value received for argument `layer`. Expected a "
                f"keras.layers.Layer instance. Received: layer={layer!r}"
            )
        super().__init__(layer, **kwargs)
        self.stddev = check_number("stddev", stddev, 0.0, float("inf"),
                                   True, False)
        self.seed = check_optional_seed("seed", seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self._inner_takes_training = (
            "training" in inspect.signature(layer.call).parameters
        )
        if layer.built:
            self._find_kernels()

    def _noisy(self):
        """The places of the kernels among the layer's trainable weights
        (none while it is frozen)."""
        return [i for i, v in enumerate(self.layer.trainable_variables)
                if short_name(v) in KERNEL_NAMES]

    def _find_kernels(self):
        if not self._noisy():
            raise ValueError(
                "Invalid value received for argument `layer`. Expected a "
                "layer with a trainable kernel (kernel, depthwise_kernel, "
                "pointwise_kernel, recurrent_kernel or embeddings). "
                f"Received: layer={self.layer.name!r} with trainable weights "
                f"{[v.name for v in self.layer.trainable_variables]}"
            )

    def build(self, input_shape=None):
        super().build(input_shape)
        self._find_kernels()
        self.built = True

    def call(self, inputs, training=False):
        kwargs = {"training": training} if self._inner_takes_training else {}
        noisy = self._noisy() if training and self.stddev > 0 else []
        if not noisy:
            return self.layer(inputs, **kwargs)
        trainable = list(self.layer.trainable_variables)
        values = list(trainable)
        for i in noisy:
            variable = trainable[i]
            value = keras.ops.cast(variable.value, variable.dtype)
            noise = keras.random.normal(
                tuple(variable.shape), stddev=self.stddev,
                dtype=variable.dtype, seed=self.seed_generator,
            )
            values[i] = value + noise
        non_trainable = list(self.layer.non_trainable_variables)
        outputs, updated = self.layer.stateless_call(
            values, non_trainable, inputs, **kwargs
        )
        for variable, value in zip(non_trainable, updated):
            variable.assign(value)
        return outputs

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = {"stddev": self.stddev, "seed": self.seed}
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # keras.layers.Wrapper.from_config pops "layer" from the dict it is
        # given; work on a copy so the caller's config stays intact.
        return super().from_config(dict(config), custom_objects)
