"""The mean prediction and its spread, for an ensemble or MC dropout."""

import keras

from kreg.layers.mc_predict import mc_predict
from kreg.models.ensemble import Ensemble
from kreg.utils.validation import check_bool


def predict_with_uncertainty(model, x, num_samples=20, batch_size=None,
                             from_logits=False):
    """The predictive mean and the spread of a set of predictions.

    - For a `kreg.models.Ensemble`: over its ``k`` members, as
      probabilities where the members output logits (``combine="softmax"``
      or ``"sigmoid"``); the mean is the ensemble's averaged probability.
    - For any other model: over ``num_samples`` Monte-Carlo dropout passes
      (`kreg.layers.mc_predict`; the model needs a
      ``kreg.layers.Dropout(mc=True)``, which samples in these passes
      only), on the model's outputs, or on their probabilities with
      ``from_logits=True``.

    Args:
        model: a `kreg.models.Ensemble` or a model with MC dropout.
        x: the inputs (arrays, or a list/dict of arrays); for MC dropout
            also batches (a `tf.data.Dataset`, any iterable of ``x`` or
            ``(x, y)``), as `kreg.layers.mc_predict` takes them.
        num_samples: the number of MC-dropout passes (ignored for an
            ensemble). Defaults to `20`.
        batch_size: examples per forward call. Defaults to `None`.
        from_logits: MC dropout only: the model outputs logits; each pass
            is turned into probabilities (softmax, or sigmoid for one unit)
            before the mean and spread. Defaults to `False`.

    Returns:
        ``(mean, std)``: NumPy arrays with the shape of one prediction; the
        standard deviation is the population one, over members or passes.
        For an ensemble with several outputs, `mean` and `std` are each a
        list (or dict) like the model's outputs: one array per output.

    Example:

    ```python
    mean, std = kreg.models.predict_with_uncertainty(ensemble, x_test)
    uncertain = std.max(axis=-1) > 0.2
    ```

    References:
        Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty
        Estimation using Deep Ensembles", NeurIPS 2017; Gal & Ghahramani,
        "Dropout as a Bayesian Approximation", ICML 2016.
    """
    check_bool("from_logits", from_logits)
    if isinstance(model, Ensemble):
        samples = model.predict_members(x, batch_size=batch_size)
        return (keras.tree.map_structure(lambda s: s.mean(axis=0), samples),
                keras.tree.map_structure(lambda s: s.std(axis=0), samples))
    if from_logits:
        model = keras.Sequential([model, keras.layers.Activation(
            _probabilities)])
    return mc_predict(model, x, num_samples=num_samples,
                      batch_size=batch_size)


def _probabilities(logits):
    if logits.shape[-1] == 1:
        return keras.ops.sigmoid(logits)
    return keras.ops.softmax(logits, axis=-1)
