"""Monte-Carlo dropout prediction: the mean and spread of T stochastic passes."""

import numbers

import keras
import numpy as np

from kreg.layers.dropout import Dropout
from kreg.utils.layers import walk_layers


def mc_predict(model, x, num_samples=20, batch_size=None):
    """Runs ``num_samples`` stochastic forward passes and summarizes them.

    The model must contain at least one `kreg.layers.Dropout` with
    ``mc=True``: those layers keep dropping units at inference, so each pass
    predicts with a different sub-network, while everything else (batch
    normalization, other dropout layers) stays in inference mode. The mean is
    the Monte-Carlo estimate of the predictive mean, the standard deviation a
    measure of the model's uncertainty.

    Args:
        model: a built `keras.Model`.
        x: inputs: an array, or a list/dict of arrays for several inputs.
        num_samples: int >= 2, the number of passes T. Defaults to ``20``.
        batch_size: int > 0, the number of examples per forward call;
            ``None`` runs all of `x` as one batch. Defaults to ``None``.

    Returns:
        A tuple ``(mean, std)`` of NumPy arrays with the shape of one
        prediction: the mean over the T passes and the (population) standard
        deviation.

    Reference:
        Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing
        Model Uncertainty in Deep Learning", ICML 2016.
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "Invalid value received for argument `model`. Expected a "
            f"keras.Model. Received: model={model!r}"
        )
    num_samples = _check_int("num_samples", num_samples, 2, ">= 2")
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1,
                                "> 0, or None")
    count = _count_examples(x)
    if not any(
        isinstance(layer, Dropout) and layer.mc and layer.rate > 0
        for layer, _ in walk_layers(model)
    ):
        raise ValueError(
            "`mc_predict` needs a model with at least one "
            "`kreg.layers.Dropout(rate > 0, mc=True)`: without one every "
            f"pass is identical. Received: model={model.name!r}"
        )
    samples = np.stack(
        [_one_pass(model, x, count, batch_size) for _ in range(num_samples)]
    )
    return samples.mean(axis=0), samples.std(axis=0)


def _check_int(name, value, low, expectation):
    """Returns `value` as an int (NumPy integers included) >= `low`."""
    message = (
        f"Invalid value received for argument `{name}`. Expected an int "
        f"{expectation}. Received: {name}={value!r}"
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(message)
    if value < low:
        raise ValueError(message)
    return int(value)


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


def _one_pass(model, x, count, batch_size):
    """One stochastic pass with the compiled predict step (no data pipeline:
    `model.predict` would build one per pass)."""
    step = count if batch_size is None else batch_size
    chunks = [
        keras.tree.map_structure(lambda a, s=start: a[s:s + step], x)
        for start in range(0, count, step)
    ]
    outputs = [
        keras.ops.convert_to_numpy(model.predict_on_batch(chunk))
        for chunk in chunks
    ]
    return np.concatenate(outputs, axis=0)
