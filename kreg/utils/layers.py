"""Walking a model's layers and naming its weights (shared helpers)."""

import keras

# Weights that multiply the inputs: penalized by weight decay and perturbed by
# weight noise; never biases nor normalization parameters.
KERNEL_NAMES = (
    "kernel",
    "depthwise_kernel",
    "pointwise_kernel",
    "recurrent_kernel",
    "embeddings",
)


def _children(layer):
    found = []
    if isinstance(layer, keras.Model):
        try:
            found.extend(layer.layers)
        except (AttributeError, ValueError):
            pass
    for value in vars(layer).values():
        if isinstance(value, keras.layers.Layer):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, keras.layers.Layer))
        elif isinstance(value, dict):
            found.extend(
                v for v in value.values() if isinstance(v, keras.layers.Layer)
            )
    return found


def walk_layers(root):
    """Yields ``(layer, chain)`` depth first, parents before children.

    ``chain`` is the tuple of layers from ``root`` down to ``layer``.
    """
    seen = set()
    stack = [(root, (root,))]
    while stack:
        layer, chain = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer, chain
        for child in reversed(_children(layer)):
            if id(child) not in seen:
                stack.append((child, chain + (child,)))


def leaf_layers(root):
    """The layers under `root` (itself included) that have no sublayers,
    in the order of `walk_layers`."""
    return [layer for layer, _ in walk_layers(root) if not _children(layer)]


def short_name(variable):
    """The variable's own name (``"kernel"`` for ``"dense/kernel"``)."""
    return variable.name.split("/")[-1]
