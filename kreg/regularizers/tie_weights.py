"""Ties the matching weights of two models with `ParameterSharing`."""

import keras

from kreg.regularizers import _utils
from kreg.regularizers.parameter_sharing import ParameterSharing
from kreg.utils.layers import KERNEL_NAMES
from kreg.utils.layers import short_name
from kreg.utils.validation import check_bool


def _collect(name, value):
    """``[(variable, owner)]`` of a model, a layer or a list of layers."""
    if isinstance(value, keras.layers.Layer):
        layers = [value]
    elif isinstance(value, (list, tuple)) and all(
        isinstance(v, keras.layers.Layer) for v in value
    ):
        layers = list(value)
    else:
        raise TypeError(
            f"Invalid value received for argument `{name}`. Expected a "
            "keras.Model, a keras.layers.Layer or a list of layers. "
            f"Received: {name}={value!r}"
        )
    found = []
    for layer in layers:
        if not layer.built:
            raise ValueError(
                f"Invalid value received for argument `{name}`. Expected "
                f"built layers. Received: layer {layer.name!r} is not built"
            )
        found.extend((v, owner) for v, owner, _ in _utils.walk_variables(layer))
    return found


def tie_weights(model_a, model_b, strength, kernels_only=False):
    """Soft-ties every trainable weight of ``model_a`` to ``model_b``'s.

    The i-th trainable weight of ``model_a`` gets the regularizer
    ``ParameterSharing(strength, reference=<i-th weight of model_b>)``, i.e.
    the lecture's ``Omega = strength * ||theta_A - theta_B||^2``, summed over
    all pairs. The penalty is counted once (on ``model_a``'s side); its
    gradient pulls both weight sets toward each other when both are trained
    in one ``fit`` (put both towers in one model). Weights are matched in the
    order of ``trainable_weights``, so the two sides need the same
    architecture. An existing regularizer on a weight of ``model_a`` is
    replaced.

    Args:
        model_a: a built model, layer, or list of layers: gets the penalty.
        model_b: the same for the reference side.
        strength: float >= 0, the penalty strength.
        kernels_only: tie only kernels (see `apply_weight_decay`), not biases
            or normalization parameters. Defaults to ``False``.

    Returns:
        The list of tied ``(weight_a, weight_b)`` pairs.

    Raises:
        ValueError: when the two sides have a different number of trainable
            weights or a pair has different shapes.
    """
    strength = _utils.check_strength("strength", strength)
    check_bool("kernels_only", kernels_only)
    side_a = _collect("model_a", model_a)
    side_b = _collect("model_b", model_b)
    if kernels_only:
        side_a = [p for p in side_a if short_name(p[0]) in
                  KERNEL_NAMES]
        side_b = [p for p in side_b if short_name(p[0]) in
                  KERNEL_NAMES]
    if len(side_a) != len(side_b):
        raise ValueError(
            "Invalid value received for argument `model_b`. Expected the "
            f"same structure as `model_a` ({len(side_a)} trainable weights). "
            f"Received: {len(side_b)} trainable weights"
        )
    if not side_a:
        raise ValueError(
            "Invalid value received for argument `model_a`. Expected at "
            "least one trainable weight to tie. Received: none"
        )
    for (va, _), (vb, _) in zip(side_a, side_b):
        if tuple(va.shape) != tuple(vb.shape):
            raise ValueError(
                "Invalid value received for argument `model_b`. Expected "
                f"weight {vb.path!r} to have the shape {tuple(va.shape)} of "
                f"{va.path!r}. Received: shape {tuple(vb.shape)}"
            )
        if va is vb:
            raise ValueError(
                "Invalid value received for argument `model_b`. Expected "
                "weights distinct from `model_a`'s. Received: the same "
                f"variable {va.path!r} on both sides"
            )
    pairs = []
    for (va, owner), (vb, _) in zip(side_a, side_b):
        _utils.attach(va, owner, ParameterSharing(strength, vb))
        pairs.append((va, vb))
    return pairs
