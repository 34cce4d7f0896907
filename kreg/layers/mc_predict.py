"""Monte-Carlo dropout: the mean and spread of T stochastic passes."""

import contextlib

import keras
import numpy as np

from kreg.layers.dropout import Dropout
from kreg.utils.layers import walk_layers
from kreg.utils.validation import check_integer


def mc_sampling(model):
    """Turns Monte-Carlo dropout on for the duration of a ``with`` block.

    Inside the block, every `kreg.layers.Dropout` with ``mc=True`` in
    ``model`` samples its masks at inference too (``predict``,
    ``predict_on_batch``, ``evaluate``, the validation inside ``fit``,
    ``model(x)``); everything else (batch normalization, other dropout
    layers) stays in inference mode. On exit, also when the block raises,
    inference is deterministic again. The switch is state that the
    model's compiled functions read, so entering and leaving the block
    traces nothing again, with or without ``jit_compile`` (only after
    ``mc`` was switched on in a layer whose inference was traced without
    it are the predict and test functions made again). `mc_predict` uses
    it for its passes.

    Args:
        model: a built `keras.Model` (or layer) with at least one
            ``kreg.layers.Dropout(rate > 0, mc=True)``.

    Returns:
        A context manager (the model is checked at this call).

    Example:

    ```python
    with kreg.layers.mc_sampling(model):
        passes = [model.predict(x, verbose=0) for _ in range(20)]
    ```
    """
    return _sampling(model, _mc_layers(model))


@contextlib.contextmanager
def _sampling(model, layers):
    if isinstance(model, keras.Model) and any(
            layer._inference_without_mc for layer in layers):
        # Traced while `mc` was off: those functions ignore the switch.
        model.make_predict_function(force=True)
        model.make_test_function(force=True)
        for layer in layers:
            layer._inference_without_mc = False
    previous = [layer._mc_switch.get() for layer in layers]
    try:
        for layer in layers:
            layer._mc_switch.set(True)
        yield model
    finally:
        for layer, value in zip(layers, previous):
            layer._mc_switch.set(value)


def _check_model(model):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "Invalid value received for argument `model`. Expected a "
            f"keras.Model. Received: model={model!r}"
        )


def _mc_layers(model):
    """The model's `Dropout(rate > 0, mc=True)` layers; raises without
    one."""
    _check_model(model)
    layers = [layer for layer, _ in walk_layers(model)
              if isinstance(layer, Dropout) and layer.mc and layer.rate > 0]
    if not layers:
        raise ValueError(
            "Invalid value received for argument `model`. Expected a model "
            "with at least one `kreg.layers.Dropout(rate > 0, mc=True)`: "
            "without one every Monte-Carlo pass is identical. Received: "
            f"model={model.name!r}"
        )
    return layers


