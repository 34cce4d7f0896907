"""Monte-Carlo dropout prediction: the mean and spread of T stochastic passes."""

import numbers

import numpy as np

from kreg.layers.dropout import Dropout


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
        x: inputs, anything `model.predict` accepts.
        num_samples: int >= 2, the number of passes T. Defaults to ``20``.
        batch_size: passed to `model.predict`. Defaults to ``None``.

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
        for layer in _all_layers(model)
    ):
        raise ValueError(
            "`mc_predict` needs a model with at least one "
            "`kreg.layers.Dropout(rate > 0, mc=True)`: without one every "
            f"pass is identical. Received: model={model.name!r}"
        )
    samples = np.stack(
        [
            np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
            for _ in range(num_samples)
        ]
    )
    return samples.mean(axis=0), samples.std(axis=0)


def _all_layers(model):
    """Every layer inside `model`, nested models included (public API)."""
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found.extend(_all_layers(layer))
    return found
