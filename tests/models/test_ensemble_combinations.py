"""`Ensemble` and `predict_with_uncertainty` along COMBINATIONS.md's axes.

The references are independent of kreg: a one-member ensemble must train
exactly like its member alone (a plain Keras `fit` from the same weights),
a k-member ensemble's loss is the sum of its members' own losses, and
predictions are NumPy means and spreads of the members' own `predict`.
"""

import os
import tempfile
import warnings

import keras
import numpy as np

import kreg
from kreg.models import Ensemble
from kreg.models import predict_with_uncertainty
from kreg.models.ensemble import BOOTSTRAP_WEIGHTS
from kreg.models.ensemble import MEMBER_OUTPUTS
from kreg.testing import TestCase
from kreg.testing import jax_data_parallel
from kreg.testing import mirrored_strategy
from tests.callbacks.helpers import Interrupt

REDUCTIONS = ("sum_over_batch_size", "sum", "mean_with_sample_weight")


def make_member(seed=None, regularizer=None, activation=None, units=3):
    init = keras.initializers.GlorotUniform(seed)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="relu", kernel_initializer=init,
                           kernel_regularizer=regularizer),
        keras.layers.Dense(units, kernel_initializer=init,
                           activation=activation),
    ])


def make_two_in_two_out():
    a, b = keras.Input((4,)), keras.Input((2,))
    hidden = keras.layers.Dense(5, activation="relu")(
        keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], [keras.layers.Dense(3)(hidden),
                                keras.layers.Dense(1)(hidden)])


