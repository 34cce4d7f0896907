import keras
import numpy as np

import kreg
from kreg.models import pretrain_layerwise
from kreg.testing import TestCase


def low_rank_data(n=512, dim=20, rank=3, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim))
            ).astype("float32")


def sequential():
    return keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(16, activation="relu", name="first"),
        kreg.layers.BatchNormalization(name="norm"),
        keras.layers.Dense(8, activation="relu", name="second"),
        keras.layers.Dense(3, name="head"),
    ])


class PretrainLayerwiseTest(TestCase):
    def test_only_the_chosen_dense_layers_change(self):
        model = sequential()
        before = {layer.name: [self.to_numpy(w) for w in layer.weights]
                  for layer in model.layers}
        histories = pretrain_layerwise(model, low_rank_data(), epochs=3,
                                       verbose=0, seed=1)
        self.assertEqual(list(histories), ["first", "second"])
        for name in ("first", "second"):
            for old, new in zip(before[name], model.get_layer(name).weights):
                self.assertFalse(np.allclose(old, self.to_numpy(new)), name)
        for name in ("norm", "head"):
            for old, new in zip(before[name], model.get_layer(name).weights):
                self.assertAllEqual(new, old)
        self.assertTrue(all(layer.trainable for layer in model.layers))

    def test_each_autoencoder_learns_to_reconstruct(self):
        # Data of rank 3 in 20 dimensions: a 16-unit code reconstructs it.
        x = low_rank_data()
        histories = pretrain_layerwise(
            sequential(), x, layers=["first"], epochs=30, corruption=0.0,
            verbose=0, seed=0)
        loss = histories["first"].history["loss"]
        self.assertLess(loss[-1], 0.1 * float(np.mean(x ** 2)))
        self.assertLess(loss[-1], loss[0])

    def test_functional_model_and_supervised_training_after(self):
        inputs = keras.Input((20,))
        hidden = keras.layers.Dense(12, activation="relu")(inputs)
        outputs = keras.layers.Dense(2)(hidden)
        model = keras.Model(inputs, outputs)
        pretrain_layerwise(model, low_rank_data(), epochs=1, verbose=0)
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        history = model.fit(low_rank_data()[:64], np.arange(64) % 2,
                            epochs=1, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][0]))

    def test_bad_arguments(self):
        model = sequential()
        x = low_rank_data(64)
        cases = [
            (dict(epochs=0), "epochs=0"),
            (dict(batch_size=-1), "batch_size=-1"),
            (dict(corruption=1.0), "corruption=1.0"),
            (dict(layers=["norm"]), "'norm'"),
            (dict(layers=["nope"]), "'nope'"),
            (dict(layers=[]), "layers=[]"),
        ]
        for kwargs, text in cases:
            with self.assertRaises(ValueError, msg=str(kwargs)) as context:
                pretrain_layerwise(model, x, verbose=0, **kwargs)
            self.assertIn(text, str(context.exception))
        with self.assertRaisesRegex(TypeError, "epochs=1.5"):
            pretrain_layerwise(model, x, epochs=1.5, verbose=0)
        with self.assertRaisesRegex(ValueError, "built"):
            pretrain_layerwise(keras.Sequential([keras.layers.Dense(2)]), x)
        inputs = keras.Input((20,))
        a = keras.layers.Dense(4)(inputs)
        b = keras.layers.Dense(4)(inputs)
        branched = keras.Model(inputs, keras.layers.Add()([a, b]))
        with self.assertRaisesRegex(ValueError, "chain"):
            pretrain_layerwise(branched, x, verbose=0)
        self.assertEqual(len(pretrain_layerwise(
            model, x, epochs=np.int64(1), verbose=0)), 2)


N = 64  # samples in the reference comparisons: one full batch per epoch


def relu(v):
    return np.maximum(v, 0.0)


ACTIVATIONS = {
    "relu": (relu, lambda z: (z > 0).astype(z.dtype)),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
}


