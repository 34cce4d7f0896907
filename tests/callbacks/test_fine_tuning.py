"""FineTuning: stages, learning rates, optimizer state, resume, callbacks."""

import os
import tempfile
import warnings

import keras
import numpy as np

from kreg.callbacks import EMA
from kreg.callbacks import BackupAndRestore
from kreg.callbacks import EarlyStopping
from kreg.callbacks import FineTuning
from kreg.callbacks import GradientMonitor
from kreg.optimizers import ClippedOptimizer
from kreg.optimizers import FineTuningOptimizer
from kreg.testing import TestCase
from tests.callbacks.helpers import Interrupt

RNG = np.random.RandomState(0)
X = RNG.normal(size=(32, 6)).astype("float32")
Y = (X @ RNG.normal(size=(6, 1))).astype("float32")


def make_model(optimizer=None, batch_normalization=True):
    """A pre-trained-like base (Dense, BN, Dense, Dense) and a Dense head."""
    keras.utils.set_random_seed(1)
    layers = [keras.Input((6,)), keras.layers.Dense(8, name="b1")]
    if batch_normalization:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers += [keras.layers.Dense(8, activation="tanh", name="b2"),
               keras.layers.Dense(8, activation="tanh", name="b3")]
    base = keras.Sequential(layers, name="base")
    model = keras.Sequential([keras.Input((6,)), base,
                              keras.layers.Dense(1, name="head")],
                             name="model")
    model.compile(optimizer or keras.optimizers.Adam(1e-2), "mse")
    return base, model


def weights(model):
    return {v.path: keras.ops.convert_to_numpy(v).copy()
            for v in model.weights}


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = [weights(self.model)] if self.model else []

    def on_train_begin(self, logs=None):
        self.epochs = [weights(self.model)]

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(weights(self.model))


def set_weights(model, values):
    for variable in model.weights:
        variable.assign(values[variable.path])


def plain_step(start, optimizer, epochs=1, batch_size=32, make=None,
               x=X, y=Y):
    """The weights of a plain Keras model (no FineTuning) with the weights
    `start` after `epochs` epochs of `optimizer` on (x, y)."""
    make = make or (lambda o: make_model(o, batch_normalization=False))
    _, reference = make(optimizer)
    set_weights(reference, start)
    reference.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
                  shuffle=False)
    return weights(reference)


def make_conv_model(optimizer):
    """A Functional model whose base nests a Conv sub-model."""
    keras.utils.set_random_seed(1)
    stem = keras.Sequential([keras.Input((5, 5, 1)),
                             keras.layers.Conv2D(2, 3, name="conv")],
                            name="stem")
    base = keras.Sequential([keras.Input((5, 5, 1)), stem,
                             keras.layers.Flatten(),
                             keras.layers.Dense(4, activation="tanh",
                                                name="b2")], name="base")
    inputs = keras.Input((5, 5, 1))
    outputs = keras.layers.Dense(1, name="head")(base(inputs))
    model = keras.Model(inputs, outputs, name="model")
    model.compile(optimizer, "mse")
    return base, model


class InterruptAt(keras.callbacks.Callback):
    """Raises `RuntimeError("interrupted")` when batch `batch` of epoch
    `epoch` begins."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def all_layers(layer):
    """`layer` and every layer nested in it, parents first."""
    found = [layer]
    for child in getattr(layer, "layers", []):
        found += all_layers(child)
    return found


def trainable_flags(model):
    """Each layer's flag and the trainable weights (layer/name: a loaded
    model's weights have other paths)."""
    return ([(layer.name, layer.trainable) for layer in all_layers(model)],
            ["/".join(v.path.split("/")[-2:])
             for v in model.trainable_variables])


def changed(before, after):
    return sorted({p.split("/")[-2] for p in after
                   if not np.array_equal(before[p], after[p])})