def sparse_ce(reduction="sum_over_batch_size", from_logits=True):
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=from_logits, reduction=reduction)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Data:
    rng = np.random.RandomState(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    x2 = rng.normal(size=(32, 2)).astype("float32")
    y = (x @ rng.normal(size=(4, 3))).argmax(-1)
    sample_weight = np.linspace(0.2, 2.0, 32).astype("float32")
    class_weight = {0: 0.5, 1: 2.0, 2: 1.0}


class EnsembleCombinationsTest(TestCase):
    # One member trains exactly as the member alone -----------------------
    def assert_trains_like_alone(self, make, compile_kwargs, fits,
                                 x=Data.x, y=Data.y, compare=None):
        """`fits`: the keyword arguments of each `fit` (x, y given);
        `compare`: also compares what it returns for both models."""
        alone = make()
        ensemble = Ensemble([make()])
        ensemble.members[0].set_weights(alone.get_weights())
        results = []
        for model in (alone, ensemble):
            # Eager steps: the same numbers as compiled ones, without the
            # tracing (compiled steps: the tests of several members).
            model.compile(run_eagerly=True, **compile_kwargs())
            history = [model.fit(x, y, verbose=0, shuffle=False, **kwargs)
                       .history["loss"] for kwargs in fits]
            results.append((history, compare(model) if compare else None))
        for a, b in zip(alone.get_weights(),
                        ensemble.members[0].get_weights()):
            self.assertAllClose(b, a, atol=1e-6)
        self.assertAllClose(np.concatenate(results[1][0]),
                            np.concatenate(results[0][0]), rtol=1e-5)
        if compare:
            for a, b in zip(results[0][1], results[1][1]):
                self.assertAllClose(b, a, atol=1e-5)

    def test_one_member_under_every_reduction_and_weighting(self):
        # Several members: test_loss_is_the_sum_of_the_members_own_losses.
        cases = [("sum", "sample_weight"),
                 ("mean_with_sample_weight", "class_weight"),
                 ("sum_over_batch_size", "class_weight")]
        for reduction, weighting in cases:
            with self.subTest(reduction=reduction, weighting=weighting):
                fit = dict(batch_size=16, epochs=1)
                if weighting:
                    fit[weighting] = getattr(Data, weighting)
                self.assert_trains_like_alone(
                    lambda: make_member(regularizer="l2"),
                    lambda: dict(optimizer=keras.optimizers.SGD(0.1),
                                 loss=sparse_ce(reduction)), [fit])

    def test_one_member_with_a_schedule(self):
        def compile_kwargs():
            schedule = keras.optimizers.schedules.ExponentialDecay(
                0.2, decay_steps=1, decay_rate=0.5)
            return dict(optimizer=keras.optimizers.SGD(schedule),
                        loss=sparse_ce())

        self.assert_trains_like_alone(make_member, compile_kwargs,
                                      [dict(batch_size=8, epochs=1)])

    def test_one_member_second_fit_evaluate_and_predict(self):
        # A second fit with a new callback that changes the rate; evaluate
        # and predict before and after.
        evaluated = []

        def compare(model):
            return evaluated.pop(0) + [model.evaluate(Data.x, Data.y,
                                                      verbose=0),
                                       model.predict(Data.x, verbose=0)]

        class Evaluate(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                evaluated.append([self.model.evaluate(Data.x, Data.y,
                                                      verbose=0)])

        halve = keras.callbacks.LearningRateScheduler(lambda e, lr: lr / 2)
        self.assert_trains_like_alone(
            make_member, lambda: dict(optimizer=keras.optimizers.SGD(0.2),
                                      loss=sparse_ce()),
            [dict(batch_size=16, epochs=1, callbacks=[Evaluate()]),
             dict(batch_size=16, epochs=2, callbacks=[halve])],
            compare=compare)

    def test_one_member_with_tf_data(self):
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices(
            (Data.x, Data.y, Data.sample_weight)).batch(16)
        self.assert_trains_like_alone(
            make_member, lambda: dict(optimizer="adam",
                                      loss=sparse_ce("sum")),
            [dict(epochs=1)], x=dataset, y=None)

    def test_one_member_with_two_inputs_and_two_outputs(self):
        y = [Data.y, Data.x[:, :1]]
        self.assert_trains_like_alone(
            make_two_in_two_out,
            lambda: dict(optimizer=keras.optimizers.SGD(0.1),
                         loss=[sparse_ce("sum"), "mse"],
                         loss_weights=[1.0, 0.5]),
            [dict(batch_size=16, epochs=1,
                  sample_weight=Data.sample_weight)],
            x=[Data.x, Data.x2], y=y)

    # Several members: each on its own loss -------------------------------
    def test_loss_is_the_sum_of_the_members_own_losses(self):
        # Under every reduction, with sample weights and a regularizer: the
        # ensemble's loss is the sum of what each member's loss would be
        # alone, and one SGD step moves each member as its own step alone.
        for reduction in REDUCTIONS:
            with self.subTest(reduction=reduction):
                ensemble = Ensemble(lambda: make_member(regularizer="l2"),
                                    num_members=2)
                copies = []
                for member in ensemble.members:
                    copy = make_member(regularizer="l2")
                    copy.set_weights(member.get_weights())
                    copy.compile(keras.optimizers.SGD(0.5),
                                 sparse_ce(reduction), run_eagerly=True)
                    copies.append(copy)
                expected = sum(copy.train_on_batch(
                    Data.x, Data.y, sample_weight=Data.sample_weight)
                    for copy in copies)
                ensemble.compile(keras.optimizers.SGD(0.5),
                                 sparse_ce(reduction), run_eagerly=True)
                loss = ensemble.train_on_batch(
                    Data.x, Data.y, sample_weight=Data.sample_weight)
                self.assertAllClose(loss, expected, rtol=1e-5)
                for copy, member in zip(copies, ensemble.members):
                    for a, b in zip(copy.get_weights(),
                                    member.get_weights()):
                        self.assertAllClose(b, a, atol=1e-5)

    def test_each_member_steps_as_alone_when_distributed(self):
        # Two replicas (tf.distribute, keras.distribution): the ensemble's
        # train step runs in each replica's thread.
        backend = keras.backend.backend()
        if backend == "torch":
            self.skipTest("no in-process distribution on PyTorch")
        scope = (mirrored_strategy().scope() if backend == "tensorflow"
                 else jax_data_parallel())
        with scope:
            ensemble = Ensemble(make_member, num_members=2)
            ensemble.compile(keras.optimizers.SGD(0.5), sparse_ce())
            initial = [member.get_weights() for member in ensemble.members]
            ensemble.train_on_batch(Data.x, Data.y)
        # The reference: each member's step alone on one device.
        for weights, member in zip(initial, ensemble.members):
            copy = make_member()
            copy.set_weights(weights)
            copy.compile(keras.optimizers.SGD(0.5), sparse_ce(),
                         run_eagerly=True)
            copy.train_on_batch(Data.x, Data.y)
            for a, b in zip(copy.get_weights(), member.get_weights()):
                self.assertAllClose(b, a, atol=1e-5)

    def test_bootstrap_draws_weigh_each_members_loss(self):
        # The draws are sample weights of the member's own loss: NumPy's
        # reduction of the weighted cross-entropy, per member.
        ensemble = Ensemble(make_member, num_members=2, mode="bootstrap")
        draws = np.random.RandomState(3).poisson(1.0, (2, 32))
        draws = draws.astype("float32")
        outputs = [member(Data.x) for member in ensemble.members]
        y_pred = {MEMBER_OUTPUTS: outputs, BOOTSTRAP_WEIGHTS: draws}
        for reduction in REDUCTIONS:
            ensemble.compile("sgd", sparse_ce(reduction))
            loss = ensemble.compute_loss(Data.x, Data.y, y_pred,
                                         Data.sample_weight)
            expected = 0.0
            for draw, logits in zip(draws, outputs):
                p = softmax(self.to_numpy(logits))
                nll = -np.log(p[np.arange(32), Data.y])
                weight = draw * Data.sample_weight
                expected += {
                    "sum_over_batch_size": np.sum(weight * nll) / 32,
                    "sum": np.sum(weight * nll),
                    "mean_with_sample_weight":
                        np.sum(weight * nll) / np.sum(weight),
                }[reduction]
            self.assertAllClose(loss, expected, rtol=1e-5, msg=reduction)

    # Seeded initializers, clone_model, factories -------------------------
    def test_members_of_seeded_models_and_factories_differ(self):
        template = make_member(seed=1)
        for members in (template, lambda: make_member(seed=1),
                        lambda: keras.models.clone_model(template)):
            with self.subTest(members=members):
                first = Ensemble(members, num_members=3)
                kernels = [self.to_numpy(m.layers[0].kernel)
                           for m in first.members]
                for i in range(3):
                    for j in range(i):
                        self.assertFalse(np.allclose(kernels[i], kernels[j]))
                # Member 0 keeps the user's weights; the ensemble is
                # reproducible, and its `seed` gives other members.
                self.assertAllClose(kernels[0], template.layers[0].kernel)
                again = Ensemble(members, num_members=3)
                for m, n in zip(first.members, again.members):
                    for a, b in zip(m.get_weights(), n.get_weights()):
                        self.assertAllEqual(a, b)
                seeded = Ensemble(members, num_members=3, seed=5)
                self.assertFalse(np.allclose(
                    seeded.members[1].layers[0].kernel, kernels[1]))

    def test_factory_seeds_that_differ_are_kept(self):
        seeds = iter([1, 2])
        ensemble = Ensemble(lambda: make_member(seed=next(seeds)),
                            num_members=2)
        for seed, member in zip([1, 2], ensemble.members):
            for a, b in zip(member.get_weights(),
                            make_member(seed=seed).get_weights()):
                self.assertAllEqual(a, b)

    def test_unbuilt_seeded_factory_members_differ(self):
        def make():
            init = keras.initializers.GlorotUniform(seed=2)
            return keras.Sequential(
                [keras.layers.Dense(3, kernel_initializer=init)])

        ensemble = Ensemble(make, num_members=2)
        ensemble.predict(Data.x, verbose=0)
        a, b = (self.to_numpy(m.layers[0].kernel) for m in ensemble.members)
        self.assertFalse(np.allclose(a, b))

    def test_factory_weights_loaded_by_the_user_are_kept(self):
        pretrained = make_member(seed=1).get_weights()
        pretrained = [w + 1.0 for w in pretrained]

        def make():
            model = make_member(seed=1)
            model.set_weights(pretrained)
            return model

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ensemble = Ensemble(make, num_members=2)
        for member in ensemble.members:
            for a, b in zip(member.get_weights(), pretrained):
                self.assertAllEqual(a, b)
        self.assertTrue(any("same weights" in str(w.message)
                            for w in caught))

    def test_a_list_of_identical_members_is_kept_with_a_warning(self):
        members = [make_member(seed=1), make_member(seed=1)]
        with self.assertWarnsRegex(UserWarning, "Members 0 and 1"):
            ensemble = Ensemble(members)
        self.assertAllEqual(ensemble.members[0].layers[0].kernel,
                            ensemble.members[1].layers[0].kernel)

    # Inside another model ------------------------------------------------
    def test_inside_another_model_predicts_but_refuses_to_train(self):
        ensemble = Ensemble(make_member, num_members=2)
        model = keras.Sequential([keras.Input((4,)),
                                  keras.layers.Rescaling(2.0), ensemble])
        expected = np.mean([self.to_numpy(m(2.0 * Data.x))
                            for m in ensemble.members], axis=0)
        self.assertAllClose(model.predict(Data.x, verbose=0), expected,
                            atol=1e-6)
        model.compile("sgd", sparse_ce())
        with self.assertRaisesRegex(ValueError, "inside each member"):
            model.fit(Data.x, Data.y, epochs=1, verbose=0)

    def test_a_frozen_ensemble_inside_another_model(self):
        ensemble = Ensemble(make_member, num_members=2)
        ensemble.trainable = False
        before = [m.get_weights() for m in ensemble.members]
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                                  ensemble])
        model.compile(keras.optimizers.SGD(0.1), sparse_ce(),
                      run_eagerly=True)
        model.fit(Data.x, Data.y, epochs=1, verbose=0)
        for member, weights in zip(ensemble.members, before):
            for a, b in zip(member.get_weights(), weights):
                self.assertAllEqual(a, b)
        hidden = self.to_numpy(model.layers[0](Data.x))
        expected = np.mean([self.to_numpy(m(hidden))
                            for m in ensemble.members], axis=0)
        self.assertAllClose(model.predict(Data.x, verbose=0), expected,
                            atol=1e-5)

    # Logits and probabilities --------------------------------------------
    def test_softmax_members_with_a_logit_combination_raise(self):
        for combine, activation in (("softmax", "softmax"),
                                    ("sigmoid", "sigmoid"),
                                    ("softmax", "sigmoid")):
            with self.subTest(combine=combine, activation=activation):
                with self.assertRaisesRegex(ValueError, "combine") as ctx:
                    Ensemble(lambda: make_member(activation=activation),
                             num_members=2, combine=combine)
                self.assertIn(activation, str(ctx.exception))
        Ensemble(lambda: make_member(activation="softmax"), num_members=2)

    def test_the_loss_must_match_the_combination(self):
        ensemble = Ensemble(make_member, num_members=2)
        with self.assertWarnsRegex(UserWarning, "logits"):
            ensemble.compile("sgd", sparse_ce(from_logits=True))
        for loss in (sparse_ce(from_logits=False),
                     "sparse_categorical_crossentropy"):
            ensemble = Ensemble(make_member, num_members=2,
                                combine="softmax")
            with self.assertRaisesRegex(ValueError, "from_logits"):
                ensemble.compile("sgd", loss)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            Ensemble(make_member, num_members=2, combine="softmax").compile(
                "sgd", sparse_ce())
            Ensemble(make_member, num_members=2).compile("sgd", "mse")

    # Several outputs ------------------------------------------------------
    def test_uncertainty_of_every_output(self):
        ensemble = Ensemble(make_two_in_two_out, num_members=3)
        x = [Data.x, Data.x2]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mean, std = predict_with_uncertainty(ensemble, x)
        self.assertEqual([str(w.message) for w in caught
                          if issubclass(w.category, UserWarning)], [])
        predictions = [[self.to_numpy(o) for o in m(x)]
                       for m in ensemble.members]
        for output in range(2):
            stacked = np.stack([p[output] for p in predictions])
            self.assertAllClose(mean[output], stacked.mean(0), atol=1e-6)
            self.assertAllClose(std[output], stacked.std(0), atol=1e-6)
        self.assertAllClose(ensemble(x)[1], mean[1], atol=1e-6)

    def test_built_members_give_no_build_warning(self):
        # Members trained (built) on their own, gathered in an ensemble.
        members = [make_member(), make_member()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mean, _ = predict_with_uncertainty(Ensemble(members), Data.x)
        self.assertEqual([str(w.message) for w in caught
                          if issubclass(w.category, UserWarning)], [])
        self.assertAllClose(mean, np.mean([self.to_numpy(m(Data.x))
                                           for m in members], 0), atol=1e-6)

    # Built members, weights files, resuming ------------------------------
    def test_built_members_make_a_built_ensemble(self):
        ensemble = Ensemble(make_member, num_members=2)
        self.assertTrue(ensemble.built)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "e.weights.h5")
            ensemble.save_weights(path)
            other = Ensemble(make_member, num_members=2)
            other.load_weights(path)
            self.assertAllClose(other(Data.x), ensemble(Data.x))
            ensemble.compile("sgd", sparse_ce(), run_eagerly=True)
            ensemble.fit(Data.x, Data.y, epochs=1, verbose=0, callbacks=[
                kreg.callbacks.BackupAndRestore(os.path.join(folder, "b"))])

    def bootstrap_fit(self, callbacks=(), epochs=2, ensemble=None):
        if ensemble is None:
            keras.utils.set_random_seed(3)
            # One by one on PyTorch: a resumed fit's first step checks the
            # vectorized call against it, which rounds differently.
            ensemble = Ensemble(make_member, num_members=2,
                                mode="bootstrap", seed=7, vectorize=False)
            ensemble.compile(keras.optimizers.Adam(0.05), sparse_ce(),
                             run_eagerly=True)
        try:
            ensemble.fit(Data.x, Data.y, batch_size=16, epochs=epochs,
                         shuffle=False, verbose=0, callbacks=list(callbacks))
        except RuntimeError as error:
            self.assertIn("interrupted", str(error))
        return ensemble

    def test_resumed_bootstrap_fit_ends_as_the_uninterrupted_one(self):
        expected = self.bootstrap_fit().get_weights()
        with tempfile.TemporaryDirectory() as folder:
            backup = kreg.callbacks.BackupAndRestore(folder)
            self.bootstrap_fit([backup, Interrupt(1)])
            resumed = self.bootstrap_fit([backup]).get_weights()
        for a, b in zip(resumed, expected):
            np.testing.assert_array_equal(a, b)

    def test_keras_file_keeps_the_bootstrap_stream(self):
        ensemble = self.bootstrap_fit(epochs=1)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "e.keras")
            ensemble.save(path)
            reloaded = keras.models.load_model(path)
        for model in (ensemble, reloaded):
            self.bootstrap_fit(epochs=1, ensemble=model)
        for a, b in zip(reloaded.get_weights(), ensemble.get_weights()):
            self.assertAllClose(a, b, atol=1e-6)

    # Bad members ----------------------------------------------------------
    def test_a_layer_is_not_a_member(self):
        with self.assertRaisesRegex(TypeError, "members.*Dense"):
            Ensemble(keras.layers.Dense(3))

    def test_members_with_different_output_shapes(self):
        # Built members: when the ensemble is made; others: at their first
        # call, before a fit trains.
        with self.assertRaisesRegex(ValueError, r"members.*\(2,\)"):
            Ensemble([make_member(units=3), make_member(units=2)])
        members = [keras.Sequential([keras.layers.Dense(units)])
                   for units in (3, 2)]
        ensemble = Ensemble(members)
        ensemble.compile("sgd", sparse_ce())
        with self.assertRaisesRegex(ValueError, r"members.*\(2,\)"):
            ensemble.fit(Data.x, Data.y, epochs=1, verbose=0)
        self.assertEqual(int(self.to_numpy(ensemble.optimizer.iterations)), 0)
        with self.assertRaisesRegex(ValueError, r"members.*\(2,\)"):
            Ensemble([keras.Sequential([keras.layers.Dense(units)])
                      for units in (3, 2)]).predict(Data.x, verbose=0)
