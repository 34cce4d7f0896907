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

    Each chosen Dense layer, in call order, is the encoder of a denoising
    autoencoder of its own input ``h`` (the output of every layer before
    it, Rescaling, Flatten, Conv and earlier Dense layers included, at their
    current weights, in inference mode):

        min  mean || D(E(corrupt(h))) - h ||^2

    ``E`` is the chosen layer and the model's layers after it that keep its
    output shape, up to the next Dense layer (activation, normalization,
    dropout; frozen); ``D`` a new linear Dense layer on the last axis,
    discarded afterwards. ``corrupt`` drops each input with probability
    ``corruption`` (masking noise, inverted-dropout scaling). Only the
    chosen layers' weights change. Then train the model as usual.

    Args:
        model: a built Sequential or Functional `keras.Model`, one input and
            one output, whose layers form a chain. Nested models are walked
            into; one that is not a chain itself is a single step (its
            Dense layers are not pretrained).
        x: the unlabelled inputs (a NumPy array).
        layers: the Dense layers to pretrain, as layers or names. Defaults
            to `None`: every Dense layer but the last (the output layer).
        epochs: epochs per layer, >= 1. Defaults to `10`.
        corruption: the masking probability in [0, 1). Defaults to `0.3`.
        batch_size: the batch size. Defaults to `32`.
        optimizer: the optimizer of each autoencoder (a name or a zero-
            argument factory). Defaults to `"adam"`.
        seed: the k-th chosen layer's masking noise and decoder's initial
            weights come from `seed + k` (the order of the samples from
            `keras.utils.set_random_seed`). Defaults to `None`.
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
    steps = _steps(_check_model(model))
    chosen = _chosen_layers(model, steps, layers)
    epochs = check_integer("epochs", epochs, low=1)
    batch_size = check_integer("batch_size", batch_size, low=1)
    corruption = check_number("corruption", corruption, 0.0, 1.0,
                              high_inclusive=False)
    seed = check_optional_seed("seed", seed)
    features = _inputs(model, x)
    _check_chain(model, steps, features[:8])
    histories = {}
    done = 0
    for number, layer in enumerate(chosen, 1):
        start = steps.index(layer)
        features = _apply(steps[done:start], features, batch_size)
        done = start
        if verbose:
            print(f"Pretraining layer {layer.name!r} "
                  f"({number} of {len(chosen)})")
        histories[layer.name] = _train_autoencoder(
            layer, steps[start + 1:_next_dense(steps, start)], features,
            epochs, corruption, batch_size, optimizer,
            None if seed is None else seed + number, verbose)
    return histories


def _train_autoencoder(layer, following, features, epochs, corruption,
                       batch_size, optimizer, seed, verbose):
    inputs = keras.Input(features.shape[1:])
    hidden = layer(Dropout(corruption, seed=seed)(inputs) if corruption
                   else inputs)
    frozen = []
    for other in following:
        output = other(hidden)
        if tuple(output.shape) != tuple(hidden.shape):
            break
        hidden = output
        frozen.append(other)
    outputs = keras.layers.Dense(
        features.shape[-1],
        kernel_initializer=keras.initializers.GlorotUniform(seed))(hidden)
    autoencoder = keras.Model(inputs, outputs)
    flags = [(other, other.trainable) for other in [layer] + frozen]
    for other in frozen:
        other.trainable = False
    layer.trainable = True
    try:
        autoencoder.compile(optimizer() if callable(optimizer) else optimizer,
                            "mse")
        return autoencoder.fit(features, features, epochs=epochs,
                               batch_size=batch_size, verbose=verbose)
    finally:
        for other, flag in flags:
            other.trainable = flag


def _chain_model(steps, shape):
    inputs = keras.Input(shape)
    outputs = inputs
    for layer in steps:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs)


def _apply(steps, features, batch_size):
    if not steps:
        return features
    return np.asarray(_chain_model(steps, features.shape[1:]).predict(
        features, batch_size=batch_size, verbose=0), dtype="float32")


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Invalid value received for argument `model`. Expected a "
            f"keras.Model. Received: model={model!r}")
    if not model.built or getattr(model, "inputs", None) is None:
        raise ValueError(
            "Invalid value received for argument `model`. Expected a built "
            f"Sequential or Functional keras.Model (a chain of layers). "
            f"Received: model={model!r}")
    return model


def _steps(model):
    """The layers of `model` in call order, nested chains walked into."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "Invalid value received for argument `model`. Expected a chain "
            f"of layers with one input and one output: {model.name!r} has "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs. "
            f"Received: model={model.name!r}")
    steps = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if (not isinstance(model, keras.Sequential)
                and len(keras.tree.flatten(layer.input)) != 1):
            raise ValueError(
                "Invalid value received for argument `model`. Expected a "
                f"chain of layers, each taking one input: {layer.name!r} of "
                f"{model.name!r} takes {len(keras.tree.flatten(layer.input))}"
                f". Received: model={model.name!r}")
        if isinstance(layer, keras.Model) and getattr(layer, "inputs", None):
            try:
                steps.extend(_steps(layer))
                continue
            except ValueError:
                pass  # Not a chain inside: one step.
        steps.append(layer)
    return steps


def _check_chain(model, steps, sample):
    """Refuses a model whose output is not its layers applied in order (a
    layer called twice, a connection that skips a layer)."""
    expected = keras.ops.convert_to_numpy(model(sample, training=False))
    chain = _chain_model(steps, sample.shape[1:])
    got = keras.ops.convert_to_numpy(chain(sample, training=False))
    if got.shape != expected.shape or not np.allclose(
            got, expected, rtol=1e-3, atol=1e-5, equal_nan=True):
        raise ValueError(
            "Invalid value received for argument `model`. Expected a chain "
            f"of layers, each called once on the output of the one before "
            f"it: applying the layers of {model.name!r} in order does not "
            f"give its output. Received: model={model.name!r}")


def _inputs(model, x):
    if not isinstance(x, (list, tuple)) and not hasattr(x, "__array__"):
        raise TypeError(
            "Invalid value received for argument `x`. Expected the inputs "
            f"as an array. Received: x={x!r}")
    features = np.asarray(x, dtype="float32")
    expected = tuple(model.inputs[0].shape)
    if features.ndim != len(expected) or any(
            want is not None and want != have
            for want, have in zip(expected[1:], features.shape[1:])):
        raise ValueError(
            "Invalid value received for argument `x`. Expected inputs of "
            f"shape {expected} (the input of {model.name!r}). Received: x "
            f"of shape {features.shape}")
    return features


def _chosen_layers(model, steps, layers):
    dense = [layer for layer in steps
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
        chosen.sort(key=steps.index)
    if not chosen:
        raise ValueError(
            f"Invalid value received for argument `layers`: {model.name!r} "
            "has no Dense layer to pretrain (by default every Dense layer "
            f"but the output layer). Received: layers={layers!r}")
    return chosen


def _next_dense(steps, position):
    for index in range(position + 1, len(steps)):
        if isinstance(steps[index], keras.layers.Dense):
            return index
    return len(steps)
