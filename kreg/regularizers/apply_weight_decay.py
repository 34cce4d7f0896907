"""Weight decay for an already built (e.g. pre-trained) model's kernels."""

import fnmatch
import numbers
import warnings

import keras
import numpy as np

from kreg.regularizers import _utils
from kreg.regularizers.l2 import L2
from kreg.regularizers.parameter_sharing import ParameterSharing
from kreg.utils.layers import KERNEL_NAMES
from kreg.utils.layers import short_name
from kreg.utils.validation import check_bool


def _check_selector(name, value):
    """Returns the selector as a tuple of names (str) and layer classes."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple, set)) else (value,)
    for item in items:
        is_class = isinstance(item, type) and issubclass(
            item, keras.layers.Layer
        )
        if not (isinstance(item, str) or is_class):
            raise TypeError(
                f"Invalid value received for argument `{name}`. Expected "
                "None, a layer name (glob patterns such as 'conv*' allowed), "
                "a keras.layers.Layer subclass, or a list of these. "
                f"Received: {name}={value!r}"
            )
    return tuple(items)


def _matches(layer, item):
    if isinstance(item, str):
        return fnmatch.fnmatchcase(layer.name, item)
    return isinstance(layer, item)


def _matches_any(layer, selector):
    return any(_matches(layer, item) for item in selector)


def _check_selector_matches(name, value, selector, chains):
    """Raises a ValueError for an item of `selector` that matches no layer
    holding a kernel (a typo, or a class name given as a string)."""
    layers = {id(layer): layer for chain in chains for layer in chain}
    for item in selector:
        if any(_matches(layer, item) for layer in layers.values()):
            continue
        names = sorted({layer.name for layer in layers.values()})
        shown = ", ".join(repr(n) for n in names[:12])
        if len(names) > 12:
            shown += f", ... ({len(names)} layers)"
        hint = ""
        if isinstance(item, str) and any(
            type(layer).__name__ == item for layer in layers.values()
        ):
            hint = f" {item!r} is a class name: pass the class itself"
            if isinstance(getattr(keras.layers, item, None), type):
                hint += f", {name}=keras.layers.{item}"
            hint += "."
        raise ValueError(
            f"Invalid value received for argument `{name}`: {item!r} "
            "matches no layer holding a kernel. Strings are matched (glob "
            "patterns, case-sensitive) against layer names, here the layer "
            f"names {shown}; classes select layers by type.{hint} "
            f"Received: {name}={value!r}"
        )


def _check_regularizer(regularizer):
    if isinstance(regularizer, numbers.Real) and not isinstance(
        regularizer, (bool, np.bool_)
    ):
        return L2(_utils.check_strength("regularizer", regularizer))
    if isinstance(regularizer, keras.regularizers.Regularizer):
        return regularizer
    raise TypeError(
        "Invalid value received for argument `regularizer`. Expected a "
        "keras.regularizers.Regularizer instance (e.g. "
        "kreg.regularizers.L2(1e-4)) or a float >= 0 (read as "
        f"kreg.regularizers.L2). Received: regularizer={regularizer!r}"
    )


class PenalizedVariables(list):
    """The list of variables `apply_weight_decay` penalized, shown by path
    (a variable's own repr prints its values)."""

    def __repr__(self):
        paths = ", ".join(v.path for v in self[:8])
        more = f", ... ({len(self)} variables)" if len(self) > 8 else ""
        return f"PenalizedVariables([{paths}{more}])"


def apply_weight_decay(model, regularizer, include=None, exclude=None,
                       overwrite=True):
    """Attaches a weight penalty to the kernels of an already built model.

    Regularizes, in place and without rebuilding, every trainable weight of
    ``model`` that multiplies the inputs: the ``kernel`` of `Dense`,
    `EinsumDense` and convolutional layers (also depthwise / separable ones),
    ``recurrent_kernel`` of recurrent cells, and ``embeddings``. Biases and
    normalization parameters (``gamma``, ``beta``) are never penalized: the
    lecture notes that penalizing biases leads to underfitting. The penalty
    enters ``model.losses`` and therefore the loss that ``fit`` minimizes::

        loss = data_loss + sum(regularizer(w) for w in kernels)

    The regularizer is also written to the owning layer's
    ``kernel_regularizer`` (``depthwise_regularizer``, ...) attribute, so that
    the layer's config records it and it survives
    ``model.save(...)`` / ``keras.models.load_model(...)`` for Functional and
    Sequential models, including recurrent cells (`LSTM`, `GRU`). Known
    limit: a subclassed model, or a composite layer that rebuilds its
    sublayers from its own config (e.g. `MultiHeadAttention`), only keeps
    what its own config holds, so there the penalty is active but lost on
    reload, without a warning; call `apply_weight_decay` again after
    loading. A layer with a kernel but no ``*_regularizer`` attribute gets
    the penalty and a warning that it will not be saved.

    Call it before ``compile``/``fit``; if the model was already trained, the
    cached train and test functions are reset so the next ``fit`` includes
    the penalty.

    Args:
        model: a built `keras.Model` (or layer).
        regularizer: a regularizer instance (e.g.
            ``kreg.regularizers.L2(1e-4)``), or a float ``a`` meaning
            ``kreg.regularizers.L2(a)`` (the lecture's ``a/2 * ||w||^2``).
        include: ``None`` (every layer), or a layer name, a glob pattern
            (``"conv*"``) matched against layer names (``layer.name``), a
            layer class (``keras.layers.Dense``), or a list of these. A
            kernel is penalized if its layer or any layer containing it
            matches. Defaults to ``None``.
        exclude: same forms; kernels whose layer or any enclosing layer
            matches are left alone (wins over ``include``). Defaults to
            ``None``.
        overwrite: replace a regularizer a kernel already has; with
            ``False`` such kernels are skipped. Defaults to ``True``.

    Raises:
        ValueError: a name, pattern or class in ``include`` or ``exclude``
            that matches no layer holding a kernel.

    Returns:
        The list of variables that were given the penalty (shown by their
        paths).

    Example:
        >>> model = keras.models.load_model("pretrained.keras")
        >>> kreg.regularizers.apply_weight_decay(
        ...     model, kreg.regularizers.L2(1e-4), exclude="head*")
        >>> model.compile(...); model.fit(...)
    """
    _check_model(model)
    regularizer = _check_regularizer(regularizer)
    kernels = select_kernels(model, include, exclude, overwrite)
    if isinstance(regularizer, ParameterSharing):
        _check_reference_shapes(regularizer, kernels)
    return attach_all(model, [(v, owner, regularizer) for v, owner in kernels],
                      "apply_weight_decay")


def _check_model(model):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "Invalid value received for argument `model`. Expected a built "
            f"keras.Model or keras.layers.Layer. Received: model={model!r}"
        )
    if not model.built or not model.weights:
        raise ValueError(
            "Invalid value received for argument `model`. Expected a built "
            "model with weights (call it on data or build it first). "
            f"Received: model={model.name!r} (built={model.built}, "
            f"{len(model.weights)} weights)"
        )


