import json
import math
import os
import tempfile

import keras
import numpy as np

import kreg
from kreg.models import Ensemble
from kreg.models import predict_with_uncertainty
from kreg.models.ensemble import BOOTSTRAP_WEIGHTS
from kreg.models.ensemble import MEMBER_OUTPUTS
from kreg.testing import TestCase


def make_member(units=3, seed=None):
    init = keras.initializers.GlorotUniform(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="relu", kernel_initializer=init),
        keras.layers.Dense(units, kernel_initializer=init),
    ])


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class EnsembleTest(TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(0)
        self.x = rng.normal(size=(96, 6)).astype("float32")
        self.y = (self.x @ rng.normal(size=(6, 3))).argmax(-1)

    def test_prediction_is_the_mean_of_the_members(self):
        ensemble = Ensemble(make_member, num_members=4, combine="softmax")
        logits = self.to_numpy(ensemble.predict(self.x, verbose=0))
        members = [self.to_numpy(m(self.x)) for m in ensemble.members]
        mean_probabilities = np.mean([softmax(z) for z in members], axis=0)
        self.assertAllClose(softmax(logits), mean_probabilities, atol=1e-6)
        # The outputs are logits of the average: log of the mean, up to a
        # constant per row.
        self.assertAllClose(logits - logits.max(-1, keepdims=True),
                            np.log(mean_probabilities) - np.log(
                                mean_probabilities).max(-1, keepdims=True),
                            atol=1e-5)
        mean, std = predict_with_uncertainty(ensemble, self.x)
        self.assertAllClose(mean, mean_probabilities, atol=1e-6)
        self.assertAllClose(std, np.std([softmax(z) for z in members],
                                        axis=0), atol=1e-6)

    def test_mean_and_sigmoid_combination(self):
        ensemble = Ensemble(make_member(1), num_members=3, combine="sigmoid")
        z = np.stack([self.to_numpy(m(self.x)) for m in ensemble.members])
        p = self.to_numpy(keras.ops.sigmoid(ensemble(self.x)))
        self.assertAllClose(p, (1 / (1 + np.exp(-z))).mean(0), atol=1e-6)
        regression = Ensemble(make_member(2), num_members=3)
        z = np.stack([self.to_numpy(m(self.x)) for m in regression.members])
        self.assertAllClose(regression(self.x), z.mean(0), atol=1e-6)

    def test_one_member_trains_exactly_as_the_member_alone(self):
        def train(model):
            model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                          sparse_ce())
            model.fit(self.x, self.y, batch_size=16, epochs=2, verbose=0,
                      shuffle=True)
            return model

        keras.utils.set_random_seed(7)
        alone = train(make_member())
        keras.utils.set_random_seed(7)
        ensemble = train(Ensemble(make_member, num_members=1))
        for a, b in zip(alone.get_weights(),
                        ensemble.members[0].get_weights()):
            self.assertAllClose(a, b, atol=1e-6)

    def test_each_member_gets_its_own_gradient(self):
        # Full data: the training loss is the sum of the members' losses, so
        # one SGD step moves each member as a step of that member alone.
        ensemble = Ensemble(make_member, num_members=3)
        copies = [make_member() for _ in range(3)]
        for copy, member in zip(copies, ensemble.members):
            copy.set_weights(member.get_weights())
            copy.compile(keras.optimizers.SGD(0.5), sparse_ce())
            copy.train_on_batch(self.x[:32], self.y[:32])
        ensemble.compile(keras.optimizers.SGD(0.5), sparse_ce())
        ensemble.train_on_batch(self.x[:32], self.y[:32])
        for copy, member in zip(copies, ensemble.members):
            for a, b in zip(copy.get_weights(), member.get_weights()):
                self.assertAllClose(a, b, atol=1e-5)

    def test_bootstrap_weights_are_poisson_one_and_differ_by_member(self):
        ensemble = Ensemble(make_member, num_members=5, mode="bootstrap",
                            seed=3)
        weights = self.to_numpy(ensemble.draw_bootstrap_weights(4000))
        self.assertEqual(weights.shape, (5, 4000))
        self.assertTrue(np.all(weights == np.round(weights)))
        # Never seen this epoch: P(K = 0) = 1/e; 20,000 draws give a
        # standard error of 0.0034.
        unseen = (weights == 0).mean(axis=1)
        np.testing.assert_allclose(unseen, math.exp(-1), atol=0.03)
        self.assertAlmostEqual(float(weights.mean()), 1.0, delta=0.03)
        self.assertAlmostEqual(float(weights.var()), 1.0, delta=0.06)
        # Members draw independently: correlation near 0.
        correlation = np.corrcoef(weights)[np.triu_indices(5, 1)]
        self.assertLess(np.abs(correlation).max(), 0.06)
        second = self.to_numpy(ensemble.draw_bootstrap_weights(4000))
        self.assertFalse(np.array_equal(weights, second))

    def test_bootstrap_loss_weighs_samples_by_the_draws(self):
        ensemble = Ensemble(make_member, num_members=2, mode="bootstrap",
                            seed=0)
        ensemble.compile("sgd", sparse_ce())
        draws = self.to_numpy(ensemble.draw_bootstrap_weights(len(self.x)))
        y_pred = {MEMBER_OUTPUTS: [m(self.x) for m in ensemble.members],
                  BOOTSTRAP_WEIGHTS: draws}
        loss = self.to_numpy(ensemble.compute_loss(
            self.x, self.y, y_pred, training=True))
        expected = 0.0
        for m, logits in enumerate(y_pred[MEMBER_OUTPUTS]):
            p = softmax(self.to_numpy(logits))
            nll = -np.log(p[np.arange(len(self.y)), self.y])
            expected += np.mean(draws[m] * nll)
        self.assertAllClose(loss, expected, atol=1e-5)

    def test_training_metrics_are_the_ensembles(self):
        # No noise layers: the training pass predicts as inference does, and
        # the step's metrics see the weights before the update.
        ensemble = Ensemble(make_member, num_members=3, combine="softmax")
        ensemble.compile("sgd", sparse_ce(), metrics=["accuracy"])
        before = self.to_numpy(ensemble(self.x))
        logs = ensemble.train_on_batch(self.x, self.y, return_dict=True)
        expected = np.mean(before.argmax(-1) == self.y)
        self.assertAlmostEqual(logs["accuracy"], expected, places=5)
        members = [np.mean(self.to_numpy(m(self.x)).argmax(-1) == self.y)
                   for m in ensemble.members]
        self.assertNotIn(round(expected, 5), [round(a, 5) for a in members])

    def test_fit_with_sample_weights_and_validation(self):
        ensemble = Ensemble(make_member, num_members=3, mode="bootstrap",
                            combine="softmax", seed=1)
        ensemble.compile(keras.optimizers.Adam(0.01), sparse_ce(),
                         metrics=["accuracy"],
                         jit_compile=self.jit_compile_setting())
        weights = np.linspace(0.5, 1.5, len(self.y)).astype("float32")
        history = ensemble.fit(self.x, self.y, sample_weight=weights,
                               validation_split=0.25, epochs=3,
                               batch_size=16, verbose=0)
        self.assertTrue(np.all(np.isfinite(history.history["loss"])))
        self.assertIn("val_accuracy", history.history)
        self.assertLess(history.history["val_loss"][-1],
                        history.history["val_loss"][0])

    def test_save_and_load_without_custom_objects(self):
        ensemble = Ensemble(make_member, num_members=3, mode="bootstrap",
                            combine="softmax", seed=2)
        ensemble.compile("adam", sparse_ce())
        ensemble.fit(self.x, self.y, epochs=1, verbose=0)
        reloaded = self.run_save_load(ensemble, self.x)
        self.assertIsInstance(reloaded, Ensemble)
        self.assertEqual((reloaded.num_members, reloaded.mode,
                          reloaded.combine), (3, "bootstrap", "softmax"))
        config = json.loads(json.dumps(ensemble.get_config()))
        revived = keras.saving.deserialize_keras_object(json.loads(
            json.dumps(keras.saving.serialize_keras_object(ensemble))))
        self.assertIsInstance(revived, Ensemble)
        self.assertEqual(json.loads(json.dumps(revived.get_config())),
                         config)

    def test_members_from_a_model_to_clone_or_a_list(self):
        template = make_member()
        ensemble = Ensemble(template, num_members=3)
        self.assertEqual(ensemble.num_members, 3)
        kernels = [self.to_numpy(m.layers[0].kernel)
                   for m in ensemble.members]
        self.assertFalse(np.allclose(kernels[0], kernels[1]))
        self.assertTrue(all(m is not template for m in ensemble.members))
        members = [make_member(), make_member()]
        ensemble = Ensemble(members)
        self.assertIs(ensemble.members[1], members[1])

    def test_works_with_kregs_callbacks_and_clipping(self):
        ensemble = Ensemble(make_member, num_members=2, mode="bootstrap",
                            combine="softmax", seed=4)
        ensemble.compile(kreg.optimizers.ClippedOptimizer(
            keras.optimizers.Adam(0.01), global_clipnorm=1.0), sparse_ce())
        ema = kreg.callbacks.EMA(decay=0.9)
        stop = kreg.callbacks.EarlyStopping(patience=1,
                                            restore_best_weights=True)
        history = ensemble.fit(self.x, self.y, validation_split=0.25,
                               epochs=4, batch_size=16, verbose=0,
                               callbacks=[ema, stop])
        self.assertTrue(np.all(np.isfinite(history.history["val_loss"])))
        self.assertEqual(stop.best, min(history.history["val_loss"]))
        self.assertGreater(ema.steps, 0)

    def test_retrain_on_full_data_with_an_ensemble(self):
        ensemble = Ensemble(make_member, num_members=2, combine="softmax")
        ensemble.compile("adam", sparse_ce())
        stop = kreg.callbacks.EarlyStopping(patience=1)
        retrain = kreg.callbacks.RetrainOnFullData(self.x, self.y,
                                                   batch_size=16)
        ensemble.fit(self.x[:64], self.y[:64],
                     validation_data=(self.x[64:], self.y[64:]), epochs=3,
                     batch_size=16, verbose=0, callbacks=[stop, retrain])
        self.assertEqual(retrain.retrain_epochs, stop.best_epoch + 1)

    def test_bad_arguments(self):
        cases = [
            (dict(members=make_member, mode="bag"), ValueError, "mode"),
            (dict(members=make_member, combine="max"), ValueError,
             "combine"),
            (dict(members=make_member, num_members=0), ValueError,
             "num_members=0"),
            (dict(members=make_member, num_members=2.5), TypeError,
             "num_members=2.5"),
            (dict(members=[make_member()], num_members=2), ValueError,
             "num_members=2"),
            (dict(members="mlp"), TypeError, "members='mlp'"),
            (dict(members=lambda: 3), TypeError, "keras.Model"),
            (dict(members=make_member, seed=-1), ValueError, "seed=-1"),
        ]
        shared = make_member()
        cases.append((dict(members=lambda: shared, num_members=2),
                      ValueError, "distinct"))
        for kwargs, error, text in cases:
            with self.assertRaises(error, msg=str(kwargs)) as context:
                Ensemble(**kwargs)
            self.assertIn(text, str(context.exception))

    def test_numpy_integer_member_count(self):
        self.assertEqual(Ensemble(make_member, np.int64(2)).num_members, 2)

    def test_save_weights_round_trip(self):
        ensemble = Ensemble(make_member, num_members=2)
        ensemble(self.x)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "e.weights.h5")
            ensemble.save_weights(path)
            other = Ensemble(make_member, num_members=2)
            other(self.x)
            other.load_weights(path)
        self.assertAllClose(other(self.x), ensemble(self.x))


