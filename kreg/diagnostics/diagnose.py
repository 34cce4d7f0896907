"""kreg.diagnose: a network before its first step, checked as the lecture
checks it."""

import collections
import math

import keras
import numpy as np

from kreg.diagnostics import _forward
from kreg.diagnostics import _gradients
from kreg.diagnostics.problem import Problem
from kreg.diagnostics.report import Report
from kreg.utils.layers import leaf_layers
from kreg.utils.validation import check_integer

# Outputs within this distance of their bounds are saturated.
SATURATION_MARGIN = 1e-2
# Pre-activations within |z| < this are in the near-linear region.
LINEAR_REGION = 0.1
# A layer is a problem when more than these fractions are affected.
SATURATED_FRACTION = 0.2  # of its outputs (of its samples for softmax)
DEAD_FRACTION = 0.5  # of its units
NEAR_LINEAR_FRACTION = 0.5  # of its units
# Gradient norms: relative to the largest layer's, and absolute.
VANISHING_RATIO = 1e-4
EXPLODING_NORM = 1e3
# Inputs: the mean |feature mean| and the RMS of the feature stds.
INPUT_MEAN = 0.5
INPUT_STD = (0.5, 2.0)

_FIX_SCALE = ("scale the weights by 1/sqrt(n_in) "
              "(keras.initializers.LecunNormal, or the Keras default "
              "GlorotUniform) on standardized inputs")


def diagnose(model, x, y=None, *, loss=None, batch_size=256):
    """Checks a network at its current weights, before training.

    One forward pass on the first `batch_size` samples of `x` (in training
    mode, as the first training step sees the network), and one backward
    pass when `y` is given (with the model's compiled loss, or `loss`).
    Nothing in the model changes: every variable assignment of the passes
    (batch-normalization statistics, random seed states) is discarded.

    Measured (the lecture's "Initialisierung"): the inputs' per-feature
    mean and standard deviation; per layer the output's mean and std, the
    fraction of saturated outputs (sigmoid/tanh within 1e-2 of their
    bounds; softmax: samples whose largest probability is above 0.99), of
    dead ReLU-like units (never positive on the batch), of near-linear
    sigmoid/tanh units (every pre-activation `|z| < 0.1`: weights too
    small, the network collapses to a linear function), duplicate units
    (identical weights and bias: the symmetry random initialization must
    break; checked in hidden Dense/Conv layers), and the gradient norm of
    the layer's trainable weights (vanishing: below 1e-4 times the largest
    layer's; exploding: above 1e3 or not finite). A layer whose output
    cannot be read (inside a subclassed model) is "not checked".

    Args:
        model: a built `keras.Model` (Sequential, Functional, nested).
        x: the inputs, an array (or a list of arrays, one per input).
        y: the targets, or `None` for no backward pass. Defaults to `None`.
        loss: a Keras loss (name, function or `keras.losses.Loss`) for
            the backward pass; by default the model's compiled loss.
        batch_size: how many samples of `x` are used. Defaults to `256`.

    Returns:
        A `kreg.diagnostics.Report`: `print(report)` shows a table,
        `report.problems` lists `Problem(layer, kind, message)`.

    Example:

    ```python
    report = kreg.diagnose(model, x_train, y_train,
                           loss="sparse_categorical_crossentropy")
    print(report)
    [problem.kind for problem in report.problems]
    ```

    Reference:
        Glorot & Bengio, "Understanding the difficulty of training deep
        feedforward neural networks", AISTATS 2010.
    """
    _check_model(model)
    batch_size = check_integer("batch_size", batch_size, low=1)
    inputs = _check_x(model, x, batch_size)
    loss_fn = _loss_function(model, y, loss)
    if y is not None:
        y = _slice(y, batch_size, "y", len(_flat(inputs)[0]))
    recorder = _forward.Recorder(model)
    taps = []

    def run(inputs, y):
        outputs = recorder.run(inputs, training=True)
        taps[:] = [layer for layer, _, _ in recorder.records.values()]
        values = [output for _, _, output in recorder.records.values()]
        if loss_fn is None:
            return keras.ops.zeros(()), values
        total = keras.ops.mean(loss_fn(y, outputs))
        for extra in model.losses:
            total = total + keras.ops.cast(extra, total.dtype)
        return total, values

    key = (_signature(inputs), _signature(y), id(loss), loss_fn is None)
    loss_value, values, grads = _gradients.run(
        run, model, (inputs, y), loss_fn is not None, key, taps)
    loss_value = (None if loss_fn is None
                  else float(keras.ops.convert_to_numpy(loss_value)))
    variables = list(model.trainable_variables)
    outputs = {id(layer): value for layer, value in zip(taps, values)}
    layers = _row_layers(model)
    rows = {layer.name: _measure(layer, outputs.get(id(layer)))
            for layer in layers}
    problems = []
    hidden = _hidden(model)
    for layer in layers:
        problems += _layer_problems(layer, rows[layer.name],
                                    id(layer) in hidden)
    if grads is not None:
        problems += _gradient_problems(layers, rows, variables, grads)
    input_stats, input_problems = _input_stats(inputs, layers, outputs)
    return Report(rows, input_stats, input_problems + problems, loss_value)


