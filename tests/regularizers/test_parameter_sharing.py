import os
import tempfile

import keras
import numpy as np

from kreg.regularizers import L2
from kreg.regularizers import ParameterSharing
from kreg.regularizers import anchor_weights
from kreg.regularizers import apply_weight_decay
from kreg.regularizers import tie_weights
from kreg.testing import TestCase
from tests.regularizers.helpers import value_and_grad

BACKEND = keras.backend.backend()
W = np.array([[0.5, -2.0, 0.0], [3.0, -0.25, 1.5]], dtype="float32")
REF = np.array([[1.0, 0.0, -1.0], [2.0, 0.5, 1.5]], dtype="float32")


def tower(name):
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh", name=f"{name}_hidden"),
        keras.layers.Dense(1, name=f"{name}_out"),
    ], name=name)


def two_towers():
    """One model, two towers on two tasks (a multi-task pair)."""
    a, b = tower("a"), tower("b")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, [a(inputs), b(inputs)])
    return model, a, b


def distance(a, b):
    return np.sqrt(sum(
        np.sum((keras.ops.convert_to_numpy(va) -
                keras.ops.convert_to_numpy(vb)) ** 2)
        for va, vb in zip(a.trainable_weights, b.trainable_weights)
    ))


class ParameterSharingTest(TestCase):
    def test_value_and_gradient_against_numpy(self):
        value, grad = value_and_grad(ParameterSharing(0.7, REF), W)
        self.assertAllClose(value, 0.7 * np.sum((W - REF) ** 2), atol=1e-5)
        self.assertAllClose(grad, 2 * 0.7 * (W - REF), atol=1e-5)

    def test_zero_reference_is_keras_l2_and_twice_kreg_l2(self):
        penalty = ParameterSharing(0.3, np.zeros_like(W))
        self.assertAllClose(penalty(W), keras.regularizers.L2(0.3)(W))
        self.assertAllClose(penalty(W), L2(0.6)(W), atol=1e-6)

    def test_variable_reference_follows_the_variable(self):
        ref = keras.Variable(REF)
        penalty = ParameterSharing(1.0, ref)
        self.assertAllClose(penalty(W), np.sum((W - REF) ** 2), atol=1e-5)
        ref.assign(W)
        self.assertAllClose(penalty(W), 0.0)

    def test_array_reference_is_copied(self):
        ref = REF.copy()
        penalty = ParameterSharing(1.0, ref)
        ref[:] = 0.0
        self.assertAllClose(penalty(W), np.sum((W - REF) ** 2), atol=1e-5)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "`strength`.*strength=-1"):
            ParameterSharing(-1.0, REF)
        with self.assertRaisesRegex(TypeError, "`strength`"):
            ParameterSharing("1", REF)
        with self.assertRaisesRegex(TypeError, "`reference`"):
            ParameterSharing(1.0, "weights")
        with self.assertRaisesRegex(ValueError, "`reference`.*finite"):
            ParameterSharing(1.0, [1.0, float("nan")])
        with self.assertRaisesRegex(ValueError, r"`reference`.*\(2, 3\)"):
            ParameterSharing(1.0, np.zeros((3, 2)))(W)
        layer = keras.layers.Dense(
            2, kernel_regularizer=ParameterSharing(1.0, np.zeros((5, 2)))
        )
        with self.assertRaisesRegex(ValueError, "`reference`"):
            model = keras.Sequential([keras.Input((4,)), layer])
            keras.ops.sum(model.losses)

    def test_config_round_trip_with_array_and_variable(self):
        _, revived = self.run_config_round_trip(ParameterSharing(0.5, REF))
        self.assertAllClose(revived.reference, REF)
        # A variable reference is saved as a snapshot of its value.
        ref = keras.Variable(REF)
        config = ParameterSharing(0.5, ref).get_config()
        ref.assign(W)
        revived = ParameterSharing.from_config(config)
        self.assertAllClose(revived(W), 0.5 * np.sum((W - REF) ** 2),
                            atol=1e-5)

    def test_fine_tuning_toward_a_snapshot(self):
        x = np.random.RandomState(0).normal(size=(32, 4)).astype("float32")
        y = np.random.RandomState(1).normal(size=(32, 1)).astype("float32")
        snapshots = {}
        drift = {}
        for strength in (0.0, 10.0):
            keras.utils.set_random_seed(5)
            model = tower("net")
            snapshot = [self.to_numpy(v) for v in model.trainable_weights]
            snapshots[strength] = snapshot
            for layer in model.layers:
                layer.kernel_regularizer = None
            for variable, value in zip(model.trainable_weights, snapshot):
                variable.regularizer = ParameterSharing(strength, value)
            if strength:
                self.run_compiled_fit(
                    model, x, y, epochs=3,
                    optimizer=keras.optimizers.SGD(0.02),
                )
            else:  # the baseline needs no XLA (JAX is faster jitted)
                model.compile(optimizer=keras.optimizers.SGD(0.02),
                              loss="mse", jit_compile=BACKEND == "jax")
                model.fit(x, y, epochs=3, batch_size=8, verbose=0)
            drift[strength] = np.sqrt(sum(
                np.sum((self.to_numpy(v) - s) ** 2)
                for v, s in zip(model.trainable_weights, snapshot)
            ))
        self.assertLess(drift[10.0], 0.5 * drift[0.0])

    def test_snapshot_reference_saved_with_the_model(self):
        model = tower("net")
        hidden = model.get_layer("net_hidden")
        reference = np.random.RandomState(2).normal(
            size=tuple(hidden.kernel.shape)
        ).astype("float32")
        hidden.kernel_regularizer = ParameterSharing(2.0, reference)
        hidden.kernel.regularizer = hidden.kernel_regularizer
        x = np.ones((3, 4), "float32")
        reloaded = self.run_save_load(model, x)
        revived = reloaded.get_layer("net_hidden").kernel_regularizer
        self.assertIsInstance(revived, ParameterSharing)
        self.assertAllClose(revived.reference, reference)
        self.assertAllClose(
            keras.ops.sum(reloaded.losses),
            2.0 * np.sum((self.to_numpy(hidden.kernel) - reference) ** 2),
            rtol=1e-5,
        )