def make_normalized_member(activation="relu", momentum=0.99,
                           max_value=None):
    """Activity regularization and both BatchNormalization layers."""
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activity_regularizer="l2"),
        kreg.layers.BatchNormalization(),
        keras.layers.ReLU(max_value=max_value),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization(momentum=momentum),
        keras.layers.Activation(activation),
        keras.layers.Dense(3),
    ])


def make_dropout_member():
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dropout(0.5, seed=5),
        keras.layers.Dense(3),
    ])


def record_calls(model):
    """The list of `model.call`'s calls from now on, filled as they come."""
    calls = []
    call = model.call

    def recorded(*args, **kwargs):
        calls.append(kwargs.get("training"))
        return call(*args, **kwargs)

    model.call = recorded
    return calls


class VectorizedMembersTest(TestCase):
    """On PyTorch alike members run as one vmap-ed call of the first
    member (`vectorize=True`); other backends always loop. The records of
    the members' calls are checked on PyTorch only: TensorFlow and JAX
    trace the step once."""

    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(0)
        self.x = rng.normal(size=(64, 6)).astype("float32")
        self.y = rng.randint(0, 3, 64)

    def fit_both(self, make_members):
        """Ensembles of `make_members()` from the same weights, vectorized
        or not, each fit twice one epoch; returns them and the calls of the
        vectorized one's second member in its second fit."""
        vectorized = Ensemble(make_members(), combine="softmax")
        one_by_one = Ensemble(make_members(), combine="softmax",
                              vectorize=False)
        for source, target in zip(vectorized.members, one_by_one.members):
            target.set_weights(source.get_weights())
        for ensemble in (vectorized, one_by_one):
            ensemble.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                             sparse_ce())
            ensemble.fit(self.x, self.y, batch_size=16, epochs=1,
                         shuffle=False, verbose=0)
            if ensemble is vectorized:
                calls = record_calls(ensemble.members[1])
            ensemble.fit(self.x, self.y, batch_size=16, epochs=1,
                         shuffle=False, verbose=0)
        # Weights and moving statistics, with any activity regularization
        # in the loss.
        for a, b in zip(vectorized.members, one_by_one.members):
            self.assertEqual(len(a.weights), len(b.weights))
            for u, v in zip(a.weights, b.weights):
                self.assertAllClose(u, v, atol=1e-5, rtol=1e-5, msg=u.path)
        return vectorized, one_by_one, calls

    def test_vectorized_fit_trains_each_member_as_one_by_one(self):
        vectorized, one_by_one, calls = self.fit_both(
            lambda: [make_normalized_member() for _ in range(3)])
        self.assertAllClose(vectorized(self.x), one_by_one(self.x),
                            atol=1e-5)
        probabilities = softmax(self.to_numpy(vectorized.predict(
            self.x, verbose=0)))
        members = [softmax(self.to_numpy(m(self.x)))
                   for m in vectorized.members]
        self.assertAllClose(probabilities, np.mean(members, 0), atol=1e-6)
        if keras.backend.backend() == "torch":
            # The first call in each mode also runs the members one by one
            # (training: in the first fit; inference: `vectorized(self.x)`),
            # then `m(self.x)`; the second fit and predict ran vectorized.
            self.assertEqual(calls, [False, None])
        self.assertTrue(vectorized.get_config()["vectorize"])
        self.assertFalse(Ensemble.from_config(
            one_by_one.get_config()).vectorize)

    def test_members_with_random_draws_run_one_by_one(self):
        # Each with its own dropout masks, as with vectorize=False (the
        # same dropout seeds).
        _, _, calls = self.fit_both(
            lambda: [make_dropout_member() for _ in range(3)])
        if keras.backend.backend() == "torch":
            self.assertEqual(calls.count(True), 4)

    def test_members_that_differ_run_one_by_one(self):
        # Alike in classes and shapes; one member differs in its activation
        # (outputs), its statistics' momentum (updates), or a cap of its
        # ReLU that no value reaches here (only its settings show it).
        for other in (dict(activation="tanh"), dict(momentum=0.5),
                      dict(max_value=1000.0)):
            _, _, calls = self.fit_both(lambda: [
                make_normalized_member(), make_normalized_member(),
                make_normalized_member(**other)])
            if keras.backend.backend() == "torch":
                self.assertEqual(calls.count(True), 4, msg=str(other))
        members = [make_member(), make_member(), keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
            keras.layers.Dense(3)])]
        ensemble = Ensemble(members, combine="softmax")
        ensemble.compile(keras.optimizers.SGD(0.1), sparse_ce())
        history = ensemble.fit(self.x, self.y, batch_size=16, epochs=2,
                               verbose=0)
        self.assertLess(history.history["loss"][1], history.history["loss"][0])
        probabilities = softmax(self.to_numpy(ensemble(self.x)))
        expected = np.mean([softmax(self.to_numpy(m(self.x)))
                            for m in members], axis=0)
        self.assertAllClose(probabilities, expected, atol=1e-6)