def reference_autoencoder(encoder, initial, features, seed, epochs):
    """An autoencoder trained by hand in NumPy on `features` (no masking
    noise, one full batch per epoch): the encoder Dense at its `initial`
    weights, a linear decoder drawn from GlorotUniform(seed) with zero bias,
    the mean squared error and Adam with Keras's defaults. Returns the
    encoder's weights after training and the loss per epoch."""
    activation, derivative = ACTIVATIONS[encoder.activation.__name__]
    x = features.astype("float64").reshape(-1, features.shape[-1])
    decoder = keras.initializers.GlorotUniform(seed)(
        (initial[0].shape[1], x.shape[1]))
    params = [p.astype("float64") for p in initial] + [
        keras.ops.convert_to_numpy(decoder).astype("float64"),
        np.zeros(x.shape[1])]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    losses = []
    for step in range(1, epochs + 1):
        w1, b1, w2, b2 = params
        z = x @ w1 + b1
        h = activation(z)
        error = h @ w2 + b2 - x
        losses.append(np.mean(error ** 2))
        d_out = 2 * error / error.size
        d_z = (d_out @ w2.T) * derivative(z)
        grads = [x.T @ d_z, d_z.sum(0), h.T @ d_out, d_out.sum(0)]
        rate = 1e-3 * np.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step)
        for p, g, m, v in zip(params, grads, moments, squares):
            m += 0.1 * (g - m)
            v += 0.001 * (g ** 2 - v)
            p -= rate * m / (np.sqrt(v) + 1e-7)
    return params[:2], losses


class ReferenceTestCase(TestCase):
    def assert_trained_like_reference(self, layer, initial, features, seed,
                                      history, epochs=2):
        weights, losses = reference_autoencoder(layer, initial, features,
                                                seed, epochs)
        self.assertAllClose(history.history["loss"], losses, rtol=1e-4)
        for got, want in zip(layer.get_weights(), weights):
            self.assertAllClose(got, want, rtol=1e-3, atol=1e-5)