def _check_reference_shapes(regularizer, kernels):
    """One `ParameterSharing` reference has one shape: every selected kernel
    must have it (a model's kernels of several shapes need
    `anchor_weights`, which gives each its own reference)."""
    wrong = [v for v, _ in kernels if tuple(v.shape) != regularizer.shape]
    if wrong:
        shown = ", ".join(
            f"{v.path} {tuple(v.shape)}" for v in wrong[:6]
        )
        if len(wrong) > 6:
            shown += f", ... ({len(wrong)} kernels)"
        raise ValueError(
            "Invalid value received for argument `regularizer`. Expected a "
            "ParameterSharing whose reference has the shape of every "
            "selected kernel (select one layer with `include`, or use "
            "kreg.regularizers.anchor_weights(model, strength) to pull each "
            "kernel toward its own current value). Received: reference of "
            f"shape {regularizer.shape}; kernels of other shapes: {shown}"
        )


def select_kernels(model, include, exclude, overwrite):
    """``[(variable, owner)]``: the kernels of ``model`` that ``include``,
    ``exclude`` and ``overwrite`` select (arguments checked here)."""
    include_value, exclude_value = include, exclude
    include = _check_selector("include", include)
    exclude = _check_selector("exclude", exclude)
    overwrite = check_bool("overwrite", overwrite)

    kernels = [(variable, owner, chain)
               for variable, owner, chain in _utils.walk_variables(model)
               if short_name(variable) in KERNEL_NAMES]
    chains = [chain for _, _, chain in kernels]
    for name, value, selector in (("include", include_value, include),
                                  ("exclude", exclude_value, exclude)):
        if selector is not None:
            _check_selector_matches(name, value, selector, chains)

    selected = []
    for variable, owner, chain in kernels:
        if include is not None and not any(
            _matches_any(layer, include) for layer in chain
        ):
            continue
        if exclude is not None and any(
            _matches_any(layer, exclude) for layer in chain
        ):
            continue
        if variable.regularizer is not None and not overwrite:
            continue
        selected.append((variable, owner))
    return selected


