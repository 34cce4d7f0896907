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

    def test_second_layer_learns_from_the_first_layers_features(self):
        model = sequential()
        x = low_rank_data()
        histories = pretrain_layerwise(model, x, epochs=2, verbose=0)
        # The second autoencoder reconstructs the input of `second`: the
        # output of `norm` (inference mode), 16 features.
        features = keras.Model(model.inputs[0],
                               model.get_layer("norm").output)
        h = self.to_numpy(features(x, training=False))
        self.assertEqual(h.shape, (512, 16))
        self.assertLess(histories["second"].history["loss"][-1],
                        float(np.mean((h - h.mean(0)) ** 2)) * 2)

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
