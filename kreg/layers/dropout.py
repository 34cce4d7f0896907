"""Inverted dropout (Srivastava et al., 2014), with Monte-Carlo mode."""

import numbers

import keras

from kreg.utils.distribute import ReplicaSeedGenerator
from kreg.utils.validation import check_bool
from kreg.utils.validation import check_number
from kreg.utils.validation import check_optional_seed


@keras.saving.register_keras_serializable(package="kreg")
class Dropout(keras.layers.Layer):
    """Drops units at random in training and rescales the kept ones.

    Each unit is kept with probability ``1 - rate`` by an independent binary
    mask, and kept units are scaled by ``1 / (1 - rate)`` so the expected
    activation is unchanged (inverted dropout)::

        y = x * mask / (1 - rate),    mask ~ Bernoulli(1 - rate)

    Outside training the layer returns its input unchanged. With
    ``mc=True`` the layer takes part in Monte-Carlo dropout: it keeps its
    masks active at inference during the passes of `kreg.layers.mc_predict`
    and `kreg.models.predict_with_uncertainty` (and inside
    ``with kreg.layers.mc_sampling(model):``), so repeated predictions
    sample an ensemble of sub-networks. Ordinary ``predict``, ``evaluate``
    and the validation inside ``fit`` stay deterministic (an ``mc=True``
    layer draws its mask there too, and returns its input unchanged).
    Changing ``layer.mc`` takes effect at the next such call. The
    lecture's typical rates: 0.2 on inputs, 0.5 on hidden units.

    A drop-in for `keras.layers.Dropout` (same arguments and defaults), plus
    ``mc``. Unlike Keras, ``rate=1`` is refused: it would drop everything and
    divide by zero. Under `tf.distribute` every replica draws its own masks
    (Keras's layer gives all replicas the same ones).

    Args:
        rate: float in [0, 1), the probability of dropping a unit.
        noise_shape: optional tuple of ints or ``None`` entries, the shape of
            the mask broadcast over the inputs (e.g. ``(batch, 1, features)``
            drops the same features at every time step); ``None`` entries take
            the input's size. Defaults to ``None`` (the input's shape).
        seed: optional non-negative int for reproducible masks. Defaults to
            ``None``.
        mc: sample masks at inference in Monte-Carlo dropout passes
            (`mc_predict`, `mc_sampling`); ordinary inference stays the
            identity. Defaults to ``False``.
        **kwargs: base layer keyword arguments.

    Call arguments:
        inputs: a tensor of any rank.
        training: whether the layer runs in training mode.

    Reference:
        Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks
        from Overfitting", JMLR 2014. Gal & Ghahramani, "Dropout as a Bayesian
        Approximation", ICML 2016 (Monte-Carlo dropout).
    """

    def __init__(self, rate, noise_shape=None, seed=None, mc=False, **kwargs):
        super().__init__(**kwargs)
        self.rate = check_number(
            "rate", rate, 0.0, 1.0, high_inclusive=False
        )
        self.noise_shape = _validate_noise_shape(noise_shape)
        self.seed = check_optional_seed("seed", seed)
        self.mc = check_bool("mc", mc)
        self.seed_generator = ReplicaSeedGenerator(self.seed)
        # On during `mc_sampling` only; read by the compiled steps as state.
        self._mc_switch = _SamplingSwitch(name=f"{self.name}_mc_switch")
        # Whether a call at inference ran without `mc` (a predict or test
        # function traced then ignores the switch: see `mc_sampling`).
        self._inference_without_mc = False
        self.supports_masking = True
        if _builds_at_init(self):
            self.built = True

    def call(self, inputs, training=False):
        if self.rate == 0:
            return inputs
        if training:
            return self._dropped(inputs)
        if self.mc:
            return keras.ops.where(self._mc_switch.is_on(),
                                   self._dropped(inputs), inputs)
        self._inference_without_mc = True
        return inputs

    def _dropped(self, inputs):
        return keras.random.dropout(
            inputs,
            self.rate,
            noise_shape=self._resolved_noise_shape(inputs),
            seed=self.seed_generator,
        )

    def _resolved_noise_shape(self, inputs):
        if self.noise_shape is None:
            return None
        if len(self.noise_shape) != len(inputs.shape):
            raise ValueError(
                "`noise_shape` must have the rank of the inputs. Received: "
                f"noise_shape={self.noise_shape}, "
                f"inputs.shape={tuple(inputs.shape)}"
            )
        shape = keras.ops.shape(inputs)
        return tuple(
            shape[i] if dim is None else dim
            for i, dim in enumerate(self.noise_shape)
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {
            "rate": self.rate,
            "noise_shape": self.noise_shape,
            "seed": self.seed,
            "mc": self.mc,
        }
        return {**super().get_config(), **config}


class _SamplingSwitch(keras.random.SeedGenerator):
    """Monte-Carlo sampling on or off, as state of the layer that owns it.

    A compiled predict or test step reads it at run time, so switching it
    needs no new trace (JAX reuses a traced step even when Keras builds
    the function again). It is a `keras.random.SeedGenerator` for where
    Keras keeps such state: in ``layer.variables``, the state a compiled
    step takes in, but not in ``layer.weights``, so ``get_weights``,
    ``set_weights`` and saved files stay those of `keras.layers.Dropout`.
    It draws no seeds: ``state[0]`` is 1 while on, else 0.
    """

    def __init__(self, name=None):
        super().__init__(seed=0, name=name)

    def is_on(self):
        """A boolean scalar tensor."""
        return keras.ops.greater(self.state.value[0], 0)

    def get(self):
        return bool(keras.ops.convert_to_numpy(self.state.value)[0] > 0)

    def set(self, on):
        self.state.assign(keras.ops.convert_to_tensor(
            [1 if on else 0, 0], dtype=self.state.dtype))


def _builds_at_init(layer):
    """Whether `layer` may be marked built at construction: only when its
    class does not override `build`, as Keras does for its own layers."""
    return type(layer).build is keras.layers.Layer.build


def _validate_noise_shape(noise_shape):
    if noise_shape is None:
        return None
    message = (
        "Invalid value received for argument `noise_shape`. Expected a tuple "
        "of positive ints or None entries. Received: "
        f"noise_shape={noise_shape!r}"
    )
    if not isinstance(noise_shape, (list, tuple)):
        raise TypeError(message)
    result = []
    for dim in noise_shape:
        if dim is None:
            result.append(None)
        elif isinstance(dim, numbers.Integral) and not isinstance(dim, bool):
            if dim <= 0:
                raise ValueError(message)
            result.append(int(dim))
        else:
            raise TypeError(message)
    return tuple(result)
