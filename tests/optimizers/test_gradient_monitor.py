"""Tests of the gradient-health logs (kreg.callbacks.GradientMonitor)."""

import os
import tempfile
import warnings

import keras
import numpy as np

from kreg.callbacks.gradient_monitor import GradientMonitor
from kreg.optimizers import ClippedOptimizer
from kreg.testing import TestCase


def linear_data(n=48, d=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, d).astype("float32")
    y = rng.randn(n, 1).astype("float32")
    return x, y


def linear_model(d=3):
    return keras.Sequential([
        keras.Input((d,)),
        keras.layers.Dense(
            1, kernel_initializer=keras.initializers.Constant(0.5),
            bias_initializer=keras.initializers.Constant(0.1),
        ),
    ])


def numpy_linear_grad_norm(x, y, w=0.5, b=0.1):
    """Global gradient norm of mean((x w + b - y)^2) w.r.t. (w, b)."""
    residual = x @ np.full((x.shape[1], 1), w) + b - y
    grad_w = 2.0 / len(x) * x.T @ residual
    grad_b = 2.0 / len(x) * residual.sum()
    return np.sqrt(np.sum(grad_w ** 2) + grad_b ** 2)


class GradientMonitorTest(TestCase):
    def _fit(self, model, optimizer, x, y, monitor, epochs=2, batch_size=16):
        model.compile(optimizer=optimizer, loss="mse",
                      jit_compile=self.jit_compile_setting())
        return model.fit(x, y, batch_size=batch_size, epochs=epochs,
                         verbose=0, shuffle=False, callbacks=[monitor])

    def test_history_has_grad_norm_and_counts(self):
        x, y = linear_data()
        # Learning rate 0: the weights stay put, so each step's gradient is
        # the NumPy gradient of its batch at the initial weights.
        expected = np.mean([
            numpy_linear_grad_norm(x[i:i + 16], y[i:i + 16])
            for i in range(0, 48, 16)
        ])
        opt = ClippedOptimizer(keras.optimizers.SGD(0.0),
                               global_clipnorm=1e-3)
        history = self._fit(linear_model(), opt, x, y,
                            GradientMonitor(frequency=2))
        logs = history.history
        self.assertAllClose(logs["grad_norm"], [expected] * 2, rtol=1e-4)
        self.assertEqual(logs["clipped_steps"], [3, 3])
        self.assertEqual(logs["skipped_steps"], [0, 0])

    def test_counts_skipped_and_unclipped_steps(self):
        x, y = linear_data()
        x[20, 1] = np.inf  # second batch
        opt = ClippedOptimizer(keras.optimizers.SGD(0.0), clipnorm=1e6)
        monitor = GradientMonitor(frequency=2, warn=False)
        history = self._fit(linear_model(), opt, x, y, monitor)
        logs = history.history
        self.assertEqual(logs["clipped_steps"], [0, 0])
        self.assertEqual(logs["skipped_steps"], [1, 1])
        clean = [numpy_linear_grad_norm(x[i:i + 16], y[i:i + 16])
                 for i in (0, 32)]
        self.assertAllClose(logs["grad_norm"], [np.mean(clean)] * 2,
                            rtol=1e-4)
        # Samples: every second batch, plus each epoch's end.
        where = [(epoch, batch) for epoch, batch, _ in monitor.history]
        self.assertEqual(where, [(0, 1), (0, None), (1, 0), (1, None)])
        layer = "sequential/dense"
        self.assertFalse(np.isfinite(monitor.history[0][2][layer]))
        self.assertAllClose(monitor.history[2][2][layer], clean[0],
                            rtol=1e-4)
        self.assertAllClose(monitor.history[3][2][layer], clean[1],
                            rtol=1e-4)
        self.assertIn((0, 1, layer, "non-finite"),
                      [f[:4] for f in monitor.flagged])

    def test_flags_vanishing_and_exploding_layers_by_name(self):
        rng = np.random.RandomState(0)
        x = (1e4 * rng.randn(32, 4)).astype("float32")
        y = rng.randn(32, 1).astype("float32")
        model = keras.Sequential([
            keras.Input((4,)),
            keras.layers.Dense(4, name="big_inputs"),
            keras.layers.Dense(4, name="middle"),
            keras.layers.Dense(1, kernel_initializer="zeros", name="head"),
        ])
        monitor = GradientMonitor(frequency=1, vanishing_threshold=1e-9,
                                  exploding_threshold=1e3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._fit(model, ClippedOptimizer(keras.optimizers.SGD(0.0)),
                      x, y, monitor, epochs=3)
        ours = [w for w in caught if "GradientMonitor" in str(w.message)]
        messages = [str(w.message) for w in ours]
        # One line each, attributed to the code that called fit (here the
        # `_fit` helper of this file), with Keras's 1-based epoch and step.
        for w in ours:
            self.assertNotIn("\n", str(w.message))
            self.assertEqual(os.path.abspath(w.filename),
                             os.path.abspath(__file__))
            self.assertIn("in epoch 1, step 1", str(w.message))
        # The zero head passes no gradient back: earlier layers vanish.
        self.assertTrue(any(
            "vanishing gradients in layer 'sequential/big_inputs'" in m
                            for m in messages), messages)
        self.assertTrue(any(
            "vanishing gradients in layer 'sequential/middle'" in m
                            for m in messages), messages)
        # The head's own gradient sees inputs of size ~1e4: it explodes.
        self.assertTrue(any(
            "exploding gradients in layer 'sequential/head'" in m
                            for m in messages), messages)
        # One warning per layer and kind per fit, although sampled every
        # batch of 3 epochs; `flagged` keeps one entry per epoch.
        self.assertEqual(len(messages), 3)
        self.assertEqual(len(monitor.flagged), 9)
        self.assertEqual(sorted({f[0] for f in monitor.flagged}), [0, 1, 2])
        # A second fit warns again.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      callbacks=[monitor])
        self.assertEqual(len([w for w in caught
                              if "GradientMonitor" in str(w.message)]), 3)
        self.assertEqual(
            set(monitor.layer_norms),
            {"sequential/big_inputs", "sequential/middle", "sequential/head"},
        )
        self.assertEqual(monitor.layer_norms["sequential/middle"], 0.0)

    def test_raise_mode_raises_after_the_batch(self):
        x, y = linear_data()
        x[5, 0] = np.nan
        opt = ClippedOptimizer(keras.optimizers.SGD(0.1),
                               on_non_finite="raise")
        with self.assertRaisesRegex(Exception, "non-finite gradient"):
            self._fit(linear_model(), opt, x, y, GradientMonitor(), epochs=1)

    def test_any_optimizer(self):
        x, y = linear_data()
        # Learning rate 0: each step's gradient is the NumPy gradient at
        # the initial weights (as with a ClippedOptimizer above).
        expected = np.mean([
            numpy_linear_grad_norm(x[i:i + 16], y[i:i + 16])
            for i in range(0, 48, 16)
        ])
        for optimizer in (keras.optimizers.SGD(0.0),
                          keras.optimizers.Adam(0.0)):
            with self.subTest(optimizer=type(optimizer).__name__):
                history = self._fit(linear_model(), optimizer, x, y,
                                    GradientMonitor(frequency=2))
                self.assertAllClose(history.history["grad_norm"],
                                    [expected] * 2, rtol=1e-4)
                # No clipping nor skipping to report without one.
                self.assertNotIn("clipped_steps", history.history)
        # The optimizer's updates are those without the monitor.
        models = []
        for callback in (GradientMonitor(), keras.callbacks.History()):
            models.append(linear_model())
            self._fit(models[-1], keras.optimizers.SGD(0.1, momentum=0.5),
                      x, y, callback)
        for a, b in zip(models[0].get_weights(), models[1].get_weights()):
            self.assertAllClose(a, b, atol=1e-6)

    def test_deep_sigmoid_network_with_plain_sgd(self):
        # The walkthrough's deep network: 8 sigmoid layers of 64 units,
        # weights N(0, 0.01^2), plain SGD: the first layers' gradients
        # vanish, and the warning names the first one.
        rng = np.random.RandomState(0)
        x = rng.rand(64, 16).astype("float32")
        y = rng.randint(0, 4, 64)
        keras.utils.set_random_seed(0)
        layers = [keras.Input((16,))]
        for _ in range(8):
            layers.append(keras.layers.Dense(
                64, activation="sigmoid",
                kernel_initializer=keras.initializers.RandomNormal(
                    stddev=0.01)))
        layers.append(keras.layers.Dense(4))
        model = keras.Sequential(layers)
        model.compile(keras.optimizers.SGD(0.01),
                      keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        monitor = GradientMonitor(frequency=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      callbacks=[monitor])
        norms = list(monitor.layer_norms.values())
        self.assertEqual(len(norms), 9)
        self.assertLess(norms[0], 1e-7)
        self.assertGreater(norms[-1], 1e-3)
        self.assertLess(norms[0], norms[4])
        first = model.layers[0].name
        self.assertTrue(any(
            "vanishing gradients in layer" in str(w.message)
            and first in str(w.message) for w in caught))

    def test_finds_the_wrapper_inside_a_loss_scale_optimizer(self):
        x, y = linear_data()
        # Small data keeps the scaled float16 gradients below overflow, so
        # every step reaches the wrapper (an overflowing step would be held
        # back by the LossScaleOptimizer, and `seen_steps` would say so).
        x, y = 0.25 * x, 0.25 * y
        opt = ClippedOptimizer(keras.optimizers.SGD(0.0))
        with self.mixed_precision("mixed_float16"):
            history = self._fit(linear_model(), opt, x, y, GradientMonitor(),
                                epochs=1)
        self.assertEqual(int(self.to_numpy(opt.seen_steps)), 3)
        expected = np.mean([numpy_linear_grad_norm(x[i:i + 16], y[i:i + 16])
                            for i in range(0, 48, 16)])
        # float16 forward pass: a looser tolerance.
        self.assertAllClose(history.history["grad_norm"], [expected],
                            rtol=1e-2)
        self.assertEqual(history.history["skipped_steps"], [0])

    def test_bad_arguments(self):
        cases = [
            (ValueError, "argument `frequency`.*Received: frequency=0",
             {"frequency": 0}),
            (TypeError, "argument `frequency`", {"frequency": 1.5}),
            (ValueError, "argument `vanishing_threshold`",
             {"vanishing_threshold": -1.0}),
            (ValueError, "argument `exploding_threshold`",
             {"exploding_threshold": 0.0}),
            (ValueError, "argument `vanishing_threshold`.*below",
             {"vanishing_threshold": 10.0, "exploding_threshold": 1.0}),
            (TypeError, "argument `warn`", {"warn": "yes"}),
        ]
        for error, message, kwargs in cases:
            with self.assertRaisesRegex(error, message):
                GradientMonitor(**kwargs)


class GradientMonitorArgumentsTest(TestCase):
    def test_numpy_integer_frequency_samples_as_an_int(self):
        x, y = linear_data()
        sampled = []
        for frequency in (2, np.int64(2)):
            model = linear_model()
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
            monitor = GradientMonitor(frequency=frequency)
            self.assertIs(type(monitor.frequency), int)
            model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                      callbacks=[monitor])
            sampled.append([batch for _, batch, _ in monitor.history])
        self.assertEqual(sampled[1], sampled[0])
        self.assertGreaterEqual(len(sampled[0]), 3)  # six batches

    def test_infinite_exploding_threshold_never_flags(self):
        monitor = GradientMonitor(exploding_threshold=float("inf"),
                                  vanishing_threshold=0.0, warn=False)
        x, y = linear_data()
        model = linear_model()
        # Learning rate 0: the same huge gradients at every step.
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        model.fit(x * 1e6, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[monitor])
        self.assertEqual(monitor.flagged, [])
        for bad in (float("-inf"), float("nan")):
            with self.assertRaisesRegex(ValueError, "`exploding_threshold`"):
                GradientMonitor(exploding_threshold=bad)


class RecordingTensorBoard(keras.callbacks.TensorBoard):
    """A TensorBoard that records the epoch logs it would write (the
    tensorboard package, which writes them, is not a test dependency)."""

    def __init__(self):
        super().__init__(log_dir=tempfile.gettempdir())
        self.written = []

    def set_model(self, model):
        keras.callbacks.Callback.set_model(self, model)

    def on_epoch_end(self, epoch, logs=None):
        self.written.append(dict(logs))


for _hook in ("on_train_begin", "on_train_end", "on_test_begin",
              "on_test_end", "on_epoch_begin", "on_train_batch_begin",
              "on_train_batch_end"):
    setattr(RecordingTensorBoard, _hook,
            lambda self, *args, **kwargs: None)


class TensorBoardOrderTest(TestCase):
    def fit(self, callbacks):
        x, y = linear_data()
        model = linear_model()
        model.compile(optimizer=ClippedOptimizer(keras.optimizers.SGD(0.01),
                                                 clipnorm=1.0), loss="mse")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                                callbacks=callbacks)
        return history, [w for w in caught if "TensorBoard" in
                         str(w.message)]

    def test_warns_when_listed_after_tensorboard(self):
        board = RecordingTensorBoard()
        history, caught = self.fit([board, GradientMonitor()])
        self.assertIn("grad_norm", history.history)
        self.assertEqual(len(board.written), 2)
        self.assertNotIn("grad_norm", board.written[0])
        self.assertEqual(len(caught), 1)
        message = str(caught[0].message)
        self.assertIn("grad_norm, clipped_steps, skipped_steps", message)
        self.assertIn("before TensorBoard", message)
        self.assertEqual(os.path.abspath(caught[0].filename),
                         os.path.abspath(__file__))

    def test_listed_before_tensorboard_it_sees_grad_norm(self):
        board = RecordingTensorBoard()
        history, caught = self.fit([GradientMonitor(), board])
        self.assertEqual(caught, [])
        self.assertEqual([logs["grad_norm"] for logs in board.written],
                         history.history["grad_norm"])
        self.assertIn("clipped_steps", board.written[0])
