"""Weight decay for an already built (e.g. pre-trained) model's kernels."""

import fnmatch
import numbers
import warnings

import keras

from kreg.regularizers import _utils
from kreg.utils.layers import KERNEL_NAMES
from kreg.utils.layers import short_name
from kreg.regularizers.l2 import L2
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


def _matches(layer, selector):
    for item in selector:
        if isinstance(item, str):
            if fnmatch.fnmatchcase(layer.name, item):
                return True
        elif isinstance(layer, item):
            return True
    return False


def _check_regularizer(regularizer):
    if isinstance(regularizer, numbers.Real) and not isinstance(
        regularizer, bool
    ):
        return L2(regularizer)
    if isinstance(regularizer, keras.regularizers.Regularizer):
        return regularizer
    raise TypeError(
        "Invalid value received for argument `regularizer`. Expected a "
        "keras.regularizers.Regularizer instance (e.g. "
        "kreg.regularizers.L2(1e-4)) or a float >= 0 (read as "
        f"kreg.regularizers.L2). Received: regularizer={regularizer!r}"
    )


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
            (``"conv*"``), a layer class, or a list of these. A kernel is
            penalized if its layer or any layer containing it matches.
            Defaults to ``None``.
        exclude: same forms; kernels whose layer or any enclosing layer
            matches are left alone (wins over ``include``). Defaults to
            ``None``.
        overwrite: replace a regularizer a kernel already has; with
            ``False`` such kernels are skipped. Defaults to ``True``.

    Returns:
        The list of variables that were given the penalty.

    Example:
        >>> model = keras.models.load_model("pretrained.keras")
        >>> kreg.regularizers.apply_weight_decay(
        ...     model, kreg.regularizers.L2(1e-4), exclude="head*")
        >>> model.compile(...); model.fit(...)
    """
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
    regularizer = _check_regularizer(regularizer)
    include = _check_selector("include", include)
    exclude = _check_selector("exclude", exclude)
    check_bool("overwrite", overwrite)

    penalized = []
    unsaved = []
    for variable, owner, chain in _utils.walk_variables(model):
        if short_name(variable) not in KERNEL_NAMES:
            continue
        if include is not None and not any(
            _matches(layer, include) for layer in chain
        ):
            continue
        if exclude is not None and any(
            _matches(layer, exclude) for layer in chain
        ):
            continue
        if variable.regularizer is not None and not overwrite:
            continue
        if not _utils.attach(variable, owner, regularizer):
            unsaved.append(variable.path)
        penalized.append(variable)
    if unsaved:
        warnings.warn(
            "apply_weight_decay: the penalty on "
            f"{', '.join(unsaved)} is active but not recorded in a layer "
            "config (no matching `*_regularizer` attribute), so it will not "
            "survive model.save / load_model.",
            stacklevel=2,
        )
    if isinstance(model, keras.Model):
        # Compiled train/test steps were traced without the new losses:
        # rebuilt (traced again at their next call) with Keras's public API.
        if model.train_function is not None:
            model.make_train_function(force=True)
        if model.test_function is not None:
            model.make_test_function(force=True)
    return penalized
