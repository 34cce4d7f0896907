"""Shared by the calibration metrics: predictions as class probabilities,
labels as one-hot rows, sample weights as one weight per prediction."""

from keras import ops


def _is_binary(y_pred):
    """One probability (or logit) per prediction: ``(n,)`` or ``(..., 1)``."""
    return len(y_pred.shape) == 1 or y_pred.shape[-1] == 1


def _static_rows_shape(y_pred):
    """The static shape of one entry per prediction (`y_pred` without its
    class axis)."""
    shape = tuple(y_pred.shape)
    return shape if len(shape) == 1 else shape[:-1]


def rows_shape(y_pred):
    """As `_static_rows_shape`, with the dynamic sizes of unknown axes (for
    reshaping and broadcasting)."""
    shape = tuple(ops.shape(y_pred))
    return shape if len(shape) == 1 else shape[:-1]


def _fits(received, expected):
    """Whether the static shapes agree where both sizes are known."""
    return len(received) == len(expected) and all(
        r is None or e is None or r == e for r, e in zip(received, expected))


def _without_trailing_one(shape, rank):
    if len(shape) == rank + 1 and shape[-1] == 1:
        return shape[:-1]
    return shape


def probabilities_and_one_hot(y_true, y_pred, from_logits):
    """``(p, t)``, both of shape ``(predictions, classes)``.

    `y_pred` of shape ``(..., classes)`` holds class probabilities (or
    logits); one of shape ``(samples,)`` or ``(..., 1)`` the probability
    of class 1 (binary). `y_true` is one-hot when it has `y_pred`'s rank and
    last dimension (> 1), else integer labels, one per prediction (with an
    optional trailing axis of 1). Every leading axis (samples, time steps)
    is flattened into the predictions axis.
    """
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    y_true = ops.convert_to_tensor(y_true)
    binary = _is_binary(y_pred)
    one_hot = (not binary and len(y_true.shape) == len(y_pred.shape)
               and y_true.shape[-1] == y_pred.shape[-1])
    _check_labels(y_true, y_pred, one_hot)
    if binary:
        p1 = ops.reshape(y_pred, (-1, 1))
        p1 = ops.sigmoid(p1) if from_logits else p1
        p = ops.concatenate([1.0 - p1, p1], axis=-1)
    else:
        p = ops.softmax(y_pred, axis=-1) if from_logits else y_pred
        p = ops.reshape(p, (-1, p.shape[-1]))
    num_classes = p.shape[-1]
    if one_hot:
        return p, ops.reshape(ops.cast(y_true, "float32"), (-1, num_classes))
    labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
    return p, ops.one_hot(labels, num_classes)


def _check_labels(y_true, y_pred, one_hot):
    expected = _static_rows_shape(y_pred)
    received = tuple(y_true.shape)
    if one_hot or _fits(_without_trailing_one(received, len(expected)),
                        expected):
        return
    raise ValueError(
        "Invalid value received for argument `y_true`. Expected integer "
        f"labels of shape {expected} (one per prediction), or one-hot rows "
        f"of shape {tuple(y_pred.shape)}, for `y_pred` of shape "
        f"{tuple(y_pred.shape)}. Received: y_true.shape={received}"
    )


def check_sample_weight(sample_weight, y_pred):
    """Raises unless `sample_weight` broadcasts over the leading axes of the
    predictions (as Keras's metrics weigh them: ``(samples,)`` weighs
    every time step of a sample, ``(samples, steps)`` each step)."""
    if sample_weight is None:
        return
    expected = _static_rows_shape(y_pred)
    received = tuple(ops.convert_to_tensor(sample_weight).shape)
    shape = _without_trailing_one(received, len(expected))
    if len(shape) <= len(expected) and all(
            r is None or e is None or r in (1, e)
            for r, e in zip(shape, expected)):
        return
    raise ValueError(
        "Invalid value received for argument `sample_weight`. Expected a "
        f"shape that broadcasts over the leading axes of {expected} (one "
        f"weight per prediction of `y_pred`, shape {tuple(y_pred.shape)}). "
        f"Received: sample_weight with shape={received}"
    )


def weights_per_prediction(sample_weight, y_pred):
    """`sample_weight` (checked) as one float32 weight per prediction,
    flattened as `probabilities_and_one_hot` flattens the predictions."""
    y_pred = ops.convert_to_tensor(y_pred)
    check_sample_weight(sample_weight, y_pred)
    weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
    shape = rows_shape(y_pred)
    if len(weight.shape) == len(shape) + 1:
        weight = ops.squeeze(weight, axis=-1)
    while len(weight.shape) < len(shape):
        weight = ops.expand_dims(weight, axis=-1)
    return ops.reshape(ops.broadcast_to(weight, shape), (-1,))
