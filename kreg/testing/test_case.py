"""A test base for kreg pieces, using public Keras API only."""

import json
import os
import tempfile
import unittest

import keras
import numpy as np


class TestCase(unittest.TestCase):
    """Base class with the checks every kreg piece should pass.

    - `run_config_round_trip`: ``get_config`` -> ``from_config`` and a JSON
      round trip through ``keras.saving.serialize_keras_object``.
    - `run_save_load`: ``model.save("m.keras")`` then
      ``keras.models.load_model`` with no ``custom_objects``, equal outputs.
    - `run_compiled_fit`: a short ``fit`` with ``jit_compile=True`` (XLA on
      TensorFlow and JAX; PyTorch has no XLA and runs eagerly), finite loss.
    - `mixed_precision`: a context manager that sets a dtype policy such as
      ``"mixed_float16"`` and restores the previous one.
    """

    def setUp(self):
        super().setUp()
        keras.backend.clear_session()
        keras.utils.set_random_seed(1337)

    # Numbers -----------------------------------------------------------
    def to_numpy(self, x):
        return np.asarray(keras.ops.convert_to_numpy(x))

    def assertAllClose(self, actual, expected, atol=1e-6, rtol=1e-6,
                       msg=None):
        np.testing.assert_allclose(
            self.to_numpy(actual), self.to_numpy(expected), atol=atol,
            rtol=rtol, err_msg=msg or "",
        )

    def assertAllEqual(self, actual, expected, msg=None):
        np.testing.assert_array_equal(
            self.to_numpy(actual), self.to_numpy(expected), err_msg=msg or ""
        )

    # Serialization -----------------------------------------------------
    def run_config_round_trip(self, obj):
        """Rebuilds `obj` from its config and from JSON; returns both copies.

        The copies must have the same class and an equal config.
        """
        config = obj.get_config()
        from_config = obj.__class__.from_config(config)
        self.assertEqual(from_config.get_config(), config)

        serialized = keras.saving.serialize_keras_object(obj)
        revived = keras.saving.deserialize_keras_object(
            json.loads(json.dumps(serialized))
        )
        self.assertIs(revived.__class__, obj.__class__)
        self.assertEqual(revived.get_config(), config)
        return from_config, revived

    def run_save_load(self, model, x, atol=1e-6):
        """Saves `model` as .keras, reloads without custom_objects, compares.

        Returns the reloaded model.
        """
        expected = self.to_numpy(model.predict(x, verbose=0))
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.keras")
            model.save(path)
            reloaded = keras.models.load_model(path)
        actual = self.to_numpy(reloaded.predict(x, verbose=0))
        np.testing.assert_allclose(actual, expected, atol=atol, rtol=atol)
        return reloaded

    # Training ----------------------------------------------------------
    def jit_compile_setting(self):
        """`True` where Keras compiles with XLA (TensorFlow, JAX)."""
        return keras.backend.backend() in ("tensorflow", "jax")

    def run_compiled_fit(self, model, x, y, loss="mse", epochs=2,
                         batch_size=8, optimizer="sgd"):
        """Compiles with ``jit_compile`` and fits; asserts a finite loss."""
        model.compile(
            optimizer=optimizer, loss=loss,
            jit_compile=self.jit_compile_setting(),
        )
        history = model.fit(
            x, y, epochs=epochs, batch_size=batch_size, verbose=0
        )
        losses = history.history["loss"]
        self.assertTrue(
            np.all(np.isfinite(losses)), f"non-finite loss: {losses}"
        )
        for weight in model.weights:
            self.assertTrue(
                np.all(np.isfinite(self.to_numpy(weight))),
                f"non-finite weight {weight.path}",
            )
        return history

    def mixed_precision(self, policy="mixed_float16"):
        return _DtypePolicy(policy)


class _DtypePolicy:
    def __init__(self, policy):
        self.policy = policy

    def __enter__(self):
        self.previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.policy)
        return self

    def __exit__(self, *exc):
        keras.config.set_dtype_policy(self.previous)
        return False
