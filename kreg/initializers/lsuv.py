"""Layer-sequential unit-variance initialization (Mishkin & Matas 2016)."""

import keras
import numpy as np

from kreg.diagnostics import _forward
from kreg.diagnostics.diagnose import _check_model
from kreg.diagnostics.diagnose import _check_x
from kreg.diagnostics.diagnose import _row_layers
from kreg.utils.validation import check_integer
from kreg.utils.validation import check_number
from kreg.utils.validation import check_optional_seed

_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
           keras.layers.Conv3D)


def lsuv(model, x, *, tol=0.1, max_iter=10, batch_size=256, seed=None):
    """Orthonormal kernels, rescaled layer by layer to unit output variance.

    Every Dense and Conv1D/2D/3D kernel of the model is first replaced by
    an orthonormal one (`keras.initializers.Orthogonal`); then, in the
    network's order, each layer's output before its activation,
    `z = x W + b` over all its entries on the first `batch_size` samples
    of `x`, is measured and the kernel divided by `std(z)` until
    `|std(z) - 1| <= tol` (at most `max_iter` times). The inputs of each
    layer are computed once, with the layers before it already rescaled
    (inference mode). Biases and normalization layers are left as they
    are. A refused call (bad argument) changes nothing; an error during
    the procedure restores the weights.

    Args:
        model: a built Sequential or Functional `keras.Model` (nested
            models included).
        x: the inputs, an array (or a list, one per model input);
            standardize them first.
        tol: positive float, the tolerance on the standard deviation.
            Defaults to `0.1`.
        max_iter: positive int, the most rescalings per layer. Defaults
            to `10`.
        batch_size: how many samples of `x` are used. Defaults to `256`.
        seed: `None` or an int, the seed of the orthonormal kernels.

    Returns:
        `{layer name: final std}` for every rescaled layer.

    Example:

    ```python
    stds = kreg.initializers.lsuv(model, x_train[:256])
    ```

    Reference:
        Mishkin & Matas, "All you need is a good init", ICLR 2016.
    """
    _check_model(model)
    tol = check_number("tol", tol, low=0, low_inclusive=False)
    max_iter = check_integer("max_iter", max_iter, low=1)
    batch_size = check_integer("batch_size", batch_size, low=1)
    seed = check_optional_seed("seed", seed)
    inputs = _check_x(model, x, batch_size)
    if not _forward.graph_model(model):
        raise ValueError(
            "Invalid value received for argument `model`. Expected a "
            "Sequential or Functional model (lsuv reads the input of every "
            f"layer). Received: model={model.name!r} (a subclassed model)")
    layers = [layer for layer in _row_layers(model)
              if isinstance(layer, _LAYERS) and getattr(layer, "kernel",
                                                        None) is not None]
    if not layers:
        raise ValueError(
            "Invalid value received for argument `model`. Expected a model "
            "with Dense or Conv layers. Received: "
            f"model={model.name!r}")
    saved = [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]
    try:
        return _lsuv(model, layers, inputs, tol, max_iter, seed)
    except BaseException:
        for variable, value in zip(model.weights, saved):
            variable.assign(value)
        raise


def _lsuv(model, layers, inputs, tol, max_iter, seed):
    for number, layer in enumerate(layers):
        initializer = keras.initializers.Orthogonal(
            seed=None if seed is None else seed + number)
        layer.kernel.assign(initializer(layer.kernel.shape,
                                        dtype=layer.kernel.dtype))
    recorder = _forward.Recorder(model)
    stds = {}
    for layer in layers:
        with keras.StatelessScope():  # discards any assignment
            recorder.run(inputs, training=False)
        layer_inputs = recorder.records[id(layer)][1]
        linear = _linear_copy(layer, layer_inputs)
        std = _std(linear(layer_inputs))
        for _ in range(max_iter):
            if abs(std - 1.0) <= tol or std == 0:
                break
            kernel = keras.ops.convert_to_numpy(layer.kernel) / std
            layer.kernel.assign(kernel)
            linear.kernel.assign(kernel)
            std = _std(linear(layer_inputs))
        stds[layer.name] = std
    return stds


def _linear_copy(layer, layer_inputs):
    """The layer without its activation, with the same weights."""
    config = {**layer.get_config(), "activation": None, "name": None}
    copy = type(layer).from_config(config)
    copy.build(tuple(layer_inputs.shape))
    copy.set_weights(layer.get_weights())
    return copy


def _std(value):
    value = np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")
    return float(value.std())