class TieWeightsTest(TestCase):
    def joint_fit(self, strength):
        keras.utils.set_random_seed(11)
        model, a, b = two_towers()
        pairs = tie_weights(a, b, strength)
        self.assertEqual(len(pairs), 4)
        start = distance(a, b)
        rng = np.random.RandomState(0)
        x = rng.normal(size=(64, 4)).astype("float32")
        y1 = np.sin(x[:, :1])
        y2 = np.sin(x[:, :1]) + 0.1 * x[:, 1:2]
        # XLA on TensorFlow is covered by the one-step test below.
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse",
                      jit_compile=BACKEND == "jax")
        model.fit(x, [y1, y2], epochs=4, batch_size=16, verbose=0)
        return start, distance(a, b), model, a, b

    def test_penalty_value_is_the_sum_over_pairs(self):
        model, a, b = two_towers()
        tie_weights(a, b, 0.25)
        expected = 0.25 * distance(a, b) ** 2
        self.assertAllClose(keras.ops.sum(model.losses), expected, rtol=1e-5)

    def test_joint_training_pulls_the_towers_together(self):
        start, strong, *_ = self.joint_fit(5.0)
        start_zero, free, *_ = self.joint_fit(0.0)
        self.assertAllClose(start, start_zero)
        self.assertLess(strong, 0.1 * start)
        self.assertGreater(free, 0.8 * start)

    def test_one_sgd_step_moves_both_sides_toward_each_other(self):
        keras.utils.set_random_seed(11)
        model, a, b = two_towers()
        tie_weights(a, b, 1.5)
        ka = a.get_layer("a_hidden").kernel
        kb = b.get_layer("b_hidden").kernel
        a0, b0 = self.to_numpy(ka), self.to_numpy(kb)
        # Zero inputs: the data loss has no gradient on the hidden kernels,
        # so one SGD step is the penalty's alone:
        # a <- a - lr * 2s (a - b),  b <- b + lr * 2s (a - b).
        x = np.zeros((8, 4), "float32")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                      jit_compile=self.jit_compile_setting())
        model.fit(x, [np.ones((8, 1))] * 2, epochs=1, batch_size=8,
                  verbose=0)
        step = 0.1 * 2 * 1.5 * (a0 - b0)
        self.assertAllClose(ka, a0 - step, atol=1e-6)
        self.assertAllClose(kb, b0 + step, atol=1e-6)

    def test_save_load_keeps_a_snapshot(self):
        model, a, b = two_towers()
        tie_weights(a, b, 1.0)
        kernel_b = b.get_layer("b_hidden").kernel
        kernel_b.assign(kernel_b + 0.5)  # make the towers differ more
        x = np.ones((2, 4), "float32")
        expected_loss = self.to_numpy(keras.ops.sum(model.losses))
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "m.keras")
            model.save(path)
            reloaded = keras.models.load_model(path)
        for got, want in zip(reloaded.predict(x, verbose=0),
                             model.predict(x, verbose=0)):
            self.assertAllClose(got, want, atol=1e-6)
        self.assertAllClose(keras.ops.sum(reloaded.losses), expected_loss,
                            rtol=1e-5)
        revived = reloaded.get_layer("a").get_layer("a_hidden")
        self.assertIsInstance(revived.kernel_regularizer, ParameterSharing)
        self.assertAllClose(revived.kernel_regularizer.reference, kernel_b)
        # The reloaded reference is a fixed snapshot, not b's live kernel.
        reloaded_b = reloaded.get_layer("b").get_layer("b_hidden").kernel
        reloaded_b.assign(reloaded_b + 1.0)
        self.assertAllClose(keras.ops.sum(reloaded.losses), expected_loss,
                            rtol=1e-5)

    def test_kernels_only_and_layer_lists(self):
        _, a, b = two_towers()
        pairs = tie_weights(a.layers, b.layers, 1.0, kernels_only=True)
        self.assertEqual([p[0].path for p in pairs],
                         [a.get_layer("a_hidden").kernel.path,
                          a.get_layer("a_out").kernel.path])
        self.assertIsNone(a.get_layer("a_hidden").bias.regularizer)

    def test_mismatch_raises(self):
        a = tower("a")
        b = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(7, name="x"),
                              keras.layers.Dense(1, name="y")])
        with self.assertRaisesRegex(ValueError, r"`model_b`.*\(4, 8\)"):
            tie_weights(a, b, 1.0)
        c = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        with self.assertRaisesRegex(ValueError, "`model_b`.*structure"):
            tie_weights(a, c, 1.0)
        with self.assertRaisesRegex(ValueError, "`model_b`.*same variable"):
            tie_weights(a, a, 1.0)
        with self.assertRaisesRegex(TypeError, "`model_a`"):
            tie_weights("a", b, 1.0)
        with self.assertRaisesRegex(ValueError, "`strength`"):
            tie_weights(a, tower("b"), -2.0)
        with self.assertRaisesRegex(ValueError, "`model_b`.*built"):
            tie_weights(a, keras.Sequential([keras.layers.Dense(2)]), 1.0)