class TrueInputTest(ReferenceTestCase):
    """Each chosen layer reconstructs its own input (the output of every
    layer before it, at the current weights), compared with an autoencoder
    trained by hand on that input computed independently."""

    def test_rescaling_first_and_the_next_layer_on_pretrained_features(self):
        x = low_rank_data(N)
        model = keras.Sequential([
            keras.Input((20,)), keras.layers.Rescaling(100.0),
            keras.layers.Dense(16, activation="relu", name="d1"),
            keras.layers.Dense(8, activation="relu", name="d2"),
            keras.layers.Dense(3, name="head")])
        before = {layer.name: layer.get_weights() for layer in model.layers}
        histories = pretrain_layerwise(model, x, epochs=2, corruption=0.0,
                                       batch_size=N, seed=5, verbose=0)
        # d1 reconstructs 100 * x: an error of the order of its square.
        self.assertGreater(histories["d1"].history["loss"][0],
                           0.1 * float(np.mean((100 * x) ** 2)))
        self.assert_trained_like_reference(
            model.get_layer("d1"), before["d1"], 100 * x, 6, histories["d1"])
        # d2 reconstructs the output of d1 at its pretrained weights.
        kernel, bias = model.get_layer("d1").get_weights()
        self.assert_trained_like_reference(
            model.get_layer("d2"), before["d2"], relu(100 * x @ kernel + bias),
            7, histories["d2"])

    def test_a_later_layer_alone_learns_from_the_layers_before_it(self):
        x = low_rank_data(N)
        model = keras.Sequential([
            keras.Input((20,)),
            keras.layers.Dense(12, activation="relu", name="d1"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Dense(8, activation="relu", name="d2"),
            keras.layers.Dense(3, name="head")])
        before = {layer.name: layer.get_weights() for layer in model.layers}
        histories = pretrain_layerwise(model, x, layers=["d2"], epochs=2,
                                       corruption=0.0, batch_size=N, seed=2,
                                       verbose=0)
        self.assertEqual(list(histories), ["d2"])
        kernel, bias = before["d1"]
        gamma, beta, mean, variance = before["norm"]
        h = (relu(x @ kernel + bias) - mean) / np.sqrt(variance + 1e-3)
        self.assert_trained_like_reference(
            model.get_layer("d2"), before["d2"], gamma * h + beta, 3,
            histories["d2"])
        for name in ("d1", "norm", "head"):
            for old, new in zip(before[name],
                                model.get_layer(name).get_weights()):
                self.assertAllEqual(new, old, msg=name)

    def test_dense_on_a_sequence_then_flatten(self):
        # A Dense on each position of a sequence (the decoder acts on the
        # last axis), then Flatten, then a Dense on the flat features.
        x = low_rank_data(N).reshape(N, 4, 5)
        model = keras.Sequential([
            keras.Input((4, 5)),
            keras.layers.Dense(6, activation="tanh", name="per_step"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(2)])
        before = {layer.name: layer.get_weights() for layer in model.layers}
        histories = pretrain_layerwise(model, x, epochs=2, corruption=0.0,
                                       batch_size=N, seed=0, verbose=0)
        self.assert_trained_like_reference(
            model.get_layer("per_step"), before["per_step"], x, 1,
            histories["per_step"])
        kernel, bias = model.get_layer("per_step").get_weights()
        self.assert_trained_like_reference(
            model.get_layer("hidden"), before["hidden"],
            np.tanh(x @ kernel + bias).reshape(N, 24), 2,
            histories["hidden"])

    def test_nested_base_as_in_the_transfer_architecture(self):
        # README's transfer model: a base model used as a layer, a new head.
        x = low_rank_data(N)
        base = keras.Sequential([
            keras.Input((20,)),
            keras.layers.Dense(12, activation="relu", name="b1"),
            keras.layers.Dense(8, activation="relu", name="b2")],
            name="base")
        model = keras.Sequential([keras.Input((20,)), base,
                                  keras.layers.Dense(3, name="head")])
        before = {layer.name: layer.get_weights() for layer in base.layers}
        head = model.get_layer("head").get_weights()
        histories = pretrain_layerwise(model, x, epochs=2, corruption=0.0,
                                       batch_size=N, seed=10, verbose=0)
        self.assertEqual(list(histories), ["b1", "b2"])
        b1 = base.get_layer("b1")
        self.assert_trained_like_reference(b1, before["b1"], x, 11,
                                           histories["b1"])
        kernel, bias = b1.get_weights()
        self.assert_trained_like_reference(
            base.get_layer("b2"), before["b2"], relu(x @ kernel + bias), 12,
            histories["b2"])
        for old, new in zip(head, model.get_layer("head").get_weights()):
            self.assertAllEqual(new, old)
        # The autoencoders called its layers in graphs of their own: the
        # model still saves and loads.
        self.run_save_load(model, x)

    def test_functional_model_with_a_functional_base(self):
        x = low_rank_data(N)
        inputs = keras.Input((20,))
        features = keras.layers.Dense(6, activation="relu",
                                      name="f1")(inputs)
        base = keras.Model(inputs, features, name="fbase")
        outer = keras.Input((20,))
        hidden = keras.layers.Dense(4, activation="relu", name="f2")(
            base(keras.layers.Rescaling(0.5)(outer)))
        model = keras.Model(outer, keras.layers.Dense(2)(hidden))
        kernel, bias = base.get_layer("f1").get_weights()
        initial = model.get_layer("f2").get_weights()
        histories = pretrain_layerwise(model, x, layers=["f2"], epochs=2,
                                       corruption=0.0, batch_size=N, seed=0,
                                       verbose=0)
        self.assert_trained_like_reference(
            model.get_layer("f2"), initial, relu(0.5 * x @ kernel + bias), 1,
            histories["f2"])

    def test_convolutional_network(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(N, 6, 6, 1)).astype("float32")
        model = keras.Sequential([
            keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="head")])
        # The reference features: a plain Keras model of the conv layer.
        conv = model.get_layer("conv").get_weights()
        alone = keras.Sequential([keras.Input((6, 6, 1)),
                                  keras.layers.Conv2D(2, 3)])
        alone.set_weights(conv)
        features = alone.predict(x, verbose=0).reshape(N, -1)
        initial = model.get_layer("hidden").get_weights()
        histories = pretrain_layerwise(model, x, epochs=2, corruption=0.0,
                                       batch_size=N, seed=0, verbose=0)
        self.assert_trained_like_reference(
            model.get_layer("hidden"), initial, features, 1,
            histories["hidden"])
        for old, new in zip(conv, model.get_layer("conv").get_weights()):
            self.assertAllEqual(new, old)
        with self.assertRaisesRegex(ValueError, "`layers`.*'conv'"):
            pretrain_layerwise(model, x, layers=["conv"], verbose=0)
        only_head = keras.Sequential([
            keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3),
            keras.layers.Flatten(), keras.layers.Dense(3)])
        with self.assertRaisesRegex(ValueError, "no Dense layer"):
            pretrain_layerwise(only_head, x, verbose=0)

    def test_models_that_are_not_a_chain_are_refused_before_training(self):
        x = low_rank_data(N)
        first, second = keras.Input((20,)), keras.Input((5,))
        joined = keras.layers.Concatenate(name="join")([first, second])
        hidden = keras.layers.Dense(4, name="hidden")(joined)
        two_inputs = keras.Model([first, second],
                                 keras.layers.Dense(2)(hidden))
        inputs = keras.Input((20,))
        shared = keras.layers.Dense(20, name="shared")
        twice = keras.Model(
            inputs, keras.layers.Dense(2)(
                keras.layers.Dense(4, name="hidden")(shared(shared(inputs)))))
        cases = ((two_inputs, [x, x[:, :5]], "`model`.*2 inputs"),
                 (twice, x, "`model`.*chain"))
        for model, data, text in cases:
            before = model.get_weights()
            with self.assertRaisesRegex(ValueError, text):
                pretrain_layerwise(model, data, verbose=0)
            for old, new in zip(before, model.get_weights()):
                self.assertAllEqual(new, old)

    def test_a_branched_nested_base_is_one_step(self):
        x = low_rank_data(N)
        inputs = keras.Input((20,))
        branches = [keras.layers.Dense(6, name=f"inner{i}")(inputs)
                    for i in range(2)]
        base = keras.Model(inputs, keras.layers.Add()(branches), name="base")
        model = keras.Sequential([
            keras.Input((20,)), base,
            keras.layers.Dense(4, activation="relu", name="hidden"),
            keras.layers.Dense(2)])
        with self.assertRaisesRegex(ValueError, "`layers`.*'inner0'"):
            pretrain_layerwise(model, x, layers=["inner0"], verbose=0)
        before = base.get_weights()
        initial = model.get_layer("hidden").get_weights()
        histories = pretrain_layerwise(model, x, epochs=2, corruption=0.0,
                                       batch_size=N, seed=0, verbose=0)
        kernels = before[0::2]
        biases = before[1::2]
        features = sum(x @ k + b for k, b in zip(kernels, biases))
        self.assert_trained_like_reference(
            model.get_layer("hidden"), initial, features, 1,
            histories["hidden"])
        for old, new in zip(before, base.get_weights()):
            self.assertAllEqual(new, old)