class PredictWithUncertaintyTest(TestCase):
    def test_mc_dropout_model_in_the_same_form(self):
        rng = np.random.RandomState(0)
        x = rng.normal(size=(32, 6)).astype("float32")
        def mc_model():
            return keras.Sequential([
                keras.Input((6,)),
                keras.layers.Dense(16, kernel_initializer=keras.initializers.
                                   GlorotUniform(seed=3)),
                kreg.layers.Dropout(0.5, mc=True, seed=1),
                keras.layers.Dense(3, kernel_initializer=keras.initializers.
                                   GlorotUniform(seed=4))])

        # Two models with the same weights and dropout seeds draw alike.
        mean, std = predict_with_uncertainty(mc_model(), x, num_samples=30)
        reference = kreg.layers.mc_predict(mc_model(), x, num_samples=30)
        self.assertAllClose(mean, reference[0], atol=1e-5)
        self.assertAllClose(std, reference[1], atol=1e-5)
        model = mc_model()
        self.assertEqual(mean.shape, (32, 3))
        probabilities, spread = predict_with_uncertainty(
            model, x, num_samples=30, from_logits=True)
        self.assertAllClose(probabilities.sum(-1), np.ones(32), atol=1e-5)
        self.assertGreater(float(spread.min()), 0.0)
        self.assertLess(float(spread.max()), 0.5)


class EnsemblePrecisionTest(TestCase):
    def test_mixed_precision_fit_and_float32_combination(self):
        rng = np.random.RandomState(1)
        x = rng.normal(size=(64, 6)).astype("float32")
        y = rng.randint(0, 3, 64)
        with self.mixed_precision("mixed_float16"):
            ensemble = Ensemble(make_member, num_members=3,
                                mode="bootstrap", combine="softmax", seed=0)
            ensemble.compile("adam", sparse_ce())
            history = ensemble.fit(x, y, epochs=2, batch_size=16, verbose=0)
        self.assertTrue(np.all(np.isfinite(history.history["loss"])))
        self.assertEqual(
            keras.backend.standardize_dtype(ensemble.members[0].weights[0]
                                            .dtype), "float32")
        logits = self.to_numpy(ensemble(x)).astype("float64")
        members = [self.to_numpy(m(x)).astype("float64")
                   for m in ensemble.members]
        self.assertAllClose(softmax(logits),
                            np.mean([softmax(z) for z in members], 0),
                            atol=2e-3)