def mc_predict(model, x, num_samples=20, batch_size=None):
    """Runs ``num_samples`` stochastic forward passes and summarizes them.

    The model must contain at least one `kreg.layers.Dropout` with
    ``mc=True``: during these passes (and only there: ordinary ``predict``
    and ``evaluate`` stay deterministic) those layers keep dropping units
    at inference, so each pass predicts with a different sub-network,
    while everything else (batch normalization, other dropout layers)
    stays in inference mode. The mean is the Monte-Carlo estimate of the
    predictive mean, the standard deviation a measure of the model's
    uncertainty.

    Args:
        model: a built `keras.Model`.
        x: inputs: an array, or a list/dict of arrays for several inputs;
            or batches: a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
            `torch.utils.data.DataLoader` or any iterable of batches, each
            batch the inputs ``x`` or a tuple ``(x, y)`` /
            ``(x, y, sample_weight)`` (the targets are ignored). Batches
            are read once; each gets its ``num_samples`` passes.
        num_samples: int >= 2, the number of passes T. Defaults to ``20``.
        batch_size: int > 0, the number of examples per forward call for
            array inputs; ``None`` runs all of `x` as one batch (and must
            be ``None`` for batched inputs, whose batches are used).
            Defaults to ``None``.

    Returns:
        A tuple ``(mean, std)``, each with the structure and shapes of the
        model's prediction (one NumPy array, or a list/dict of them for
        several outputs): the mean over the T passes and the (population)
        standard deviation.

    Reference:
        Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing
        Model Uncertainty in Deep Learning", ICML 2016.
    """
    _check_model(model)
    num_samples = check_integer("num_samples", num_samples, low=2)
    batch_size = check_integer("batch_size", batch_size, low=1,
                               allow_none=True)
    batches = _batches(x, batch_size)
    sampling = mc_sampling(model)
    samples = []  # per batch: the passes stacked on a new first axis
    with sampling:
        for batch in batches:
            passes = [
                keras.tree.map_structure(keras.ops.convert_to_numpy,
                                         model.predict_on_batch(batch))
                for _ in range(num_samples)
            ]
            samples.append(keras.tree.map_structure(
                lambda *each: np.stack(each), *passes))
    if not samples:
        raise ValueError(
            "Invalid value received for argument `x`. Expected at least one "
            f"batch. Received: x={x!r} with no batches"
        )
    samples = keras.tree.map_structure(
        lambda *each: np.concatenate(each, axis=1), *samples)
    return (keras.tree.map_structure(lambda s: s.mean(axis=0), samples),
            keras.tree.map_structure(lambda s: s.std(axis=0), samples))


def _batches(x, batch_size):
    """An iterator over the batches of inputs in `x`, after the checks that
    can run before any pass."""
    if _is_batched(x):
        if batch_size is not None:
            raise ValueError(
                "Invalid value received for argument `batch_size`. Expected "
                "None when `x` yields batches (their size is used). "
                f"Received: batch_size={batch_size}"
            )
        return _inputs_of_batches(x)
    count = _count_examples(x)
    step = count if batch_size is None else batch_size
    return (
        keras.tree.map_structure(lambda a, s=start: a[s:s + step], x)
        for start in range(0, count, step)
    )


def _is_batched(x):
    """Whether `x` is a source of batches rather than arrays."""
    if isinstance(x, (str, bytes, list, tuple, dict)) or hasattr(x, "shape"):
        return False
    return isinstance(x, keras.utils.PyDataset) or hasattr(x, "__iter__")


def _inputs_of_batches(x):
    if isinstance(x, keras.utils.PyDataset):
        batches = (x[i] for i in range(len(x)))
    else:
        batches = iter(x)
    for batch in batches:
        inputs = keras.utils.unpack_x_y_sample_weight(batch)[0]
        yield keras.tree.map_structure(_to_numpy, inputs)


def _to_numpy(value):
    """A tensor of any backend (a tf.data batch on JAX) as a NumPy array."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return keras.ops.convert_to_numpy(value)
    except Exception:  # a tensor of another framework
        if hasattr(value, "detach"):  # torch
            return value.detach().cpu().numpy()
        return np.asarray(value)


def _count_examples(x):
    """The number of examples in `x`, after checking that every input is an
    array (at least 1-D) and that all have the same length."""
    leaves = keras.tree.flatten(x)
    if not leaves or any(
        not hasattr(leaf, "shape") or len(leaf.shape) == 0 for leaf in leaves
    ):
        raise TypeError(
            "Invalid value received for argument `x`. Expected an array, or "
            f"a list/dict of arrays (at least 1-D). Received: x={x!r}"
        )
    lengths = [int(leaf.shape[0]) for leaf in leaves]
    if len(set(lengths)) > 1:
        raise ValueError(
            "Invalid value received for argument `x`. Expected inputs with "
            f"the same number of examples. Received: x with lengths {lengths}"
        )
    if lengths[0] == 0:
        raise ValueError(
            "Invalid value received for argument `x`. Expected at least one "
            "example. Received: x with 0 examples"
        )
    return lengths[0]