class AnchorWeightsTest(TestCase):
    def model(self):
        keras.utils.set_random_seed(3)
        inputs = keras.Input((4,))
        h = keras.layers.Dense(8, activation="tanh", name="body")(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        out = keras.layers.Dense(2, name="head")(h)
        return keras.Model(inputs, out)

    def test_penalty_is_the_distance_to_the_values_at_the_call(self):
        model = self.model()
        w0 = {layer.name: self.to_numpy(layer.kernel)
              for layer in model.layers if hasattr(layer, "kernel")}
        got = anchor_weights(model, 0.5, exclude="head")
        self.assertEqual([v.path for v in got], [model.get_layer("body")
                                                 .kernel.path])
        self.assertAllClose(keras.ops.sum(model.losses), 0.0)
        moved = w0["body"] + 0.25
        model.get_layer("body").kernel.assign(moved)
        model.get_layer("head").kernel.assign(w0["head"] + 1.0)
        self.assertAllClose(
            keras.ops.sum(model.losses),
            0.5 * np.sum((moved - w0["body"]) ** 2), rtol=1e-5,
        )
        self.assertIsNone(model.get_layer("body").bias.regularizer)
        self.assertIsInstance(model.get_layer("body").kernel_regularizer,
                              ParameterSharing)

    def test_fine_tuning_stays_near_the_pretrained_weights(self):
        x = np.random.RandomState(0).normal(size=(32, 4)).astype("float32")
        y = np.random.RandomState(1).normal(size=(32, 2)).astype("float32")
        drift = {}
        for strength in (0.0, 10.0):
            model = self.model()
            w0 = self.to_numpy(model.get_layer("body").kernel)
            anchor_weights(model, strength)
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
            model.fit(x, y, epochs=3, batch_size=8, verbose=0)
            drift[strength] = np.linalg.norm(
                self.to_numpy(model.get_layer("body").kernel) - w0)
        self.assertGreater(drift[0.0], 0.0)
        self.assertLess(drift[10.0], 0.5 * drift[0.0])

    def test_saved_with_the_model(self):
        model = self.model()
        w0 = self.to_numpy(model.get_layer("body").kernel)
        anchor_weights(model, 2.0)
        model.get_layer("body").kernel.assign(w0 - 0.5)
        x = np.ones((3, 4), "float32")
        reloaded = self.run_save_load(model, x)
        self.assertAllClose(keras.ops.sum(reloaded.losses),
                            keras.ops.sum(model.losses), rtol=1e-5)
        self.assertGreater(float(keras.ops.sum(reloaded.losses)), 0.0)

    def test_a_built_layer_through_apply_weight_decay(self):
        dense = keras.layers.Dense(4)
        dense.build((None, 3))
        w0 = self.to_numpy(dense.kernel) + 1.0
        # Keras reads kernel_regularizer only when it creates the kernel.
        dense.kernel_regularizer = ParameterSharing(1e-2, w0)
        self.assertEqual(list(dense.losses), [])
        apply_weight_decay(dense, ParameterSharing(1e-2, w0))
        self.assertAllClose(keras.ops.sum(dense.losses),
                            1e-2 * np.sum((self.to_numpy(dense.kernel) - w0)
                                          ** 2), rtol=1e-5)

    def test_one_reference_for_kernels_of_other_shapes_raises(self):
        model = self.model()
        reference = np.zeros((4, 8), "float32")
        with self.assertRaisesRegex(ValueError, "anchor_weights.*head"):
            apply_weight_decay(model, ParameterSharing(1.0, reference))
        self.assertIsNone(model.get_layer("body").kernel.regularizer)
        got = apply_weight_decay(model, ParameterSharing(1.0, reference),
                                 include="body")
        self.assertEqual(len(got), 1)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "strength.*-1"):
            anchor_weights(self.model(), -1.0)
        with self.assertRaisesRegex(TypeError, "model"):
            anchor_weights("model", 1.0)
        with self.assertRaisesRegex(ValueError, "exclude.*nope"):
            anchor_weights(self.model(), 1.0, exclude="nope")
