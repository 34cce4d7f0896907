"""Helpers shared by kreg.regularizers (not public API).

- `check_strength`: a finite float >= 0.
- `walk_variables`: every trainable variable of a model or layer, with the
  layer that owns it and the chain of layers above it.
- `attach`: puts a regularizer on a variable and, where the owning layer has
  the matching ``<name>_regularizer`` attribute, on that attribute as well,
  so that the layer's config (and thus ``model.save``) records it.
"""

from kreg.utils.layers import short_name
from kreg.utils.layers import walk_layers
from kreg.utils.validation import check_number

# Variable name -> the layer attributes that hold its regularizer, in the
# order tried (Keras names them so in its built-in layers).
_REGULARIZER_ATTRIBUTES = {
    "kernel": ("kernel_regularizer", "depthwise_regularizer"),
    "depthwise_kernel": ("depthwise_regularizer",),
    "pointwise_kernel": ("pointwise_regularizer",),
    "recurrent_kernel": ("recurrent_regularizer",),
    "embeddings": ("embeddings_regularizer",),
}


def check_strength(name, value):
    """Returns a finite penalty strength >= 0 as a float."""
    return check_number(name, value, low=0.0)


def walk_variables(root):
    """Returns ``[(variable, owner, chain)]`` for the trainable variables.

    The owner is the deepest layer holding the variable; the order is that
    of ``root.trainable_weights``.
    """
    owners = {}
    for layer, chain in walk_layers(root):
        weights = layer.trainable_weights
        # The owner is the smallest layer holding the variable (the deeper
        # one on a tie, e.g. a wrapper and the layer it wraps).
        rank = (len(weights), -len(chain))
        for variable in weights:
            best = owners.get(id(variable))
            if best is None or rank < best[0]:
                owners[id(variable)] = (rank, layer, chain)
    result = []
    for variable in root.trainable_weights:
        _, layer, chain = owners.get(id(variable), (None, root, (root,)))
        result.append((variable, layer, chain))
    return result


def attach(variable, owner, regularizer):
    """Sets the regularizer on the variable and on the owner's attribute.

    Returns whether a layer attribute (so the layer's config) recorded it.
    """
    variable.regularizer = regularizer
    name = short_name(variable)
    candidates = _REGULARIZER_ATTRIBUTES.get(name, (f"{name}_regularizer",))
    for attribute in candidates:
        if hasattr(owner, attribute):
            try:
                setattr(owner, attribute, regularizer)
            except AttributeError:  # a read-only property
                continue
            return True
    return False
