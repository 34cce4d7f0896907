"""kreg's layers in the combinations of COMBINATIONS.md: inside nested,
Functional and Sequential models behind other layers, frozen, compiled,
and resumed after an interruption."""

import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized

import kreg
from kreg.testing import TestCase
from tests.callbacks.helpers import Interrupt


def _data():
    rng = np.random.RandomState(0)
    x = (rng.rand(32, 6) * 255).astype("float32")
    y = rng.randn(32, 2).astype("float32")
    return x, y


def _model(lib, structure):
    """Rescaling, then Dense -> BatchNormalization -> Dropout ->
    GaussianNoise -> Dense made of `lib`'s layers (kreg.layers or
    keras.layers): at the top, in a nested Functional model, in a
    Sequential inside a Sequential, or in a frozen nested model."""
    keras.utils.set_random_seed(7)
    layers = kreg.layers if lib == "kreg" else keras.layers

    def body(inputs):
        h = keras.layers.Dense(
            8, kernel_initializer=keras.initializers.GlorotUniform(seed=1)
        )(inputs)
        h = layers.BatchNormalization(momentum=0.8)(h)
        h = layers.Dropout(0.3, seed=3)(h)
        h = layers.GaussianNoise(0.2, seed=4)(h)
        return keras.layers.Dense(
            2, kernel_initializer=keras.initializers.GlorotUniform(seed=2)
        )(h)

    inputs = keras.Input((6,))
    scaled = keras.layers.Rescaling(1 / 255.0)(inputs)
    if structure == "top":
        return keras.Model(inputs, body(scaled))
    sub_inputs = keras.Input((6,))
    sub = keras.Model(sub_inputs, body(sub_inputs), name="sub")
    if structure == "sequential":
        return keras.Sequential([
            keras.Input((6,)), keras.layers.Rescaling(1 / 255.0),
            keras.Sequential([sub]),
        ])
    if structure == "frozen":
        sub.trainable = False
        outputs = keras.layers.Dense(2)(sub(scaled))
        return keras.Model(inputs, outputs)
    return keras.Model(inputs, sub(scaled))


class NestedLayersTest(TestCase, parameterized.TestCase):
    @parameterized.parameters(
        ("nested", True), ("sequential", False), ("frozen", False),
    )
    def test_fit_equals_the_keras_layers_in_the_same_place(self, structure,
                                                           jit):
        # The same model built of Keras's layers (same seeds: Keras's and
        # kreg's Dropout and GaussianNoise draw the same masks) is the
        # reference: weights and moving statistics.
        x, y = _data()
        results = []
        for lib in ("kreg", "keras"):
            model = _model(lib, structure)
            model.compile(keras.optimizers.SGD(0.1), "mse",
                          jit_compile=self.jit_compile_setting() if jit
                          else "auto")
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            results.append(model.get_weights())
        ours, theirs = results
        for a, b in zip(ours, theirs):
            self.assertAllClose(a, b, atol=2e-6, rtol=1e-5)
        if structure == "frozen":
            # A frozen sub-model keeps its weights and statistics.
            initial = _model("keras", structure).get_weights()
            for a, b in zip(ours[:6], initial[:6]):
                self.assertAllEqual(a, b)


class FrozenWeightNoiseTest(TestCase):
    def test_frozen_weight_noise_trains_as_the_frozen_layer(self):
        # A frozen WeightNoise layer (fine-tuning: its kernel is not
        # trained) runs as the layer it wraps, like a frozen Keras
        # layer in inference mode; the rest trains as without the wrapper.
        x, y = _data()
        x = x / 255.0
        weights = []
        for wrap in (True, False):
            keras.utils.set_random_seed(1)
            dense = keras.layers.Dense(
                4, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
            first = kreg.layers.WeightNoise(dense, 0.5, seed=2) if wrap \
                else dense
            model = keras.Sequential([
                keras.Input((6,)), first,
                keras.layers.Dense(2, kernel_initializer="ones")])
            first.trainable = False
            model.compile(keras.optimizers.SGD(0.1), "mse",
                          jit_compile=self.jit_compile_setting())
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            weights.append(model.get_weights())
        for a, b in zip(*weights):
            self.assertAllClose(a, b, atol=1e-6)


class NoiseResumeTest(TestCase):
    def test_resumed_in_a_fresh_model_equals_an_uninterrupted_run(self):
        # Killed after epoch 2 and resumed by a new process (a new model)
        # from kreg's BackupAndRestore: the seeded noise streams (Dropout,
        # GaussianNoise, WeightNoise), the weights, Adam's state under a
        # schedule with a ClippedOptimizer and its counters, and the logged
        # grad_norm are those of an uninterrupted run, bit for bit.
        rng = np.random.RandomState(0)
        x = rng.randn(32, 4).astype("float32")
        y = rng.randn(32, 2).astype("float32")

        def model():
            keras.utils.set_random_seed(1)
            m = keras.Sequential([
                keras.Input((4,)),
                kreg.layers.GaussianNoise(0.3, seed=2),
                kreg.layers.WeightNoise(
                    keras.layers.Dense(8, activation="tanh"), 0.1, seed=3),
                kreg.layers.Dropout(0.4, seed=4),
                keras.layers.Dense(2),
            ])
            m.compile(kreg.optimizers.ClippedOptimizer(
                keras.optimizers.Adam(
                    keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)),
                clipnorm=0.2), "mse")
            return m

        def fit(m, callbacks):
            return m.fit(x, y, batch_size=8, epochs=3, shuffle=False,
                         verbose=0, callbacks=[
                             kreg.callbacks.GradientMonitor(), *callbacks])

        reference = model()
        logs = fit(reference, []).history
        with tempfile.TemporaryDirectory() as folder:
            backup = os.path.join(folder, "backup")
            with self.assertRaisesRegex(RuntimeError, "interrupted"):
                fit(model(),
                    [Interrupt(2), kreg.callbacks.BackupAndRestore(backup)])
            resumed = model()
            resumed_logs = fit(
                resumed, [kreg.callbacks.BackupAndRestore(backup)]).history
            self.assertFalse(os.path.exists(backup))
        for a, b in zip(resumed.variables, reference.variables):
            self.assertAllEqual(a, b)  # seed states included
        for a, b in zip(resumed.optimizer.variables,
                        reference.optimizer.variables):
            self.assertAllEqual(a, b)
        self.assertGreater(int(self.to_numpy(
            reference.optimizer.clipped_steps)), 0)
        self.assertEqual(resumed_logs["grad_norm"], logs["grad_norm"][2:])
        self.assertEqual(resumed_logs["clipped_steps"],
                         logs["clipped_steps"][2:])