# Arguments ------------------------------------------------------------------
def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Invalid value received for argument `model`. Expected a "
            f"keras.Model. Received: model={model!r}")
    if not model.built:
        raise ValueError(
            "Invalid value received for argument `model`. Expected a built "
            "model (give it an Input, call build() or call it on data). "
            f"Received: model={model.name!r} (not built)")


def _signature(value):
    return tuple((tuple(a.shape), str(a.dtype)) for a in _flat(value)
                 if a is not None)


def _flat(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _to_array(value, name):
    if not hasattr(value, "shape"):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError):
            value = None
    if value is None or not getattr(value, "shape", ()):
        raise TypeError(
            f"Invalid value received for argument `{name}`. Expected an "
            f"array with a batch axis. Received: {name}={value!r}")
    return keras.ops.convert_to_numpy(value)


def _slice(value, batch_size, name, count=None):
    parts = [_to_array(v, name)[:batch_size] for v in _flat(value)]
    for part in parts:
        if count is not None and len(part) != count:
            raise ValueError(
                f"Invalid value received for argument `{name}`. Expected "
                f"as many samples as `x` ({count} used). Received: {name} "
                f"with shape {part.shape}")
    return parts[0] if len(parts) == 1 else parts


def _check_x(model, x, batch_size):
    arrays = _flat(_slice(x, batch_size, "x"))
    try:
        specs = list(model.inputs)
    except (AttributeError, ValueError):
        specs = None
    if specs is not None:
        if len(specs) != len(arrays):
            raise ValueError(
                "Invalid value received for argument `x`. Expected "
                f"{len(specs)} input array(s), one per model input. "
                f"Received: {len(arrays)} array(s)")
        for spec, array in zip(specs, arrays):
            expected = tuple(spec.shape[1:])
            ok = len(array.shape) - 1 == len(expected) and all(
                e is None or e == a for e, a in zip(expected, array.shape[1:]))
            if not ok:
                raise ValueError(
                    "Invalid value received for argument `x`. Expected "
                    f"samples of shape {expected} (the model's input). "
                    f"Received: x with shape {array.shape}")
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(
            "Invalid value received for argument `x`. Expected the same "
            "number of samples in every input array. Received: shapes "
            f"{[a.shape for a in arrays]}")
    return arrays[0] if len(arrays) == 1 else arrays


def _loss_function(model, y, loss):
    if y is None:
        if loss is not None:
            raise ValueError(
                "Invalid value received for argument `y`. Expected targets "
                f"when a `loss` is given. Received: y=None, loss={loss!r}")
        return None
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "Invalid value received for argument `loss`. Expected a "
                "loss (or a model compiled with one) when `y` is given, "
                "for the backward pass. Received: loss=None")
    if isinstance(loss, (list, tuple, dict)):
        names = list(getattr(model, "output_names", []) or [])
        items = (list(loss.items()) if isinstance(loss, dict)
                 else list(zip(names, loss)))
        functions = [(names.index(k) if k in names else i,
                      _get_loss(v)) for i, (k, v) in enumerate(items)]

        def total(y_true, y_pred):
            y_true, y_pred = _flat(y_true), _flat(y_pred)
            return sum(fn(y_true[i], y_pred[i]) for i, fn in functions)
        return total
    return _get_loss(loss)


def _get_loss(loss):
    try:
        return keras.losses.get(loss)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Invalid value received for argument `loss`. {error}. "
            f"Received: loss={loss!r}") from None


# Measuring ------------------------------------------------------------------
def _row_layers(model):
    """The layers given a row: every layer of the model's graphs (nested
    graphs opened), or a subclassed model's leaf layers."""
    if not _forward.graph_model(model):
        return [layer for layer in leaf_layers(model) if layer is not model]
    rows = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        rows += (_row_layers(layer) if isinstance(layer, keras.Model)
                 else [layer])
    return rows


