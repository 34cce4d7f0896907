"""Shared by the calibration metrics: predictions as class probabilities and
labels as one-hot rows."""

from keras import ops


def probabilities_and_one_hot(y_true, y_pred, from_logits):
    """``(p, t)``, both of shape ``(samples, classes)``.

    `y_pred` of shape ``(samples, classes)`` holds class probabilities (or
    logits); one of shape ``(samples,)`` or ``(samples, 1)`` the probability
    of class 1 (binary). `y_true` is one-hot when it has `y_pred`'s rank and
    last dimension (> 1), else integer labels.
    """
    y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
    y_true = ops.convert_to_tensor(y_true)
    binary = len(y_pred.shape) == 1 or y_pred.shape[-1] == 1
    one_hot = (not binary and len(y_true.shape) == len(y_pred.shape)
               and y_true.shape[-1] == y_pred.shape[-1])
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