class RepeatedUseTest(ReferenceTestCase):
    def test_seeded_runs_agree_and_a_second_call_starts_from_the_first(self):
        def build():
            init = keras.initializers.GlorotUniform(seed=1)
            return keras.Sequential([
                keras.Input((20,)),
                keras.layers.Dense(8, activation="relu", name="d1",
                                   kernel_initializer=init),
                keras.layers.Dense(2, kernel_initializer=init)])

        x = low_rank_data(N)
        first, second = build(), build()
        for model in (first, second):
            # The masks come from `seed`; the order of the samples in the
            # batch (fit's shuffling) from Keras's global seed.
            keras.utils.set_random_seed(3)
            pretrain_layerwise(model, x, epochs=1, corruption=0.3,
                               batch_size=N, seed=4, verbose=0)
        for a, b in zip(first.get_weights(), second.get_weights()):
            self.assertAllClose(a, b, rtol=1e-5, atol=1e-6)
        layer = first.get_layer("d1")
        initial = layer.get_weights()
        prediction = first.predict(x, verbose=0)
        histories = pretrain_layerwise(first, x, epochs=2, corruption=0.0,
                                       batch_size=N, seed=0, verbose=0)
        self.assert_trained_like_reference(layer, initial, x, 1,
                                           histories["d1"])
        self.assertFalse(np.allclose(first.predict(x, verbose=0),
                                     prediction))
        self.assertTrue(all(layer.trainable for layer in first.layers))

    def test_inputs_that_are_not_an_array_or_of_the_wrong_shape(self):
        import tensorflow as tf

        model = sequential()
        x = low_rank_data(N)
        with self.assertRaisesRegex(TypeError, "`x`"):
            pretrain_layerwise(model, tf.data.Dataset.from_tensor_slices(x),
                               verbose=0)
        with self.assertRaisesRegex(ValueError, r"`x`.*\(64, 19\)"):
            pretrain_layerwise(model, x[:, :19], verbose=0)