def _hidden(model):
    """ids of the row layers that do not produce a model output."""
    outputs = set()
    if isinstance(model, keras.Sequential) and model.layers:
        outputs.add(id(model.layers[-1]))
    elif _forward.graph_model(model):
        ends = {id(t) for t in model.outputs}
        for layer in model.layers:
            try:
                if any(id(t) in ends for t in _flat(layer.output)):
                    outputs.add(id(layer))
            except (AttributeError, ValueError):
                continue
    return {id(layer) for layer in _row_layers(model)
            if id(layer) not in outputs}


def _activation(layer):
    if isinstance(layer, keras.layers.ReLU):
        return "relu" if not layer.negative_slope else None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    if name in ("sigmoid", "tanh", "softmax", "relu", "relu6", "linear"):
        return name
    return None


def _units(layer, value):
    """The output as (positions, units), units on the channel axis."""
    if value.ndim > 2:
        data_format = getattr(layer, "data_format", None) or (
            keras.config.image_data_format())
        if data_format == "channels_first":
            value = np.moveaxis(value, 1, -1)
    return value.reshape(-1, value.shape[-1])


def _pre_activation(activation, value):
    eps = 1e-7
    if activation == "sigmoid":
        value = np.clip(value, eps, 1 - eps)
        return np.log(value) - np.log1p(-value)
    return np.arctanh(np.clip(value, -1 + eps, 1 - eps))


def _duplicates(layer):
    kernel = getattr(layer, "kernel", None)
    if not isinstance(layer, (keras.layers.Dense, keras.layers.Conv1D,
                              keras.layers.Conv2D, keras.layers.Conv3D)):
        return None
    if kernel is None or getattr(layer, "groups", 1) != 1:
        return None
    units = keras.ops.convert_to_numpy(kernel)
    units = units.reshape(-1, units.shape[-1]).T
    bias = getattr(layer, "bias", None)
    if bias is not None:
        units = np.concatenate(
            [units, keras.ops.convert_to_numpy(bias)[:, None]], axis=1)
    counts = collections.Counter(
        row.tobytes() for row in np.ascontiguousarray(units))
    return sum(count for count in counts.values() if count > 1)


def _measure(layer, value):
    activation = _activation(layer)
    row = {"type": type(layer).__name__, "activation": activation,
           "checked": False, "mean": None, "std": None, "saturated": None,
           "dead": None, "near_linear": None,
           "duplicates": _duplicates(layer), "grad_norm": None, "units": None}
    if value is None or isinstance(value, (list, tuple, dict)):
        return row
    value = np.asarray(keras.ops.convert_to_numpy(value))
    if not np.issubdtype(value.dtype, np.floating) or value.ndim < 1:
        return row
    value = value.astype("float64")
    row.update(checked=True, mean=float(value.mean()),
               std=float(value.std()))
    if value.ndim < 2:
        return row
    units = _units(layer, value)
    row["units"] = units.shape[1]
    margin = SATURATION_MARGIN
    if activation == "sigmoid":
        row["saturated"] = float(np.mean((units < margin)
                                         | (units > 1 - margin)))
    elif activation == "tanh":
        row["saturated"] = float(np.mean(np.abs(units) > 1 - margin))
    elif activation == "softmax":
        probabilities = value.reshape(-1, value.shape[-1])
        row["saturated"] = float(np.mean(probabilities.max(axis=1)
                                         > 1 - margin))
    if activation in ("sigmoid", "tanh"):
        z = _pre_activation(activation, units)
        row["near_linear"] = float(np.mean(
            np.abs(z).max(axis=0) < LINEAR_REGION))
    if activation in ("relu", "relu6"):
        row["dead"] = float(np.mean(units.max(axis=0) <= 0))
    return row


