import os
import tempfile
import warnings

import keras
import numpy as np

from kreg.regularizers import L1
from kreg.regularizers import L2
from kreg.regularizers import apply_weight_decay
from kreg.testing import TestCase


def make_model():
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Activation("relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(5, activation="relu", name="hidden"),
        keras.layers.Dense(2, name="head"),
    ], name="net")


def data(n=32):
    rng = np.random.RandomState(0)
    x = rng.normal(size=(n, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


def kernels(model, names=("conv", "hidden", "head")):
    return [model.get_layer(n).kernel for n in names]


def baseline_jit(compiled, test):
    """XLA for the run under test; the baseline skips it where that is
    cheaper (TensorFlow: XLA compile time; JAX is faster jitted)."""
    if compiled or keras.backend.backend() == "jax":
        return test.jit_compile_setting()
    return False


def hand_l2(variables, a):
    return sum(a * 0.5 * np.sum(np.square(keras.ops.convert_to_numpy(v)))
               for v in variables)


class ApplyWeightDecayTest(TestCase):
    def test_exactly_the_kernels_are_penalized(self):
        model = make_model()
        penalized = apply_weight_decay(model, L2(0.1))
        expected = kernels(model)
        self.assertEqual(
            sorted(v.path for v in penalized),
            sorted(v.path for v in expected),
        )
        for variable in model.weights:
            if any(variable is k for k in expected):
                self.assertIsInstance(variable.regularizer, L2)
            else:  # biases, gamma, beta, moving statistics
                self.assertIsNone(variable.regularizer, variable.path)
        self.assertEqual(len(model.losses), 3)
        self.assertAllClose(
            keras.ops.sum(model.losses), hand_l2(expected, 0.1), atol=1e-5
        )

    def test_float_means_kreg_l2(self):
        model = make_model()
        apply_weight_decay(model, 0.2)
        self.assertAllClose(
            keras.ops.sum(model.losses), hand_l2(kernels(model), 0.2),
            atol=1e-5,
        )

    def test_include_and_exclude(self):
        model = make_model()
        got = apply_weight_decay(model, L2(0.1), include=keras.layers.Dense,
                                 exclude="he*")
        self.assertEqual([v.path for v in got],
                         [model.get_layer("hidden").kernel.path])
        model = make_model()
        got = apply_weight_decay(model, L2(0.1), include=["conv", "head"])
        self.assertEqual(len(got), 2)
        model = make_model()
        got = apply_weight_decay(model, L2(0.1), include="net",
                                 exclude=[keras.layers.Conv2D])
        self.assertEqual(len(got), 2)

    def test_nested_model_selected_by_name(self):
        inner = make_model()
        inputs = keras.Input((6, 6, 2))
        outputs = keras.layers.Dense(1, name="top")(inner(inputs))
        outer = keras.Model(inputs, outputs)
        got = apply_weight_decay(outer, L2(0.1), include="net")
        self.assertEqual(len(got), 3)
        got = apply_weight_decay(outer, L1(0.1), exclude="net")
        self.assertEqual([v.path for v in got],
                         [outer.get_layer("top").kernel.path])

    def test_overwrite_false_keeps_existing(self):
        model = make_model()
        apply_weight_decay(model, L1(0.3), include="head")
        got = apply_weight_decay(model, L2(0.1), overwrite=False)
        self.assertEqual(len(got), 2)
        self.assertIsInstance(model.get_layer("head").kernel.regularizer, L1)

    def test_survives_save_and_load(self):
        model = make_model()
        x, _ = data(4)
        model(x)
        apply_weight_decay(model, L2(0.05))
        reloaded = self.run_save_load(model, x, atol=1e-5)
        self.assertAllClose(
            keras.ops.sum(reloaded.losses), keras.ops.sum(model.losses),
            atol=1e-6,
        )
        self.assertIsInstance(
            reloaded.get_layer("conv").kernel_regularizer, L2
        )
        self.assertIsNone(reloaded.get_layer("conv").bias_regularizer)

    def test_applied_to_a_loaded_pretrained_model(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "pretrained.keras")
            make_model().save(path)
            model = keras.models.load_model(path)
        apply_weight_decay(model, L2(0.1))
        self.assertAllClose(
            keras.ops.sum(model.losses), hand_l2(kernels(model), 0.1),
            atol=1e-5,
        )

    def test_training_shrinks_kernels_and_the_loss_includes_the_penalty(self):
        x, y = data()
        norms = {}
        for decay in (0.0, 1.0):
            keras.utils.set_random_seed(3)
            model = make_model()
            # A fit before the penalty: the cached train step must be reset.
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse",
                          jit_compile=baseline_jit(decay, self))
            model.fit(x, y, epochs=1, batch_size=16, verbose=0)
            if decay:
                apply_weight_decay(model, L2(decay))
                penalty = hand_l2(kernels(model), decay)
                loss = model.evaluate(x, y, verbose=0, batch_size=32)
                mse = np.mean(
                    (self.to_numpy(model.predict(x, verbose=0)) - y) ** 2
                )
                self.assertAllClose(loss, mse + penalty, atol=1e-4)
            model.fit(x, y, epochs=3, batch_size=16, verbose=0)
            norms[decay] = np.sqrt(sum(
                np.sum(self.to_numpy(k) ** 2) for k in kernels(model)
            ))
        self.assertLess(norms[1.0], 0.9 * norms[0.0])

    def test_bad_arguments(self):
        model = make_model()
        with self.assertRaisesRegex(TypeError, "`regularizer`"):
            apply_weight_decay(model, "l2")
        with self.assertRaisesRegex(
                ValueError, "`regularizer`.*Received: regularizer=-1.0"):
            apply_weight_decay(model, -1.0)
        with self.assertRaisesRegex(TypeError, "`include`.*include=3"):
            apply_weight_decay(model, 0.1, include=3)
        with self.assertRaisesRegex(TypeError, "`exclude`"):
            apply_weight_decay(model, 0.1, exclude=[None])
        with self.assertRaisesRegex(TypeError, "`overwrite`"):
            apply_weight_decay(model, 0.1, overwrite="yes")
        with self.assertRaisesRegex(TypeError, "`model`"):
            apply_weight_decay([model], 0.1)
        with self.assertRaisesRegex(ValueError, "`model`.*built"):
            apply_weight_decay(
                keras.Sequential([keras.layers.Dense(2)]), 0.1
            )

    def test_unsaved_penalty_warns(self):
        class Custom(keras.layers.Layer):
            def build(self, input_shape):
                self.kernel = self.add_weight(
                    shape=(input_shape[-1], 2), name="kernel"
                )

            def call(self, x):
                return x @ self.kernel

        inputs = keras.Input((3,))
        model = keras.Model(inputs, Custom()(inputs))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = apply_weight_decay(model, L2(0.1))
        self.assertEqual(len(got), 1)
        self.assertTrue(any("not survive" in str(w.message) for w in caught))


class SelectorMatchesNothingTest(TestCase):
    def test_a_pattern_that_matches_nothing_raises_naming_it(self):
        for name in ("include", "exclude"):
            with self.assertRaisesRegex(
                    ValueError, rf"`{name}`: 'typo\*' matches no layer.*"
                    r"layer names.*'hidden'"):
                apply_weight_decay(make_model(), 0.1, **{name: "typo*"})
            with self.assertRaisesRegex(
                    ValueError, rf"`{name}`: 'typo' matches no layer"):
                apply_weight_decay(make_model(), 0.1,
                                   **{name: ["hidden", "typo"]})
            with self.assertRaisesRegex(
                    ValueError, rf"`{name}`: 'Dense' .*class name.*"
                    rf"{name}=keras.layers.Dense"):
                apply_weight_decay(make_model(), 0.1, **{name: "Dense"})
            with self.assertRaisesRegex(ValueError, rf"`{name}`.*LSTM"):
                apply_weight_decay(make_model(), 0.1,
                                   **{name: keras.layers.LSTM})

    def test_nothing_is_penalized_when_it_raises(self):
        model = make_model()
        with self.assertRaises(ValueError):
            apply_weight_decay(model, 0.1, include=["hidden", "typo"])
        self.assertEqual(model.losses, [])

    def test_the_result_shows_paths_not_values(self):
        model = make_model()
        got = apply_weight_decay(model, 0.1, include="h*")
        self.assertIsInstance(got, list)
        self.assertEqual(
            repr(got),
            f"PenalizedVariables([{got[0].path}, {got[1].path}])")
        deep = keras.Sequential(
            [keras.Input((2,))] + [keras.layers.Dense(2) for _ in range(20)])
        shown = repr(apply_weight_decay(deep, 0.1))
        self.assertIn("... (20 variables)", shown)
        self.assertLess(len(shown), 400)
