"""Soft parameter sharing: a penalty pulling weights toward a reference."""

import keras
import numpy as np

from kreg.regularizers import _utils


def _shape_of(value):
    return tuple(int(d) for d in value.shape)


@keras.saving.register_keras_serializable(package="kreg")
class ParameterSharing(keras.regularizers.Regularizer):
    """The lecture's parameter-sharing penalty toward a reference weight.

    ``penalty(w) = strength * ||w - reference||_2^2``
    ``= strength * sum((w - reference)**2)``; gradient
    ``2 * strength * (w - reference)`` (and the opposite on ``reference`` when
    it is a trained variable). Note: no factor 1/2 here, unlike the
    lecture's (and kreg's) `L2`; this is the lecture's formula for
    ``Omega(theta_A, theta_B)``.

    ``reference`` is either
    - a `keras.Variable` of the same shape, typically the matching weight of
      a second model trained jointly with this one (multi-task): both
      weights are pulled toward each other. Put both models in the one model
      that you ``fit``, so the reference is trained (and, on JAX, traced) with
      it; `tie_weights` does this for all weights of two models at once.
    - a fixed array (NumPy array, list, tensor), e.g. pre-trained weights to
      stay near while fine-tuning. It is copied at construction.

    Attaching it: pass it as ``kernel_regularizer=`` when the layer is
    created, or, on an already built layer or model, use
    ``apply_weight_decay(layer, ParameterSharing(strength, w0))`` (one
    layer's kernel) or `anchor_weights` (every kernel of a model toward its
    own current value). Assigning ``layer.kernel_regularizer = ...`` after
    the layer is built does nothing: Keras reads that attribute only when it
    creates the kernel, and nothing warns (``layer.losses`` stays empty).

    Serialization: the config stores ``strength`` and the reference's value
    as a nested list. For a variable reference that is a snapshot of the
    variable's value when the config is taken (e.g. at ``model.save``): a
    reloaded model is pulled toward that fixed snapshot, not toward the other
    model's live weights; call `tie_weights` again after loading to resume
    joint training.

    Args:
        strength: float >= 0, the penalty strength.
        reference: a `keras.Variable` or an array of the weight's shape.

    Raises:
        ValueError: when called on a weight whose shape differs from the
            reference's.

    Reference:
        Goodfellow, Bengio & Courville, "Deep Learning", MIT Press 2016,
        section 7.9 (parameter tying and parameter sharing).
    """

    def __init__(self, strength, reference):
        self.strength = _utils.check_strength("strength", strength)
        if isinstance(reference, keras.Variable):
            self.reference = reference
        else:
            try:
                array = np.array(
                    keras.ops.convert_to_numpy(reference), copy=True
                )
            except Exception as error:
                raise TypeError(
                    "Invalid value received for argument `reference`. "
                    "Expected a keras.Variable or an array of numbers. "
                    f"Received: reference={reference!r}"
                ) from error
            if not np.issubdtype(array.dtype, np.floating):
                if not np.issubdtype(array.dtype, np.number):
                    raise TypeError(
                        "Invalid value received for argument `reference`. "
                        "Expected a keras.Variable or an array of numbers. "
                        f"Received: reference={reference!r}"
                    )
                array = array.astype(keras.config.floatx())
            if not np.all(np.isfinite(array)):
                raise ValueError(
                    "Invalid value received for argument `reference`. "
                    "Expected finite values. Received: reference with "
                    f"{int(np.sum(~np.isfinite(array)))} non-finite entries"
                )
            self.reference = array
        self.shape = _shape_of(self.reference)

    def __call__(self, x):
        x = keras.ops.convert_to_tensor(x)
        shape = _shape_of(x)
        if shape != self.shape:
            raise ValueError(
                "Invalid value received for argument `reference`. Expected "
                f"the shape of the regularized weight, {shape}. Received: "
                f"reference of shape {self.shape}"
            )
        if isinstance(self.reference, keras.Variable):
            # `.value` is the traced value inside JAX's stateless train step.
            reference = self.reference.value
        else:
            reference = self.reference
        reference = keras.ops.cast(reference, x.dtype)
        return keras.ops.cast(self.strength, x.dtype) * keras.ops.sum(
            keras.ops.square(x - reference)
        )

    def get_config(self):
        value = keras.ops.convert_to_numpy(self.reference)
        return {"strength": self.strength, "reference": value.tolist()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["reference"] = np.asarray(
            config["reference"], dtype=keras.config.floatx()
        )
        return cls(**config)
