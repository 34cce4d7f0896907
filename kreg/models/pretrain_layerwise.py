"""Greedy layer-wise unsupervised pretraining with denoising autoencoders."""

import keras
import numpy as np

from kreg.layers.dropout import Dropout
from kreg.utils.validation import check_integer
from kreg.utils.validation import check_number
from kreg.utils.validation import check_optional_seed


def pretrain_layerwise(model, x, layers=None, epochs=10, corruption=0.3,
                       batch_size=32, optimizer="adam", seed=None,
                       verbose="auto"):
    """Pretrains a stack of Dense layers on unlabelled inputs, one by one.

    For each chosen Dense layer ``l = 1, 2, ...`` in order, with ``h_0 = x``
    and ``h_l`` the input of the next chosen layer (the model's own layers
    between them, activations and normalization included, applied to
    ``h_{l-1}``): a denoising autoencoder is trained to reconstruct
    ``h_{l-1}`` from a corrupted copy,

        min  mean || D(E(corrupt(h_{l-1}))) - h_{l-1} ||^2

    where the encoder ``E`` is the model's own layers from the chosen one up
    to the next chosen one and the decoder ``D`` a new linear Dense layer
    (discarded afterwards). ``corrupt`` drops each input with probability
    ``corruption`` (masking noise, with inverted-dropout scaling). Only the
    chosen Dense layers' weights change: every other layer of the model is
    frozen while it is pretrained. Then train the model on the labelled
    data as usual, from these weights.

    Args:
        model: a built `keras.Model` whose layers form a chain (a
            Sequential, or a Functional model without branches).
        x: the unlabelled inputs (a NumPy array).
        layers: the Dense layers to pretrain, as layers or names. Defaults
            to `None`: every Dense layer but the last (the output layer).
        epochs: epochs per layer, >= 1. Defaults to `10`.
        corruption: the masking probability in [0, 1). Defaults to `0.3`.
        batch_size: the batch size. Defaults to `32`.
        optimizer: the optimizer of each autoencoder (a name or a zero-
            argument factory). Defaults to `"adam"`.
        seed: seed of the masking noise. Defaults to `None`.
        verbose: Keras's ``fit`` verbosity (its progress bar). Defaults to
            `"auto"`.

    Returns:
        A dict: layer name -> the `keras.callbacks.History` of its
        autoencoder (its ``loss`` is the reconstruction error).

    Example:

    ```python
    kreg.models.pretrain_layerwise(model, x_unlabelled, epochs=5)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_few, y_few, epochs=20)
    ```

    References:
        Vincent et al., "Extracting and Composing Robust Features with
        Denoising Autoencoders", ICML 2008; Bengio et al., "Greedy
        Layer-Wise Training of Deep Networks", NeurIPS 2007.
    """
    chain = _chain(model)
    chosen = _chosen_layers(model, chain, layers)
    epochs = check_integer("epochs", epochs, low=1)
    batch_size = check_integer("batch_size", batch_size, low=1)
    corruption = check_number("corruption", corruption, 0.0, 1.0,
                              high_inclusive=False)
    seed = check_optional_seed("seed", seed)
    if not isinstance(x, (list, tuple)) and not hasattr(x, "__array__"):
        raise TypeError(
            "Invalid value received for argument `x`. Expected the inputs "
            f"as an array. Received: x={x!r}")
    features = np.asarray(x, dtype="float32")
    positions = [chain.index(layer) for layer in chosen]
    stops = positions[1:] + [_next_dense(chain, positions[-1])]
    histories = {}
    trainable = {id(layer): layer.trainable for layer in chain}
    try:
        for number, (start, stop) in enumerate(zip(positions, stops), 1):
            block = chain[start:stop]
            for layer in chain:
                layer.trainable = layer is chain[start]
            if verbose:
                print(f"Pretraining layer {chain[start].name!r} "
                      f"({number} of {len(positions)})")
            histories[chain[start].name] = _train_autoencoder(
                block, features, epochs, corruption, batch_size,
                optimizer, None if seed is None else seed + number, verbose)
            features = _apply(block, features, batch_size)
    finally:
        for layer in chain:
            layer.trainable = trainable[id(layer)]
    return histories


def _train_autoencoder(block, features, epochs, corruption, batch_size,
                       optimizer, seed, verbose):
    inputs = keras.Input(features.shape[1:])
    hidden = Dropout(corruption, seed=seed)(inputs) if corruption else inputs
    for layer in block:
        hidden = layer(hidden)
    outputs = keras.layers.Dense(features.shape[-1])(hidden)
    autoencoder = keras.Model(inputs, outputs)
    autoencoder.compile(optimizer() if callable(optimizer) else optimizer,
                        "mse")
    return autoencoder.fit(features, features, epochs=epochs,
                           batch_size=batch_size, verbose=verbose)


def _apply(block, features, batch_size):
    inputs = keras.Input(features.shape[1:])
    outputs = inputs
    for layer in block:
        outputs = layer(outputs)
    return np.asarray(keras.Model(inputs, outputs).predict(
        features, batch_size=batch_size, verbose=0), dtype="float32")


def _chain(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Invalid value received for argument `model`. Expected a "
            f"keras.Model. Received: model={model!r}")
    if not model.built:
        raise ValueError(
            "Invalid value received for argument `model`. Expected a built "
            f"keras.Model (a Sequential or Functional chain of layers). "
            f"Received: model={model!r}")
    chain = [layer for layer in model.layers
             if not isinstance(layer, keras.layers.InputLayer)]
    for before, after in zip(chain, chain[1:]):
        inbound = getattr(after, "input", None)
        if getattr(before, "output", None) is not inbound:
            raise ValueError(
                "pretrain_layerwise needs a chain of layers (each layer "
                f"feeding the next); {after.name!r} does not take the output "
                f"of {before.name!r}. Received: model={model.name!r}")
    return chain


def _chosen_layers(model, chain, layers):
    dense = [layer for layer in chain
             if isinstance(layer, keras.layers.Dense)]
    if layers is None:
        chosen = dense[:-1]
    else:
        if isinstance(layers, (str, keras.layers.Layer)):
            layers = [layers]
        by_name = {layer.name: layer for layer in dense}
        chosen = []
        for item in layers:
            layer = by_name.get(item) if isinstance(item, str) else item
            if layer is None or not any(layer is d for d in dense):
                raise ValueError(
                    "Invalid value received for argument `layers`. Expected "
                    f"Dense layers of {model.name!r} (or their names: "
                    f"{sorted(by_name)}). Received: {item!r}")
            chosen.append(layer)
        chosen.sort(key=chain.index)
    if not chosen:
        raise ValueError(
            f"Invalid value received for argument `layers`: {model.name!r} "
            "has no Dense layer to pretrain (by default every Dense layer "
            f"but the output layer). Received: layers={layers!r}")
    return chosen


def _next_dense(chain, position):
    for index in range(position + 1, len(chain)):
        if isinstance(chain[index], keras.layers.Dense):
            return index
    return len(chain)
