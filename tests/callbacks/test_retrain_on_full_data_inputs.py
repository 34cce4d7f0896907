"""RetrainOnFullData with the kinds of data ``fit`` takes: several outputs,
sample and class weights, endless datasets, PyDataset; and the checks that
fail before phase 1 trains. Phase 2 is compared with a hand-run phase 2: a
fresh model (same initial weights) fit on the full data for best_epoch + 1
epochs with the same arguments."""

import contextlib
import io
import warnings

import keras
import numpy as np
import pytest

from kreg.callbacks import EarlyStopping
from kreg.callbacks import RetrainOnFullData
from kreg.testing import TestCase
from tests.callbacks.test_retrain_on_full_data import RetrainData


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = []  # batches per epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.batches[-1] += 1


class Batches(keras.utils.PyDataset):
    """The full data as a PyDataset of batches of 16."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return int(np.ceil(len(self.x) / 16))

    def __getitem__(self, index):
        part = slice(16 * index, 16 * (index + 1))
        return self.x[part], self.y[part]


class RetrainInputsTest(RetrainData, TestCase):
    def hand_run_phase_2(self, epochs, model=None, **fit_kwargs):
        """Phase 2 by hand: the initial weights, a fresh optimizer."""
        model = model or self.model()
        model.fit(self.x_full, self.y_full, batch_size=16, epochs=epochs,
                  shuffle=False, verbose=0, **fit_kwargs)
        return model.get_weights()

    def assert_weights_equal(self, got, expected):
        for a, b in zip(got, expected):
            self.assertAllClose(a, b, atol=1e-6)

    def test_several_outputs_as_dict_and_list(self):
        def model(kind):
            keras.utils.set_random_seed(3)
            inputs = keras.Input((3,))
            a = keras.layers.Dense(1, name="a")(inputs)
            b = keras.layers.Dense(1, name="b")(inputs)
            outputs = {"a": a, "b": b} if kind == "dict" else [a, b]
            model = keras.Model(inputs, outputs)
            model.compile(optimizer=keras.optimizers.SGD(0.02),
                          loss={"a": "mse", "b": "mse"} if kind == "dict"
                          else ["mse", "mse"])
            return model

        def targets(kind, y, y_b=None):
            y_b = 2 * y if y_b is None else y_b
            return {"a": y, "b": y_b} if kind == "dict" else [y, y_b]

        for kind in ("dict", "list"):
            with self.subTest(kind=kind):
                stop = EarlyStopping(patience=2)
                retrain = RetrainOnFullData(
                    self.x_full, targets(kind, self.y_full), batch_size=16,
                    shuffle=False)
                trained = model(kind)
                trained.fit(self.x, targets(kind, self.y), batch_size=16,
                            epochs=30, shuffle=False, verbose=0,
                            validation_data=(self.xv, targets(kind, self.yv)),
                            callbacks=[stop, retrain])
                self.assertEqual(retrain.retrain_epochs, stop.best_epoch + 1)
                hand = model(kind)
                hand.fit(self.x_full, targets(kind, self.y_full),
                         batch_size=16, epochs=stop.best_epoch + 1,
                         shuffle=False, verbose=0)
                self.assert_weights_equal(trained.get_weights(),
                                          hand.get_weights())
                with self.assertRaisesRegex(ValueError, r"`y`.*\[64, 5\]"):
                    trained.fit(
                        self.x, targets(kind, self.y), epochs=1, verbose=0,
                        validation_data=(self.xv, targets(kind, self.yv)),
                        callbacks=[EarlyStopping(), RetrainOnFullData(
                            self.x_full,
                            targets(kind, self.y_full, self.y_full[:5]))])

    def test_sample_weight_and_class_weight_reach_phase_2(self):
        rng = np.random.RandomState(5)
        weights = rng.uniform(0.1, 3.0, size=len(self.x_full)).astype(
            "float32")
        stop = EarlyStopping(patience=2)
        retrain = RetrainOnFullData(self.x_full, self.y_full, batch_size=16,
                                    shuffle=False, sample_weight=weights)
        model = self.model()
        self.fit(model, [stop, retrain])
        epochs = stop.best_epoch + 1
        self.assert_weights_equal(
            model.get_weights(),
            self.hand_run_phase_2(epochs, sample_weight=weights))
        unweighted = self.hand_run_phase_2(epochs)
        self.assertGreater(np.abs(model.get_weights()[0]
                                  - unweighted[0]).max(), 1e-4)

        # class_weight, on a classifier.
        labels = (self.y_full[:, 0] > 0).astype("int32")
        class_weight = {0: 1.0, 1: 4.0}

        def classifier():
            keras.utils.set_random_seed(3)
            model = keras.Sequential([keras.Input((3,)),
                                      keras.layers.Dense(2)])
            model.compile(
                optimizer=keras.optimizers.SGD(0.05),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
            return model

        stop = EarlyStopping(patience=2)
        retrain = RetrainOnFullData(self.x_full, labels, batch_size=16,
                                    shuffle=False, class_weight=class_weight)
        model = classifier()
        model.fit(self.x, labels[:48], batch_size=16, epochs=30,
                  shuffle=False, verbose=0, class_weight=class_weight,
                  validation_data=(self.xv, labels[48:]),
                  callbacks=[stop, retrain])
        hand = classifier()
        hand.fit(self.x_full, labels, batch_size=16,
                 epochs=stop.best_epoch + 1, shuffle=False, verbose=0,
                 class_weight=class_weight)
        self.assert_weights_equal(model.get_weights(), hand.get_weights())

    def test_endless_dataset_needs_steps_per_epoch(self):
        tf = pytest.importorskip("tensorflow")
        endless = tf.data.Dataset.from_tensor_slices(
            (self.x_full, self.y_full)).batch(16).repeat()
        with self.assertRaisesRegex(ValueError, "steps_per_epoch=None"):
            RetrainOnFullData(endless)
        count = CountBatches()
        stop = EarlyStopping(patience=2)
        retrain = RetrainOnFullData(endless, steps_per_epoch=3,
                                    callbacks=[count])
        self.fit(self.model(), [stop, retrain])
        self.assertEqual(count.batches, [3] * (stop.best_epoch + 1))
        # length="steps": phase 1's steps to its best epoch (3 per epoch)
        # in phase-2 epochs of 3 steps.
        stop = EarlyStopping(patience=2)
        retrain = RetrainOnFullData(endless, steps_per_epoch=3,
                                    length="steps")
        self.fit(self.model(), [stop, retrain])
        self.assertEqual(retrain.retrain_epochs, stop.best_epoch + 1)

    def test_py_dataset_and_one_pass_generators(self):
        count = CountBatches()
        stop = EarlyStopping(patience=2)
        retrain = RetrainOnFullData(Batches(self.x_full, self.y_full),
                                    length="steps", callbacks=[count])
        self.fit(self.model(), [stop, retrain])
        # Phase 1: 3 batches per epoch; the full data: 4.
        epochs = max(1, round((stop.best_epoch + 1) * 3 / 4))
        self.assertEqual(count.batches, [4] * epochs)
        generator = ((self.x_full[i:i + 16], self.y_full[i:i + 16])
                     for i in range(0, 64, 16))
        with self.assertRaisesRegex(TypeError, "generator or iterator"):
            RetrainOnFullData(generator)

    def test_batched_data_gets_no_ignored_shuffle_warning(self):
        sources = {"PyDataset": lambda: Batches(self.x_full, self.y_full)}
        try:
            import tensorflow as tf

            sources["tf.data"] = lambda: tf.data.Dataset.from_tensor_slices(
                (self.x_full, self.y_full)).batch(16)
        except ImportError:
            pass
        if keras.backend.backend() == "torch":
            import torch

            sources["DataLoader"] = lambda: torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(
                    torch.tensor(self.x_full), torch.tensor(self.y_full)),
                batch_size=16)
        for name, make in sources.items():
            with self.subTest(name), warnings.catch_warnings(
                    record=True) as caught:
                warnings.simplefilter("always")
                count = CountBatches()
                self.fit(self.model(), [EarlyStopping(patience=2),
                                        RetrainOnFullData(
                                            make(), callbacks=[count])])
                self.assertGreater(len(count.batches), 0)
                self.assertEqual([str(w.message) for w in caught
                                  if "shuffle" in str(w.message)], [])

    def test_phase_2_reuses_the_train_function(self):
        class TrainFunction(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seen = []

            def on_epoch_begin(self, epoch, logs=None):
                self.seen.append(self.model.train_function)

        outer, inner = TrainFunction(), TrainFunction()
        self.fit(self.model(), [outer, EarlyStopping(patience=2),
                                RetrainOnFullData(self.x_full, self.y_full,
                                                  batch_size=16,
                                                  callbacks=[inner])])
        self.assertGreater(len(inner.seen), 0)
        for function in outer.seen + inner.seen:
            self.assertIs(function, outer.seen[0])

    def test_data_that_does_not_fit_fails_before_phase_1_trains(self):
        tf = pytest.importorskip("tensorflow")
        wrong = {
            "too few features": tf.data.Dataset.from_tensor_slices(
                (self.x_full[:, :2], self.y_full)).batch(16),
            "no targets": tf.data.Dataset.from_tensor_slices(
                self.x_full).batch(16),
            "unbatched": tf.data.Dataset.from_tensor_slices(
                (self.x_full, self.y_full)),
        }
        for name, dataset in wrong.items():
            with self.subTest(name):
                count = CountBatches()
                with self.assertRaisesRegex(ValueError,
                                            "does not fit the model"):
                    self.fit(self.model(), [
                        count, EarlyStopping(), RetrainOnFullData(dataset)])
                self.assertEqual(count.batches, [])
        # No EarlyStopping: the error comes when the first epoch begins.
        count = CountBatches()
        with self.assertRaisesRegex(ValueError, "needs a kreg.callbacks"):
            self.fit(self.model(), [
                count, RetrainOnFullData(self.x_full, self.y_full)])
        self.assertEqual(count.batches, [0])

    def test_continue_with_weighted_validation_part(self):
        # (x, y, sample_weight) as the validation part of algorithm 7.3:
        # zero weights on the part's second half leave only the first half
        # (Keras divides the weighted sum by the batch size: half of the
        # first half's mean, in one batch of 16).
        weights = np.repeat([1.0, 0.0], 8).astype("float32")
        parts = {
            "weighted": (self.xv, 2 * self.yv, weights),
            "first half": (self.xv[:8], 2 * self.yv[:8]),
        }
        results = {}
        for name, part in parts.items():
            stop = EarlyStopping(patience=2, restore_best_weights=True)
            retrain = RetrainOnFullData(
                self.x_full, self.y_full, algorithm="continue",
                batch_size=16, validation_data=part, max_epochs=4,
                shuffle=False)
            self.fit(self.model(), [stop, retrain])
            results[name] = retrain.retrain_history.history["val_part_loss"]
        weighted = results["weighted"]
        self.assertAllClose(
            weighted, 0.5 * np.array(results["first half"][:len(weighted)]),
            rtol=1e-5)

    def test_one_early_stopping_and_its_messages_once(self):
        with self.assertRaisesRegex(ValueError, "has 2 .*'val_loss', 'loss'"):
            self.fit(self.model(), [
                EarlyStopping(), EarlyStopping(monitor="loss"),
                RetrainOnFullData(self.x_full, self.y_full, batch_size=16)])
        # Keras's EarlyStopping beside kreg's is fine.
        stop = EarlyStopping(patience=2, restore_best_weights=True,
                             verbose=1)
        retrain = RetrainOnFullData(self.x_full, self.y_full, batch_size=16)
        for order in ("stop first", "retrain first"):
            with self.subTest(order):
                out = io.StringIO()
                callbacks = [stop, retrain, keras.callbacks.EarlyStopping(
                    monitor="loss", patience=50)]
                if order == "retrain first":
                    callbacks = callbacks[::-1]
                with contextlib.redirect_stdout(out):
                    self.fit(self.model(), callbacks)
                self.assertEqual(out.getvalue().count("early stopping"), 1)
                self.assertEqual(out.getvalue().count("Restoring model"), 1)

    def test_the_data_check_leaves_phase_1_alone(self):
        # The check runs a batch through the test step (a dropout sampling
        # at inference draws random numbers there) and takes a batch of the
        # data (a DataLoader's iterator draws its seed from PyTorch's
        # global generator): phase 1 must run as it would without it.
        import kreg

        def model():
            keras.utils.set_random_seed(3)
            model = keras.Sequential([
                keras.Input((3,)), keras.layers.Dense(8),
                kreg.layers.Dropout(0.3, seed=4, mc=True),
                keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
            return model

        full = [(self.x_full, self.y_full)]
        if keras.backend.backend() == "torch":
            import torch

            full.append((torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(
                    torch.tensor(self.x_full), torch.tensor(self.y_full)),
                batch_size=16), None))
        for x, y in full:
            with self.subTest(type(x).__name__):
                # With MC sampling on, the test step draws masks too.
                keras.utils.set_random_seed(7)
                m = model()
                with kreg.layers.mc_sampling(m):
                    alone = m.fit(
                        self.x, self.y, batch_size=16, epochs=3, verbose=0,
                        validation_data=(self.xv, self.yv)).history
                keras.utils.set_random_seed(7)
                m = model()
                with kreg.layers.mc_sampling(m):
                    both = m.fit(
                        self.x, self.y, batch_size=16, epochs=3, verbose=0,
                        validation_data=(self.xv, self.yv), callbacks=[
                            EarlyStopping(patience=5),
                            RetrainOnFullData(x, y, batch_size=16)]).history
                for key in ("loss", "val_loss"):
                    self.assertAllClose(both[key][:3], alone[key],
                                        rtol=1e-6)


class RetrainArgumentsTest(RetrainData, TestCase):
    """Bad phase-2 arguments fail at construction, not after phase 1."""

    def test_bad_callbacks_and_validation_data_fail_at_construction(self):
        cases = [
            ({"callbacks": "abc"}, "callbacks='abc'"),
            ({"callbacks": [None]}, r"callbacks=\[None\]"),
            ({"callbacks": 5}, "callbacks=5"),
            ({"validation_data": "v", "algorithm": "continue"},
             "validation_data='v'"),
            ({"validation_data": 5}, "validation_data=5"),
            ({"class_weight": "a"}, "class_weight='a'"),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(TypeError, message):
                RetrainOnFullData(self.x_full, self.y_full, **kwargs)
        with self.assertRaisesRegex(ValueError, "`validation_data`"):
            RetrainOnFullData(self.x_full, self.y_full,
                              validation_data=(self.xv,))
        with self.assertRaisesRegex(TypeError, "`x`.*x='abc'"):
            RetrainOnFullData("abc", self.y_full)

    def test_numpy_integers_run_both_phases(self):
        model = self.model()
        stop = EarlyStopping(patience=2, restore_best_weights=True)
        retrain = RetrainOnFullData(
            self.x_full, self.y_full, batch_size=np.int64(16),
            algorithm="continue", validation_data=(self.xv, self.yv),
            max_epochs=np.int64(3), steps_per_epoch=np.int32(4))
        self.assertEqual(retrain.get_config()["max_epochs"], 3)
        self.assertIs(type(retrain.get_config()["batch_size"]), int)
        self.fit(model, [stop, retrain], epochs=8)
        self.assertLessEqual(retrain.retrain_epochs, 3)
