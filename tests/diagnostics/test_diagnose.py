import unittest

import keras
import numpy as np

import kreg
from kreg.testing import TestCase

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n=64, d=8, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    return x, rng.randint(0, classes, size=n)


def dense(units, name=None, **kwargs):
    return keras.layers.Dense(units, name=name, **kwargs)


def sequential(layers, d=8):
    return keras.Sequential([keras.Input((d,))] + layers)


def kinds(report, kind):
    return {p.layer for p in report.problems if p.kind == kind}


def variables(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]


class HealthyNetworksTest(TestCase):
    def test_default_mlp_has_no_problems(self):
        x, y = data()
        model = sequential([dense(32, activation="relu"),
                            dense(32, activation="tanh"),
                            dense(32, activation="sigmoid"),
                            dense(3, activation="softmax")])
        report = kreg.diagnose(model, x, y,
                               loss="sparse_categorical_crossentropy")
        self.assertEqual(report.problems, [])
        self.assertIn("No problems found", str(report))

    def test_default_cnn_has_no_problems(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(32, 12, 12, 2)).astype("float32")
        y = rng.randint(0, 3, size=32)
        model = keras.Sequential([
            keras.Input((12, 12, 2)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            dense(3)])
        report = kreg.diagnose(model, x, y, loss=LOSS)
        self.assertEqual(report.problems, [])
        self.assertEqual(len(report.layers), 7)

    @unittest.skipUnless(keras.backend.backend() == "tensorflow",
                         "one backend: a MobileNetV2 costs seconds")
    def test_mobilenet_v2_has_no_problems(self):
        model = keras.applications.MobileNetV2(
            weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)
        rng = np.random.RandomState(0)
        x = rng.normal(size=(16, 32, 32, 3)).astype("float32")
        y = rng.randint(0, 10, size=16)
        report = kreg.diagnose(model, x, y,
                               loss="sparse_categorical_crossentropy")
        self.assertEqual(report.problems, [])
        self.assertTrue(all(row["checked"] for row in report.layers.values()))


class PlantedProblemsTest(TestCase):
    def test_inputs_not_standardized(self):
        x, y = data()
        model = sequential([dense(16, activation="relu"), dense(3)])
        self.assertEqual(kinds(kreg.diagnose(model, x), "inputs_not_"
                               "standardized"), set())
        report = kreg.diagnose(model, 4 * x + 8)
        self.assertEqual(kinds(report, "inputs_not_standardized"), {None})

    def test_inputs_measured_after_normalization(self):
        x, _ = data()
        raw = 4 * x + 8
        norm = keras.layers.Normalization()
        norm.adapt(raw)
        model = sequential([norm, dense(16, activation="relu"), dense(3)])
        report = kreg.diagnose(model, raw)
        self.assertEqual(kinds(report, "inputs_not_standardized"), set())
        self.assertEqual(report.inputs[0]["measured_at"], norm.name)

    def test_saturated_layer(self):
        x, y = data()
        big = keras.initializers.RandomNormal(stddev=5.0, seed=1)
        model = sequential([dense(32, "a", activation="relu"),
                            dense(32, "sat", activation="sigmoid",
                                  kernel_initializer=big),
                            dense(16, "b", activation="tanh"), dense(3)])
        self.assertEqual(kinds(kreg.diagnose(model, x), "saturated"),
                         {"sat"})

    def test_dead_units(self):
        x, y = data()
        model = sequential([
            dense(32, "a", activation="relu"),
            dense(32, "dead", activation="relu",
                  bias_initializer=keras.initializers.Constant(-10.0)),
            dense(3)])
        report = kreg.diagnose(model, x)
        self.assertEqual(kinds(report, "dead_units"), {"dead"})
        self.assertEqual(report.layers["dead"]["dead"], 1.0)

    def test_near_linear(self):
        x, y = data()
        tiny = keras.initializers.RandomNormal(stddev=1e-3, seed=1)
        model = sequential([dense(32, "a", activation="relu"),
                            dense(32, "lin", activation="tanh",
                                  kernel_initializer=tiny),
                            dense(3)])
        self.assertEqual(kinds(kreg.diagnose(model, x), "near_linear"),
                         {"lin"})

    def test_duplicate_units_in_hidden_layers_only(self):
        x, y = data()
        same = keras.initializers.Constant(0.1)
        model = sequential([dense(16, "a", activation="relu"),
                            dense(16, "dup", activation="relu",
                                  kernel_initializer=same),
                            dense(3, "out", kernel_initializer="zeros")])
        report = kreg.diagnose(model, x)
        self.assertEqual(kinds(report, "duplicate_units"), {"dup"})
        self.assertEqual(report.layers["dup"]["duplicates"], 16)
        self.assertEqual(report.layers["a"]["duplicates"], 0)

    def test_vanishing_gradient(self):
        x, y = data()
        small = keras.initializers.RandomNormal(stddev=0.01, seed=1)
        layers = [dense(32, f"s{i}", activation="sigmoid",
                        kernel_initializer=small) for i in range(8)]
        model = sequential(layers + [dense(3, "out")])
        report = kreg.diagnose(model, x, y, loss=LOSS)
        self.assertIn("s0", kinds(report, "vanishing_gradient"))
        self.assertNotIn("out", kinds(report, "vanishing_gradient"))
        self.assertEqual(kinds(kreg.diagnose(model, x), "vanishing_gradient"),
                         set())  # no y: no backward pass

    def test_exploding_gradient(self):
        x, y = data()
        layers = [dense(32, f"r{i}", activation="relu",
                        kernel_initializer=keras.initializers.VarianceScaling(
                            25.0, seed=i)) for i in range(8)]
        model = sequential(layers + [dense(3, "out")])
        report = kreg.diagnose(model, x, y, loss=LOSS)
        exploding = kinds(report, "exploding_gradient")
        norms = {name: row["grad_norm"] for name, row in report.layers.items()}
        self.assertEqual(exploding, {n for n, v in norms.items() if v > 1e3})
        self.assertIn(max(norms, key=norms.get), exploding)

    def test_conv_dead_units(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
        model = keras.Sequential([
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="c1", activation="relu"),
            keras.layers.Conv2D(
                4, 3, name="c2",
                bias_initializer=keras.initializers.Constant(-20.0)),
            keras.layers.ReLU(name="relu"),
            keras.layers.GlobalAveragePooling2D(), dense(2)])
        self.assertEqual(kinds(kreg.diagnose(model, x), "dead_units"),
                         {"relu"})

    def test_nested_models(self):
        x, y = data()
        dead = keras.initializers.Constant(-10.0)
        inner = keras.Sequential([keras.Input((16,)),
                                  dense(16, "inner_a", activation="relu"),
                                  dense(16, "inner_dead", activation="relu",
                                        bias_initializer=dead)],
                                 name="inner")
        inputs = keras.Input((8,))
        hidden = dense(16, "pre", activation="relu")(inputs)
        functional = keras.Model(inputs, inner(hidden), name="functional")
        outer = keras.Sequential([keras.Input((8,)), functional,
                                  dense(3, "out")])
        report = kreg.diagnose(outer, x, y, loss=LOSS)
        self.assertEqual(kinds(report, "dead_units"), {"inner_dead"})
        self.assertEqual(list(report.layers),
                         ["pre", "inner_a", "inner_dead", "out"])
        self.assertTrue(all(r["checked"] for r in report.layers.values()))


class MeasurementsTest(TestCase):
    def test_statistics_against_numpy(self):
        x, y = data()
        model = sequential([dense(16, "h", activation="relu"),
                            dense(3, "out")])
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
        report = kreg.diagnose(model, x, y)  # the compiled loss
        kernel, bias = (keras.ops.convert_to_numpy(v)
                        for v in model.layers[0].weights)
        h = np.maximum(x.astype("float64") @ kernel + bias, 0)
        row = report.layers["h"]
        self.assertAlmostEqual(row["mean"], h.mean(), places=5)
        self.assertAlmostEqual(row["std"], h.std(), places=5)
        self.assertEqual(row["dead"], np.mean(h.max(axis=0) <= 0))
        np.testing.assert_allclose(report.inputs[0]["mean"], x.mean(0),
                                   atol=1e-6)
        self.assertAlmostEqual(report.loss, model.evaluate(x, y, verbose=0),
                               places=4)
        # One SGD step with learning rate 1 moves the weights by -gradient.
        before = [keras.ops.convert_to_numpy(v) for v in model.weights]
        model.train_on_batch(x, y)
        after = [keras.ops.convert_to_numpy(v) for v in model.weights]
        step = [b - a for b, a in zip(before, after)]
        for name, pair in (("h", step[:2]), ("out", step[2:])):
            expected = np.sqrt(sum(np.sum(g.astype("float64") ** 2)
                                   for g in pair))
            self.assertAlmostEqual(report.layers[name]["grad_norm"],
                                   expected, delta=1e-4 * expected)

    def test_changes_nothing(self):
        x, y = data()
        model = sequential([dense(16, activation="relu"),
                            keras.layers.BatchNormalization(),
                            keras.layers.Dropout(0.5, seed=1),
                            dense(3, kernel_regularizer="l2")])
        model.compile(optimizer="adam", loss=LOSS)
        model.fit(x, y, epochs=1, verbose=0)
        before = variables(model)
        for _ in range(2):  # eager, then compiled on TensorFlow
            kreg.diagnose(model, x + 1.0, y)
        after = variables(model)
        self.assertEqual(len(before), len(after))
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)

    def test_second_call_sees_new_weights(self):
        x, y = data()
        model = sequential([dense(16, "h", activation="relu"), dense(3)])
        first = kreg.diagnose(model, x, y, loss=LOSS)
        model.layers[0].bias.assign(np.full(16, -100.0, "float32"))
        for _ in range(2):
            report = kreg.diagnose(model, x, y, loss=LOSS)
            self.assertEqual(kinds(report, "dead_units"), {"h"})
        self.assertEqual(kinds(first, "dead_units"), set())

    def test_subclassed_model_is_not_checked(self):
        class Net(keras.Model):
            def __init__(self):
                super().__init__()
                self.a = dense(8, "a", activation="relu")
                self.b = dense(3, "b")

            def call(self, x):
                return self.b(self.a(x))

        x, y = data()
        model = Net()
        model(x)
        report = kreg.diagnose(model, x, y, loss=LOSS)
        self.assertEqual([r["checked"] for r in report.layers.values()],
                         [False, False])
        self.assertGreater(report.layers["a"]["grad_norm"], 0)
        self.assertIn("not checked", str(report))


class BadInputTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = data()
        self.model = sequential([dense(4), dense(3)])

    def check(self, argument, error=ValueError, **kwargs):
        arguments = {"model": self.model, "x": self.x, **kwargs}
        with self.assertRaisesRegex(error, f"`{argument}`"):
            kreg.diagnose(**arguments)

    def test_bad_arguments(self):
        self.check("x", x=self.x[:, :5])
        self.check("x", x=[self.x, self.x])
        self.check("x", TypeError, x=3.0)
        self.check("loss", y=self.y)
        self.check("y", loss=LOSS)
        self.check("y", y=self.y[:10], loss=LOSS)
        self.check("batch_size", batch_size=0)
        self.check("batch_size", TypeError, batch_size=2.5)
        self.check("loss", y=self.y, loss="no_such_loss")
        self.check("model", TypeError, model=dense(3))
        self.check("model", model=keras.Sequential([dense(3)]))
