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
        batch_size: number of examples per forward call; ``None`` runs all
            of `x` as one batch. Defaults to ``None``.

    Returns:
        A tuple ``(mean, std)`` of NumPy arrays with the shape of one
        prediction: the mean over the T passes and the (population) standard
        deviation.

    Reference:
        Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing
        Model Uncertainty in Deep Learning", ICML 2016.
    """
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or num_samples < 2
    ):
        raise ValueError(
            "Invalid value received for argument `num_samples`. Expected an "
            f"int >= 2. Received: num_samples={num_samples!r}"
        )
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
        [_one_pass(model, x, batch_size) for _ in range(num_samples)]
    )
    return samples.mean(axis=0), samples.std(axis=0)


def _one_pass(model, x, batch_size):
    """One stochastic pass with the compiled predict step (no data pipeline:
    `model.predict` would build one per pass)."""
    count = len(keras.tree.flatten(x)[0])
    step = count if batch_size is None else int(batch_size)
    chunks = [
        keras.tree.map_structure(lambda a, s=start: a[s:s + step], x)
        for start in range(0, count, step)
    ]
    outputs = [
        keras.ops.convert_to_numpy(model.predict_on_batch(chunk))
        for chunk in chunks
    ]
    return np.concatenate(outputs, axis=0)