def attach_all(model, triples, caller):
    """Attaches each ``(variable, owner, regularizer)``; warns about
    penalties no layer config records; resets the model's compiled train
    and test functions. Returns the `PenalizedVariables`."""
    penalized = PenalizedVariables()
    unsaved = []
    for variable, owner, regularizer in triples:
        if not _utils.attach(variable, owner, regularizer):
            unsaved.append(variable.path)
        penalized.append(variable)
    if unsaved:
        warnings.warn(
            f"{caller}: the penalty on "
            f"{', '.join(unsaved)} is active but not recorded in a layer "
            "config (no matching `*_regularizer` attribute), so it will not "
            "survive model.save / load_model.",
            stacklevel=3,
        )
    if isinstance(model, keras.Model):
        # Compiled train/test steps were traced without the new losses:
        # rebuilt (traced again at their next call) with Keras's public API.
        if model.train_function is not None:
            model.make_train_function(force=True)
        if model.test_function is not None:
            model.make_test_function(force=True)
    return penalized


def anchor_weights(model, strength, include=None, exclude=None,
                   overwrite=True):
    """Pulls the kernels of a built model toward their current values (L2-SP).

    For fine-tuning near pre-trained weights: every kernel selected as in
    `apply_weight_decay` (not biases, not normalization parameters) gets
    its own ``ParameterSharing(strength, w0)``, where ``w0`` is a copy of
    the kernel's value at this call::

        loss = data_loss + strength * sum(||w - w0||^2 for w in kernels)

    Call it after loading (or setting) the pre-trained weights and before
    ``fit``. A new head that should not stay near its initial values is
    left out with ``exclude`` (and can get plain weight decay with
    `apply_weight_decay`, as the L2-SP paper does). The references are
    saved with the model (see `ParameterSharing`).

    Setting ``layer.kernel_regularizer = ...`` on an already built layer
    does nothing (Keras reads that attribute only when it creates the
    kernel); this function, like `apply_weight_decay`, puts the penalty on
    the variables themselves.

    Args:
        model: a built `keras.Model` (or layer).
        strength: float >= 0, the penalty strength.
        include: as in `apply_weight_decay`. Defaults to ``None``.
        exclude: as in `apply_weight_decay`. Defaults to ``None``.
        overwrite: as in `apply_weight_decay`. Defaults to ``True``.

    Returns:
        The list of variables that were given the penalty.

    Example:
        >>> model = keras.models.load_model("pretrained.keras")
        >>> kreg.regularizers.anchor_weights(model, 1e-2, exclude="head*")
        >>> model.compile(...); model.fit(...)

    Reference:
        Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer
        Learning with Convolutional Networks", ICML 2018.
    """
    _check_model(model)
    strength = _utils.check_strength("strength", strength)
    kernels = select_kernels(model, include, exclude, overwrite)
    triples = [
        (v, owner, ParameterSharing(strength, keras.ops.convert_to_numpy(v)))
        for v, owner in kernels
    ]
    return attach_all(model, triples, "anchor_weights")