# Problems -------------------------------------------------------------------
def _layer_problems(layer, row, hidden):
    name, activation, found = layer.name, row["activation"], []
    if row["saturated"] is not None and row["saturated"] > SATURATED_FRACTION:
        what = ("of the samples have a largest probability above "
                f"{1 - SATURATION_MARGIN}" if activation == "softmax"
                else f"of the outputs are within {SATURATION_MARGIN} of "
                "their bounds")
        found.append(Problem(name, "saturated", (
            f"layer {name!r} ({activation}): {row['saturated']:.0%} {what}, "
            "where the derivative is near 0 and training crawls (weights "
            f"too large); {_FIX_SCALE}.")))
    if row["dead"] is not None and row["dead"] > DEAD_FRACTION:
        found.append(Problem(name, "dead_units", (
            f"layer {name!r} ({activation}): {row['dead']:.0%} of its "
            f"{row['units']} units are never positive on the batch (dead: "
            "their gradient is 0); initialize the biases of ReLU layers "
            "slightly positive (bias_initializer=keras.initializers."
            f"Constant(0.01)) and {_FIX_SCALE}.")))
    if (row["near_linear"] is not None
            and row["near_linear"] > NEAR_LINEAR_FRACTION):
        found.append(Problem(name, "near_linear", (
            f"layer {name!r} ({activation}): {row['near_linear']:.0%} of its "
            f"{row['units']} units have every pre-activation within |z| < "
            f"{LINEAR_REGION}, where {activation} is nearly linear (weights "
            "too small: the network collapses to a linear function); "
            f"{_FIX_SCALE}.")))
    if hidden and row["duplicates"]:
        found.append(Problem(name, "duplicate_units", (
            f"layer {name!r}: {row['duplicates']} units have the same "
            "weights and bias as another unit (symmetry: identical units "
            "get identical gradients and stay identical); initialize the "
            "weights randomly (the Keras default GlorotUniform, or "
            "keras.initializers.LecunNormal).")))
    return found


def _gradient_problems(layers, rows, variables, grads):
    owner = {}
    for layer in layers:
        for variable in layer.trainable_variables:
            owner.setdefault(id(variable), layer.name)
    squares = {}
    for variable, grad in zip(variables, grads):
        name = owner.get(id(variable))
        if name is None:
            continue
        grad = np.asarray(keras.ops.convert_to_numpy(grad), dtype="float64")
        squares[name] = squares.get(name, 0.0) + float(np.sum(grad ** 2))
    norms = {name: math.sqrt(total) for name, total in squares.items()}
    for name, norm in norms.items():
        rows[name]["grad_norm"] = norm
    finite = [n for n in norms.values() if math.isfinite(n)]
    largest = max(finite, default=0.0)
    top = next((k for k, v in norms.items() if v == largest), None)
    found = []
    for name, norm in norms.items():
        if not math.isfinite(norm) or norm > EXPLODING_NORM:
            found.append(Problem(name, "exploding_gradient", (
                f"layer {name!r}: gradient norm {norm:.3g} (above "
                f"{EXPLODING_NORM:g}): the gradient grows layer by layer "
                f"on its way back (weights too large); {_FIX_SCALE}, or "
                "clip the gradients (kreg.optimizers.ClippedOptimizer).")))
        elif largest > 0 and norm < VANISHING_RATIO * largest:
            found.append(Problem(name, "vanishing_gradient", (
                f"layer {name!r}: gradient norm {norm:.3g}, "
                f"{norm / largest:.1e} times that of layer {top!r} "
                f"({largest:.3g}): the gradient shrinks layer by layer on "
                "its way back; use ReLU-like units in hidden layers and "
                f"{_FIX_SCALE}, or add BatchNormalization.")))
    return found


def _input_stats(inputs, layers, outputs):
    arrays, measured_at = _flat(inputs), None
    first = layers[0] if layers else None
    if (len(arrays) == 1 and isinstance(first, (keras.layers.Normalization,
                                                keras.layers.Rescaling))
            and outputs.get(id(first)) is not None):
        arrays = [keras.ops.convert_to_numpy(outputs[id(first)])]
        measured_at = first.name
    stats, found = [], []
    for number, array in enumerate(arrays):
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.floating) or array.ndim < 2:
            continue
        features = array.astype("float64").reshape(-1, array.shape[-1])
        mean, std = features.mean(axis=0), features.std(axis=0)
        stats.append({"mean": mean, "std": std, "measured_at": measured_at})
        typical_mean = float(np.mean(np.abs(mean)))
        typical_std = float(np.sqrt(np.mean(std ** 2)))
        low, high = INPUT_STD
        if typical_mean > INPUT_MEAN or not low <= typical_std <= high:
            where = (f" after layer {measured_at!r}" if measured_at else "")
            found.append(Problem(None, "inputs_not_standardized", (
                f"inputs {number}{where}: mean |feature mean| "
                f"{typical_mean:.3g}, RMS of the feature stds "
                f"{typical_std:.3g} over {features.shape[1]} features "
                "(expected about 0 and 1); scale every input feature to "
                "mean 0 and standard deviation 1, e.g. with an adapted "
                "keras.layers.Normalization as the first layer.")))
    return stats, found