class FineTuningTest(TestCase):
    def test_stages_unfreeze_the_base_from_the_top(self):
        base, model = make_model()
        recorder = Recorder()
        model.fit(X, Y, batch_size=8, epochs=5, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=2, unfreeze_steps=3,
                       epochs_per_step=1), recorder])
        steps = [changed(a, b) for a, b in
                 zip(recorder.epochs, recorder.epochs[1:])]
        self.assertEqual(steps, [["head"], ["head"], ["b3", "head"],
                                 ["b2", "b3", "head"],
                                 ["b1", "b2", "b3", "head"]])
        # Frozen batch normalization: inference mode, statistics untouched.
        start = recorder.epochs[0]
        for name in ("moving_mean", "moving_variance", "gamma", "beta"):
            self.assertAllEqual(recorder.epochs[-1][f"base/bn/{name}"],
                                start[f"base/bn/{name}"])

    def test_frozen_stage_is_the_plain_fit_of_the_head(self):
        base, model = make_model()
        model.fit(X, Y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[FineTuning(base, freeze_epochs=2)])
        reference_base, reference = make_model()
        reference_base.trainable = False
        reference.compile(keras.optimizers.Adam(1e-2), "mse")
        reference.fit(X, Y, batch_size=8, epochs=2, verbose=0)
        for path, value in weights(reference).items():
            self.assertAllClose(weights(model)[path], value, atol=1e-6)

    def test_base_learning_rate_is_the_factor_of_the_heads(self):
        # One SGD step on all the data: the base moves by 0.25 times the
        # step of a plain SGD fit of the whole model, the head by the same.
        base, model = make_model(keras.optimizers.SGD(0.1),
                                 batch_normalization=False)
        start = weights(model)
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=0, base_learning_rate_factor=0.25)])
        _, reference = make_model(keras.optimizers.SGD(0.1),
                                  batch_normalization=False)
        reference.fit(X, Y, batch_size=32, epochs=1, verbose=0)
        after, expected = weights(model), weights(reference)
        for path in start:
            factor = 0.25 if path.startswith("base/") else 1.0
            self.assertAllClose(after[path] - start[path],
                                factor * (expected[path] - start[path]),
                                atol=1e-6)

    def test_schedule_base_steps_at_the_factor_of_the_rate_of_its_step(self):
        # One step per epoch; step t of a plain SGD from the same weights
        # at the schedule's rate of step t (by hand: 0.1 * 0.5**t).
        schedule = keras.optimizers.schedules.ExponentialDecay(
            0.1, decay_steps=1, decay_rate=0.5)
        base, model = make_model(keras.optimizers.SGD(schedule),
                                 batch_normalization=False)
        recorder = Recorder()
        model.fit(X, Y, batch_size=32, epochs=3, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=0, base_learning_rate_factor=0.5),
            recorder])
        self.assert_base_steps_at_half(
            recorder, [0.1 * 0.5 ** step for step in range(3)])

    def assert_base_steps_at_half(self, recorder, rates):
        """Each epoch's step (one batch) of the head equals plain SGD's at
        that epoch's rate, and the base's half of it."""
        for step, (before, after) in enumerate(
                zip(recorder.epochs, recorder.epochs[1:])):
            expected = plain_step(before, keras.optimizers.SGD(rates[step]))
            for path in before:
                factor = 0.5 if path.startswith("base/") else 1.0
                self.assertAllClose(after[path] - before[path],
                                    factor * (expected[path] - before[path]),
                                    atol=1e-6, msg=f"step {step} {path}")

    def test_learning_rate_callback_sets_the_base_rate_too(self):
        rates = [0.1, 0.05, 0.02]
        base, model = make_model(keras.optimizers.SGD(0.3),
                                 batch_normalization=False)
        recorder = Recorder()
        model.fit(X, Y, batch_size=32, epochs=3, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=0, base_learning_rate_factor=0.5),
            keras.callbacks.LearningRateScheduler(lambda epoch: rates[epoch]),
            recorder])
        self.assert_base_steps_at_half(recorder, rates)

    def test_second_fit_uses_its_own_callback(self):
        base, model = make_model(keras.optimizers.SGD(0.1),
                                 batch_normalization=False)
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=0, base_learning_rate_factor=0.1)])
        start = weights(model)
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=0, base_learning_rate_factor=1.0)])
        expected = plain_step(start, keras.optimizers.SGD(0.1))
        for path, value in expected.items():
            self.assertAllClose(weights(model)[path], value, atol=1e-6,
                                msg=path)

    def test_plain_fit_afterwards_is_the_compiled_optimizer(self):
        optimizer = keras.optimizers.Adam(1e-2)
        base, model = make_model(optimizer, batch_normalization=False)
        model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=1, base_learning_rate_factor=0.1)])
        self.assertIs(model.optimizer, optimizer)
        self.assertEqual(int(self.to_numpy(optimizer.iterations)), 2)
        # A plain Keras model with these weights and this optimizer state.
        start = weights(model)
        _, reference = make_model(keras.optimizers.Adam(1e-2),
                                  batch_normalization=False)
        set_weights(reference, start)
        reference.optimizer.build(reference.trainable_variables)
        for mine, theirs in zip(optimizer.variables,
                                reference.optimizer.variables):
            theirs.assign(self.to_numpy(mine))
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        reference.fit(X, Y, batch_size=32, epochs=1, verbose=0,
                      shuffle=False)
        for path, value in weights(reference).items():
            self.assertAllClose(weights(model)[path], value, atol=1e-6,
                                msg=path)

    def test_base_optimizer_state_is_kept_for_a_plain_fit(self):
        # Factor 1 from the first epoch is a plain fit; the plain fit after
        # it continues the base's moments: both equal one plain fit.
        base, model = make_model(keras.optimizers.Adam(1e-2),
                                 batch_normalization=False)
        start = weights(model)
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0, shuffle=False,
                  callbacks=[FineTuning(base, freeze_epochs=0,
                                        base_learning_rate_factor=1.0)])
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        expected = plain_step(start, keras.optimizers.Adam(1e-2), epochs=2,
                              batch_size=16)
        for path, value in expected.items():
            self.assertAllClose(weights(model)[path], value, atol=1e-6,
                                msg=path)

    def test_early_stopping_in_the_frozen_stage_restores_the_flags(self):
        base, model = make_model()
        before = trainable_flags(model)
        stopper = EarlyStopping(monitor="loss", baseline=-1.0, patience=1)
        model.fit(X, Y, batch_size=8, epochs=6, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=4), stopper])
        self.assertLess(stopper.stopped_epoch, 4)
        self.assertEqual(trainable_flags(model), before)
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        model.save(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = keras.models.load_model(path)
        self.assertEqual([str(w.message) for w in caught], [])
        self.assertEqual(trainable_flags(loaded), before)
        self.assertAllClose(loaded.predict(X, verbose=0),
                            model.predict(X, verbose=0))
        for mine, theirs in zip(model.optimizer.variables,
                                loaded.optimizer.variables):
            self.assertAllEqual(theirs, mine)

    def test_a_base_frozen_before_fit_is_frozen_after(self):
        base, model = make_model()
        base.trainable = False
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        before = trainable_flags(model)
        recorder = Recorder()
        model.fit(X, Y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[FineTuning(base), recorder])
        self.assertEqual(changed(recorder.epochs[1], recorder.epochs[2]),
                         ["b1", "b2", "b3", "head"])
        self.assertEqual(trainable_flags(model), before)
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        model.save(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keras.models.load_model(path)
        self.assertEqual([str(w.message) for w in caught], [])

    def assertStepsAtFactor(self, before, after, expected, factor, base):
        """`after - before` is `factor` times the plain step to `expected`
        for the weights of `base`, the plain step for the others."""
        base_paths = {v.path for v in base.weights}
        for path in before:
            scale = factor if path in base_paths else 1.0
            self.assertAllClose(after[path] - before[path],
                                scale * (expected[path] - before[path]),
                                atol=1e-6, msg=path)

    def test_clipped_optimizer_clips_base_and_head_together(self):
        # Global-norm clipping over every gradient, as a plain model with
        # Keras's global_clipnorm (the gradient's norm is about 5).
        for name, optimizer in (
                ("ClippedOptimizer", ClippedOptimizer(
                    keras.optimizers.SGD(0.1), global_clipnorm=0.05)),
                ("SGD(global_clipnorm)", keras.optimizers.SGD(
                    0.1, global_clipnorm=0.05))):
            with self.subTest(name):
                base, model = make_model(optimizer,
                                         batch_normalization=False)
                start = weights(model)
                model.fit(X, Y, batch_size=32, epochs=1, verbose=0,
                          callbacks=[FineTuning(
                              base, freeze_epochs=0,
                              base_learning_rate_factor=0.5)])
                self.assertIs(model.optimizer, optimizer)
                expected = plain_step(start, keras.optimizers.SGD(
                    0.1, global_clipnorm=0.05))
                self.assertStepsAtFactor(start, weights(model), expected,
                                         0.5, base)

    def test_mixed_precision_loss_scale_optimizer(self):
        with self.mixed_precision("mixed_float16"):
            base, model = make_model(keras.optimizers.SGD(0.1),
                                     batch_normalization=False)
            self.assertIsInstance(model.optimizer,
                                  keras.optimizers.LossScaleOptimizer)
            start = weights(model)
            model.fit(X, Y, batch_size=32, epochs=1, verbose=0, callbacks=[
                FineTuning(base, freeze_epochs=0,
                           base_learning_rate_factor=0.5)])
            expected = plain_step(start, keras.optimizers.SGD(0.1))
        after = weights(model)
        self.assertFalse(np.array_equal(after["model/head/kernel"],
                                        start["model/head/kernel"]))
        for path in start:
            scale = 0.5 if path.startswith("base/") else 1.0
            self.assertAllClose(after[path] - start[path],
                                scale * (expected[path] - start[path]),
                                atol=1e-4, rtol=2e-3, msg=path)

    def test_nested_conv_base_in_a_functional_model(self):
        base, model = make_conv_model(keras.optimizers.SGD(0.1))
        x = RNG.normal(size=(16, 5, 5, 1)).astype("float32")
        y = RNG.normal(size=(16, 1)).astype("float32")
        recorder = Recorder()
        model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=1, unfreeze_steps=2,
                       base_learning_rate_factor=0.5), recorder])
        steps = [changed(a, b) for a, b in
                 zip(recorder.epochs, recorder.epochs[1:])]
        self.assertEqual(steps, [["head"], ["b2", "head"],
                                 ["b2", "conv", "head"]])
        before, after = recorder.epochs[2], recorder.epochs[3]
        expected = plain_step(before, keras.optimizers.SGD(0.1),
                              batch_size=16, make=make_conv_model, x=x, y=y)
        self.assertStepsAtFactor(before, after, expected, 0.5, base)

    def test_reused_callback_and_evaluate_predict_with_it(self):
        base, model = make_model()
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0)
        optimizer = model.optimizer
        state = [self.to_numpy(v).copy() for v in optimizer.variables]
        before = trainable_flags(model)
        callback = FineTuning(base)
        predictions = model.predict(X, verbose=0, callbacks=[callback])
        model.evaluate(X, Y, verbose=0, callbacks=[callback])
        self.assertIs(model.optimizer, optimizer)
        self.assertEqual(trainable_flags(model), before)
        for variable, value in zip(optimizer.variables, state):
            self.assertAllEqual(variable, value)
        for _ in range(2):
            recorder = Recorder()
            model.fit(X, Y, batch_size=32, epochs=2, verbose=0,
                      callbacks=[callback, recorder])
            self.assertEqual([changed(a, b) for a, b in zip(
                recorder.epochs, recorder.epochs[1:])],
                [["head"], ["b1", "b2", "b3", "head"]])
            self.assertIs(model.optimizer, optimizer)
            self.assertEqual(trainable_flags(model), before)
        model.evaluate(X, Y, verbose=0, callbacks=[callback])
        self.assertIs(model.optimizer, optimizer)
        self.assertEqual(trainable_flags(model), before)
        _, reference = make_model()
        set_weights(reference, weights(model))
        self.assertAllClose(model.predict(X, verbose=0, callbacks=[callback]),
                            reference.predict(X, verbose=0))
        self.assertFalse(np.allclose(predictions,
                                     reference.predict(X, verbose=0)))

    def test_resumed_mid_stage_equals_uninterrupted(self):
        def callbacks(folder):
            return [FineTuning(base),
                    BackupAndRestore(folder)]

        base, model = make_model()
        model.fit(X, Y, batch_size=8, epochs=3, verbose=0, shuffle=False,
                  callbacks=callbacks(tempfile.mkdtemp()))
        expected = weights(model)
        base, model = make_model()
        folder = tempfile.mkdtemp()
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            model.fit(X, Y, batch_size=8, epochs=3, verbose=0,
                      shuffle=False,
                      callbacks=callbacks(folder) + [InterruptAt(2, 2)])
        self.assertTrue(os.path.exists(
            os.path.join(folder, "kreg_fine_tuning.npz")))
        # Resumed in the same process: the interrupted fit's optimizer and
        # frozen layers are still in the model.
        model.fit(X, Y, batch_size=8, epochs=3, verbose=0, shuffle=False,
                  callbacks=callbacks(folder))
        for path, value in expected.items():
            self.assertAllEqual(weights(model)[path], value, msg=path)

    def test_early_stopping_restores_the_best_epoch(self):
        # Validation targets of the opposite sign: the best epoch is the
        # first (frozen); the second (unfrozen) is worse and stops the fit.
        base, model = make_model()
        before = trainable_flags(model)
        recorder = Recorder()
        stopper = EarlyStopping(patience=1, restore_best_weights=True)
        model.fit(X, Y, batch_size=8, epochs=5, verbose=0,
                  validation_data=(X, -Y), callbacks=[
                      FineTuning(base), recorder, stopper])
        self.assertEqual((stopper.best_epoch, stopper.stopped_epoch), (0, 1))
        self.assertEqual(changed(recorder.epochs[1], recorder.epochs[2]),
                         ["b1", "b2", "b3", "head"])
        for path, value in recorder.epochs[1].items():
            self.assertAllEqual(weights(model)[path], value, msg=path)
        self.assertEqual(trainable_flags(model), before)

    def test_ema_listed_before_or_after(self):
        # The EMA's average of the raw weights after each step, by hand; the
        # raw weights those of a fit without the EMA.
        base, model = make_model()
        alone = Recorder()
        model.fit(X, Y, batch_size=32, epochs=2, verbose=0, callbacks=[
            FineTuning(base), alone])
        for ema_first in (True, False):
            with self.subTest(ema_first=ema_first):
                base, model = make_model()
                ema, recorder = EMA(decay=0.5), Recorder()
                callbacks = [FineTuning(base), ema]
                if ema_first:
                    callbacks.reverse()
                model.fit(X, Y, batch_size=32, epochs=2, verbose=0,
                          callbacks=[recorder] + callbacks)
                shadow = dict(alone.epochs[0])
                for raw, expected in zip(recorder.epochs, alone.epochs):
                    for path, value in expected.items():
                        self.assertAllClose(raw[path], value, atol=1e-6)
                        if "moving" not in path:
                            shadow[path] = 0.5 * shadow[path] + 0.5 * value
                for path, value in weights(model).items():
                    if "moving" not in path:
                        self.assertAllClose(value, shadow[path], atol=1e-6,
                                            msg=path)

    def test_adam_starts_afresh_for_the_base(self):
        # Adam's first step moves each weight by lr (|g| >> epsilon); a base
        # sharing the head's step count would move by about 3 lr.
        base, model = make_model(keras.optimizers.Adam(1e-2),
                                 batch_normalization=False)
        recorder = Recorder()
        model.fit(X, Y, batch_size=32, epochs=4, verbose=0, callbacks=[
            FineTuning(base, freeze_epochs=3, base_learning_rate_factor=0.5),
            recorder])
        before, after = recorder.epochs[3], recorder.epochs[4]
        step = np.abs(after["base/b3/kernel"] - before["base/b3/kernel"])
        self.assertAllClose(np.median(step), 0.5 * 1e-2, rtol=1e-2)

    def test_a_state_of_another_model_is_refused_naming_the_file(self):
        folder = tempfile.mkdtemp()
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            base, model = make_model()
            model.fit(X, Y, batch_size=8, epochs=4, verbose=0, callbacks=[
                FineTuning(base), BackupAndRestore(folder), Interrupt(2)])
        # Batch normalization trained too: more base optimizer values.
        base, model = make_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras's optimizer mismatch
            with self.assertRaisesRegex(ValueError, "kreg_fine_tuning.npz"):
                model.fit(X, Y, batch_size=8, epochs=4, verbose=0,
                          callbacks=[FineTuning(
                              base, freeze_batch_normalization=False),
                              BackupAndRestore(folder)])

    def test_resumed_without_a_kreg_backup_warns(self):
        base, model = make_model()
        with self.assertWarnsRegex(UserWarning, "epoch 2.*starts over"):
            model.fit(X, Y, batch_size=8, epochs=3, initial_epoch=2,
                      verbose=0, callbacks=[FineTuning(base)])
        base, model = make_model()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="FineTuning")
            model.fit(X, Y, batch_size=8, epochs=1, verbose=0,
                      callbacks=[FineTuning(base)])

    def test_ema_and_gradient_monitor_in_every_stage(self):
        base, model = make_model()
        ema, monitor = EMA(decay=0.9), GradientMonitor(frequency=1)
        seen = []

        class Layers(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                seen.append(sorted(monitor.layer_norms))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(X, Y, batch_size=8, epochs=3, verbose=0,
                                callbacks=[FineTuning(base, unfreeze_steps=3),
                                           ema, monitor, Layers()])
        self.assertEqual(
            [w for w in caught if "GradientMonitor" in str(w.message)], [])
        self.assertEqual(len(history.history["grad_norm"]), 3)
        self.assertEqual(seen, [["model/head"], ["base/b3", "model/head"],
                                ["base/b2", "base/b3", "model/head"]])
        self.assertEqual(ema.steps, 12)
        # b1, frozen throughout, is its own average; b3 trained and is not.
        averaged = dict(zip([w.path for w in model.weights],
                            ema.raw_model_weights()))
        current = weights(model)
        self.assertAllEqual(averaged["base/b1/kernel"],
                            current["base/b1/kernel"])
        self.assertFalse(np.array_equal(averaged["base/b3/kernel"],
                                        current["base/b3/kernel"]))

    def test_save_and_load_after_fine_tuning(self):
        base, model = make_model()
        model.fit(X, Y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[FineTuning(base)])
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        model.save(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = keras.models.load_model(path)
        self.assertEqual([str(w.message) for w in caught], [])
        self.assertAllClose(loaded.predict(X, verbose=0),
                            model.predict(X, verbose=0))
        # The optimizer state came back: a plain fit of each goes on alike.
        for each in (model, loaded):
            each.fit(X, Y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        for mine, theirs in zip(model.weights, loaded.weights):
            self.assertAllClose(theirs, mine, atol=1e-6)

    def test_base_by_name_and_config(self):
        base, model = make_model()
        callback = FineTuning("base", freeze_epochs=1)
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[callback])
        self.assertEqual(callback.get_config()["base"], "base")
        self.assertEqual(FineTuning.from_config(callback.get_config())
                         .get_config(), callback.get_config())

    def test_bad_arguments(self):
        for kwargs, error, pattern in (
                ({"base": 3}, TypeError, "`base`.*base=3"),
                ({"base": "b", "freeze_epochs": -1}, ValueError,
                 "freeze_epochs=-1"),
                ({"base": "b", "unfreeze_steps": 0}, ValueError,
                 "unfreeze_steps=0"),
                ({"base": "b", "epochs_per_step": 1.5}, TypeError,
                 "epochs_per_step=1.5"),
                ({"base": "b", "base_learning_rate_factor": 0.0}, ValueError,
                 "base_learning_rate_factor=0.0"),
                ({"base": "b", "freeze_batch_normalization": "yes"},
                 TypeError, "freeze_batch_normalization")):
            with self.subTest(**{k: repr(v) for k, v in kwargs.items()}):
                with self.assertRaisesRegex(error, pattern):
                    FineTuning(**kwargs)
        _, model = make_model()
        with self.assertRaisesRegex(ValueError, "no layer named 'nope'"):
            model.fit(X, Y, epochs=1, verbose=0,
                      callbacks=[FineTuning("nope")])
        _, model = make_model()
        with self.assertRaisesRegex(ValueError, "unfreeze_steps=9"):
            model.fit(X, Y, epochs=1, verbose=0,
                      callbacks=[FineTuning("base", unfreeze_steps=9)])
        other, _ = make_model()
        base, model = make_model()
        with self.assertRaisesRegex(ValueError, "not weights of the fitted"):
            model.fit(X, Y, epochs=1, verbose=0,
                      callbacks=[FineTuning(other)])
        base, model = make_model(batch_normalization=False)
        model.compile(FineTuningOptimizer(keras.optimizers.SGD(), [0]),
                      "mse")
        with self.assertRaisesRegex(ValueError, "compiled with a Fine"):
            model.fit(X, Y, epochs=1, verbose=0,
                      callbacks=[FineTuning(base)])
        # An EMA listed first, its optimizer built without the frozen base.
        base, model = make_model()
        base.trainable = False
        model.compile(keras.optimizers.Adam(), "mse")
        before = trainable_flags(model)
        with self.assertRaisesRegex(ValueError, "list FineTuning first"):
            model.fit(X, Y, epochs=1, verbose=0,
                      callbacks=[EMA(), FineTuning(base)])
        self.assertEqual(trainable_flags(model), before)


class FineTuningOptimizerTest(TestCase):
    def test_compiled_directly_saves_and_loads(self):
        base, model = make_model(batch_normalization=False)
        indices = list(range(len(base.trainable_variables)))
        optimizer = FineTuningOptimizer(keras.optimizers.Adam(1e-2), indices,
                                        base_learning_rate_factor=0.5)
        model.compile(optimizer, "mse")
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded.optimizer, FineTuningOptimizer)
        self.assertEqual(loaded.optimizer.get_config()["base_indices"],
                         indices)
        self.assertEqual(
            loaded.optimizer.get_config()["base_learning_rate_factor"], 0.5)
        self.assertAllClose(loaded.predict(X, verbose=0),
                            model.predict(X, verbose=0))
        # The base optimizer's step count came back with the state.
        self.assertEqual(int(keras.ops.convert_to_numpy(
            loaded.optimizer.base_optimizer.iterations)), 4)

    def test_apply_without_variables_before_build(self):
        optimizer = FineTuningOptimizer(keras.optimizers.SGD())
        with self.assertRaisesRegex(ValueError, "trainable_variables=None"):
            optimizer.apply([np.zeros((2,), "float32")])
