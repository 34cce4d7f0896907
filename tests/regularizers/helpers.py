"""Backend-specific gradient helper for the regularizer tests."""

import keras
import numpy as np


def value_and_grad(fn, x):
    """``(fn(x), d fn / d x)`` as NumPy, on the active backend."""
    backend = keras.backend.backend()
    x = np.asarray(x, dtype="float32")
    if backend == "tensorflow":
        import tensorflow as tf

        t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = fn(t)
        return y.numpy(), tape.gradient(y, t).numpy()
    if backend == "jax":
        import jax

        y, g = jax.value_and_grad(fn)(x)
        return np.asarray(y), np.asarray(g)
    if backend == "torch":
        import torch

        t = torch.tensor(x, requires_grad=True)
        y = fn(t)
        y.backward()
        return y.detach().cpu().numpy(), t.grad.cpu().numpy()
    raise NotImplementedError(backend)
