"""Tests of kreg.optimizers.ClippedOptimizer against NumPy references."""

import keras
import numpy as np

from kreg.optimizers import ClippedOptimizer
from kreg.testing import TestCase

SHAPES = [(3,), (4, 5), (2, 3, 4), (1,), (6, 1)]


def random_grads(seed, scale=3.0):
    rng = np.random.RandomState(seed)
    return [(scale * rng.randn(*s)).astype("float32") for s in SHAPES]


# Independent references (PyTorch's clip_grad_*_ semantics, in NumPy).
def np_clip_value(grads, c):
    return [np.clip(g, -c, c) for g in grads]


def np_clip_global_norm(grads, c):
    # torch.nn.utils.clip_grad_norm_: coef = c / (total + 1e-6), capped at 1.
    total = np.sqrt(sum(np.sum(g.astype("float64") ** 2) for g in grads))
    coef = min(c / (total + 1e-6), 1.0)
    return [g * coef for g in grads]


def np_clip_norm(grads, c):
    return [np_clip_global_norm([g], c)[0] for g in grads]


def np_agc(grads, weights, factor, eps):
    out = []
    for g, w in zip(grads, weights):
        axes = tuple(range(g.ndim - 1)) if g.ndim > 1 else None
        keep = g.ndim > 1
        w_norm = np.sqrt(np.sum(w ** 2, axis=axes, keepdims=keep))
        g_norm = np.sqrt(np.sum(g ** 2, axis=axes, keepdims=keep))
        max_norm = factor * np.maximum(w_norm, eps)
        out.append(np.where(g_norm > max_norm, g * max_norm / g_norm, g))
    return out


def clip(optimizer, grads, weights=None):
    tensors = [keras.ops.convert_to_tensor(g) for g in grads]
    clipped, stats = optimizer.clip_gradients(tensors, weights)
    return [np.asarray(keras.ops.convert_to_numpy(g)) for g in clipped], stats


def global_norm(grads):
    return np.sqrt(sum(np.sum(np.asarray(g, "float64") ** 2) for g in grads))


class ClippingTest(TestCase):
    def test_notebook_value_example(self):
        opt = ClippedOptimizer(keras.optimizers.SGD(), clipvalue=1.0)
        (out,), _ = clip(opt, [np.array([0.5, 2, -3, 4], "float32")])
        self.assertAllClose(out, [0.5, 1, -1, 1], atol=0)

    def test_notebook_norm_example(self):
        opt = ClippedOptimizer(keras.optimizers.SGD(), clipnorm=2.0)
        grad = np.array([0.5, 2, -3, 4], "float32")
        (out,), stats = clip(opt, [grad])
        self.assertAllClose(stats["norm"], 5.4083, atol=1e-4)
        self.assertAllClose(
            out, [0.1849, 0.7396, -1.1094, 1.4792], atol=5e-5
        )

    def test_notebook_example_through_sgd_step(self):
        # w <- w - 1.0 * clipped gradient: the update is the clipped vector.
        for kwargs, expected in [
            ({"clipvalue": 1.0}, [0.5, 1, -1, 1]),
            ({"clipnorm": 2.0}, [0.1849, 0.7396, -1.1094, 1.4792]),
            ({"global_clipnorm": 2.0}, [0.1849, 0.7396, -1.1094, 1.4792]),
        ]:
            opt = ClippedOptimizer(keras.optimizers.SGD(1.0), **kwargs)
            w = keras.Variable(np.zeros(4, "float32"))
            opt.apply([keras.ops.array([0.5, 2.0, -3.0, 4.0])], [w])
            self.assertAllClose(w, -np.array(expected), atol=5e-5)
            self.assertEqual(int(self.to_numpy(opt.clipped_steps)), 1)

    def test_matches_torch_semantics_on_random_gradients(self):
        for seed in range(3):
            grads = random_grads(seed)
            for c in (0.5, 2.0):
                out, _ = clip(ClippedOptimizer("sgd", clipvalue=c), grads)
                for a, b in zip(out, np_clip_value(grads, c)):
                    self.assertAllClose(a, b, atol=0)
                out, _ = clip(ClippedOptimizer("sgd", clipnorm=c), grads)
                for a, b in zip(out, np_clip_norm(grads, c)):
                    self.assertAllClose(a, b, atol=1e-5, rtol=1e-5)
                out, _ = clip(
                    ClippedOptimizer("sgd", global_clipnorm=c), grads
                )
                for a, b in zip(out, np_clip_global_norm(grads, c)):
                    self.assertAllClose(a, b, atol=1e-5, rtol=1e-5)

    def test_norm_equals_threshold_after_clipping(self):
        grads = random_grads(7)
        out, stats = clip(ClippedOptimizer("sgd", global_clipnorm=1.5), grads)
        self.assertAllClose(stats["norm"], global_norm(grads), rtol=1e-5)
        self.assertAllClose(global_norm(out), 1.5, rtol=1e-5)
        out, _ = clip(ClippedOptimizer("sgd", clipnorm=0.7), grads)
        for g in out:
            self.assertAllClose(np.linalg.norm(g), 0.7, rtol=1e-5)

    def test_huge_threshold_changes_nothing_bit_for_bit(self):
        grads = random_grads(3)
        opt = ClippedOptimizer(
            "sgd", clipvalue=1e9, clipnorm=1e9, global_clipnorm=1e9,
            agc_factor=1e9,
        )
        weights = random_grads(4)
        out, stats = clip(opt, grads, weights)
        for a, b in zip(out, grads):
            self.assertAllEqual(a, b)
        self.assertFalse(bool(self.to_numpy(stats["clipped"])))

    def test_clipping_twice_is_stable(self):
        grads = random_grads(5)
        for kwargs in [{"clipvalue": 1.0}, {"clipnorm": 1.0},
                       {"global_clipnorm": 1.0}]:
            opt = ClippedOptimizer("sgd", **kwargs)
            once, _ = clip(opt, grads)
            twice, _ = clip(opt, once)
            for a, b in zip(once, twice):
                self.assertAllClose(a, b, atol=1e-6, rtol=1e-6)

    def test_agc_unit_wise_against_numpy(self):
        grads = random_grads(11)
        weights = random_grads(12, scale=0.5)
        opt = ClippedOptimizer("sgd", agc_factor=0.1, agc_epsilon=1e-3)
        out, stats = clip(opt, grads, weights)
        for a, b in zip(out, np_agc(grads, weights, 0.1, 1e-3)):
            self.assertAllClose(a, b, atol=1e-6, rtol=1e-5)
        self.assertTrue(bool(self.to_numpy(stats["clipped"])))
        # Zero weights: the epsilon floor lets them move.
        zero = [np.zeros((4, 5), "float32")]
        (g,), _ = clip(opt, [grads[1]], zero)
        norms = np.sqrt(np.sum(g ** 2, axis=0))
        self.assertAllClose(norms, np.full(5, 0.1 * 1e-3), rtol=1e-5)

    def test_order_value_then_norm_then_global(self):
        grads = random_grads(9)
        opt = ClippedOptimizer(
            "sgd", clipvalue=2.0, clipnorm=3.0, global_clipnorm=4.0
        )
        out, _ = clip(opt, grads)
        expected = np_clip_global_norm(
            np_clip_norm(np_clip_value(grads, 2.0), 3.0), 4.0
        )
        for a, b in zip(out, expected):
            self.assertAllClose(a, b, atol=1e-5, rtol=1e-5)

    def test_same_update_as_keras_builtin_global_clipnorm(self):
        grads = random_grads(2)
        init = random_grads(3)
        results = []
        for opt in [
            ClippedOptimizer(keras.optimizers.Adam(0.1), global_clipnorm=1.0),
            keras.optimizers.Adam(0.1, global_clipnorm=1.0),
        ]:
            ws = [keras.Variable(w) for w in init]
            for _ in range(3):
                opt.apply([keras.ops.convert_to_tensor(g) for g in grads], ws)
            results.append([self.to_numpy(w) for w in ws])
        for a, b in zip(*results):
            self.assertAllClose(a, b, atol=1e-5, rtol=1e-5)


class NonFiniteTest(TestCase):
    def _step(self, opt, ws, grads):
        opt.apply([keras.ops.convert_to_tensor(g) for g in grads], ws)

    def test_non_finite_step_leaves_weights_and_state_untouched(self):
        opt = ClippedOptimizer(keras.optimizers.Adam(0.1), clipnorm=1.0)
        ws = [keras.Variable(w) for w in random_grads(1)]
        self._step(opt, ws, random_grads(2))
        before = [self.to_numpy(v) for v in ws + opt.inner_optimizer.variables]
        for bad in (np.nan, np.inf, -np.inf):
            grads = random_grads(3)
            grads[1][2, 3] = bad
            self._step(opt, ws, grads)
            after = [
                self.to_numpy(v) for v in ws + opt.inner_optimizer.variables
            ]
            for a, b in zip(after, before):
                self.assertAllEqual(a, b)
        self.assertEqual(int(self.to_numpy(opt.skipped_steps)), 3)
        self.assertEqual(int(self.to_numpy(opt.iterations)), 1)
        # A finite step afterwards is applied again.
        self._step(opt, ws, random_grads(4))
        self.assertEqual(int(self.to_numpy(opt.iterations)), 2)

    def test_keras_builtin_writes_nan_where_wrapper_does_not(self):
        grads = random_grads(3)
        grads[0][0] = np.inf
        keras_opt = keras.optimizers.SGD(0.1, global_clipnorm=1.0)
        ws = [keras.Variable(w) for w in random_grads(1)]
        self._step(keras_opt, ws, grads)
        self.assertFalse(np.all(np.isfinite(self.to_numpy(ws[1]))))
        opt = ClippedOptimizer(keras.optimizers.SGD(0.1), global_clipnorm=1.0)
        ws = [keras.Variable(w) for w in random_grads(1)]
        self._step(opt, ws, grads)
        for w in ws:
            self.assertTrue(np.all(np.isfinite(self.to_numpy(w))))

    def _poisoned_data(self):
        rng = np.random.RandomState(0)
        x = rng.randn(64, 6).astype("float32")
        y = (x @ rng.randn(6, 1)).astype("float32")
        x[20, 3] = np.inf  # in the second batch of 16
        return x, y

    def _model(self):
        return keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ])

    def test_poisoned_batch_fit_ends_with_finite_weights(self):
        x, y = self._poisoned_data()
        model = self._model()
        model.compile(
            optimizer=ClippedOptimizer(
                keras.optimizers.Adam(0.01), global_clipnorm=1.0
            ),
            loss="mse", jit_compile=self.jit_compile_setting(),
        )
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        for w in model.weights:
            self.assertTrue(np.all(np.isfinite(self.to_numpy(w))), w.path)
        self.assertEqual(int(self.to_numpy(model.optimizer.skipped_steps)), 2)
        self.assertEqual(int(self.to_numpy(model.optimizer.iterations)), 6)
        clean = np.isfinite(x).all(axis=1)
        loss = model.evaluate(x[clean], y[clean], verbose=0)
        self.assertTrue(np.isfinite(loss))

    def test_poisoned_batch_fit_raises_when_asked(self):
        x, y = self._poisoned_data()
        model = self._model()
        backend = keras.backend.backend()
        model.compile(
            optimizer=ClippedOptimizer(
                keras.optimizers.Adam(0.01), on_non_finite="raise"
            ),
            loss="mse",
            # XLA drops TensorFlow's in-graph assertion (see the docstring).
            jit_compile=backend == "jax",
        )
        with self.assertRaisesRegex(Exception, "non-finite gradient"):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)


class FitTest(TestCase):
    def _data(self):
        rng = np.random.RandomState(1)
        x = rng.randn(96, 8).astype("float32")
        y = np.tanh(x @ rng.randn(8, 1)).astype("float32")
        return x, y

    def _mlp(self):
        return keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1),
        ])

    def test_compiled_fit_and_save_load(self):
        x, y = self._data()
        model = self._mlp()
        schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.5)
        opt = ClippedOptimizer(
            keras.optimizers.Adam(schedule), clipvalue=0.5, clipnorm=1.0,
            global_clipnorm=1.0, agc_factor=0.5,
        )
        history = self.run_compiled_fit(model, x, y, optimizer=opt, epochs=3,
                                        batch_size=16)
        losses = history.history["loss"]
        self.assertLess(losses[-1], losses[0])
        self.assertEqual(int(self.to_numpy(opt.iterations)), 18)
        self.assertEqual(
            int(self.to_numpy(opt.inner_optimizer.iterations)), 18
        )
        self.assertAllClose(opt.learning_rate, 0.05 * 0.5 ** 1.8, rtol=1e-5)
        reloaded = self.run_save_load(model, x)
        ropt = reloaded.optimizer
        self.assertIsInstance(ropt, ClippedOptimizer)
        self.assertIsInstance(ropt.inner_optimizer, keras.optimizers.Adam)
        self.assertEqual(ropt.get_config(), opt.get_config())
        for a, b in zip(ropt.variables, opt.variables):
            self.assertAllClose(a, b)
        reloaded.fit(x, y, batch_size=16, epochs=1, verbose=0)
        self.assertEqual(int(self.to_numpy(ropt.iterations)), 24)

    def test_exploding_network_diverges_without_clipping(self):
        rng = np.random.RandomState(0)
        x = rng.randn(64, 8).astype("float32")
        y = rng.randn(64, 1).astype("float32")

        def run(optimizer):
            keras.utils.set_random_seed(3)
            init = keras.initializers.RandomNormal(stddev=1.5)
            layers = [keras.Input((8,))]
            for _ in range(6):
                layers.append(keras.layers.Dense(
                    8, kernel_initializer=init, activation="linear"
                ))
            layers.append(keras.layers.Dense(1, kernel_initializer=init))
            model = keras.Sequential(layers)
            model.compile(optimizer=optimizer, loss="mse",
                          jit_compile=self.jit_compile_setting())
            history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
            return model, history.history["loss"]

        _, plain = run(keras.optimizers.SGD(0.01))
        self.assertFalse(np.isfinite(plain[-1]) and plain[-1] < plain[0])
        model, clipped = run(ClippedOptimizer(
            keras.optimizers.SGD(0.01), global_clipnorm=1.0
        ))
        self.assertTrue(np.all(np.isfinite(clipped)), clipped)
        self.assertLess(clipped[-1], clipped[0])
        self.assertGreater(int(self.to_numpy(model.optimizer.clipped_steps)), 0)

    def test_mixed_float16_clips_unscaled_gradients(self):
        x, y = self._data()
        with self.mixed_precision("mixed_float16"):
            model = self._mlp()
            opt = ClippedOptimizer(keras.optimizers.SGD(0.01), clipnorm=1e4)
            model.compile(optimizer=opt, loss="mse",
                          jit_compile=self.jit_compile_setting())
            self.assertIsInstance(
                model.optimizer, keras.optimizers.LossScaleOptimizer
            )
            model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
        # The loss scale is 2**15; a scaled gradient would be far above 1e4
        # and would count as clipped.
        norm = float(self.to_numpy(opt.grad_norm))
        self.assertLess(norm, 100.0)
        self.assertGreater(norm, 0.0)
        self.assertEqual(int(self.to_numpy(opt.clipped_steps)), 0)
        self.assertEqual(model.layers[0].kernel.dtype, "float32")

    def test_wrapping_a_loss_scale_optimizer(self):
        x, y = self._data()
        model = self._mlp()
        reference = self._mlp()
        reference.set_weights(model.get_weights())
        inner = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.01), initial_scale=1024.0
        )
        opt = ClippedOptimizer(inner, clipnorm=1e3)
        jit = self.jit_compile_setting()
        model.compile(optimizer=opt, loss="mse", jit_compile=jit)
        model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
        # The recorded norm is that of the unscaled gradient (< 100, not
        # about 1024 times larger), so the 1e3 bound did not act.
        norm = float(self.to_numpy(opt.grad_norm))
        self.assertLess(norm, 100.0)
        self.assertEqual(int(self.to_numpy(opt.clipped_steps)), 0)
        # Same step as plain SGD from the same weights.
        reference.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse",
                          jit_compile=jit)
        reference.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
        for a, b in zip(model.weights, reference.weights):
            self.assertAllClose(a, b, atol=1e-6, rtol=1e-5)


class ConfigTest(TestCase):
    def test_config_round_trip(self):
        opt = ClippedOptimizer(
            keras.optimizers.RMSprop(0.003), clipvalue=0.5, clipnorm=2.0,
            global_clipnorm=3.0, agc_factor=0.02, agc_epsilon=1e-4,
            on_non_finite="raise", name="clipped",
        )
        from_config, revived = self.run_config_round_trip(opt)
        for copy in (from_config, revived):
            self.assertIsInstance(copy.inner_optimizer,
                                  keras.optimizers.RMSprop)
            self.assertAllClose(copy.learning_rate, 0.003)
            self.assertEqual(copy.clipnorm, 2.0)
            self.assertEqual(copy.on_non_finite, "raise")

    def test_accepts_optimizer_names(self):
        opt = ClippedOptimizer("adam", clipnorm=1.0)
        self.assertIsInstance(opt.inner_optimizer, keras.optimizers.Adam)

    def test_refuses_an_inner_optimizer_that_clips_too(self):
        adam = keras.optimizers.Adam
        for argument in ("clipnorm", "clipvalue", "global_clipnorm"):
            for outer in ("clipnorm", "global_clipnorm", "agc_factor"):
                with self.assertRaisesRegex(
                    ValueError,
                    f"argument `optimizer`.*`optimizer.{argument}`.*"
                    f"Received: optimizer=Adam with {argument}=1.0",
                ):
                    ClippedOptimizer(adam(**{argument: 1.0}),
                                     **{outer: 0.5})
        # Anywhere down a chain of wrappers.
        chains = [
            (keras.optimizers.LossScaleOptimizer(adam(clipvalue=1.0)),
             "optimizer.inner_optimizer.clipvalue"),
            (ClippedOptimizer(adam(), clipnorm=1.0),
             "optimizer.clipnorm"),
            (ClippedOptimizer(keras.optimizers.LossScaleOptimizer(
                adam(global_clipnorm=1.0))),
             "optimizer.inner_optimizer.inner_optimizer.global_clipnorm"),
        ]
        for inner, where in chains:
            with self.assertRaisesRegex(ValueError, f"`{where}`"):
                ClippedOptimizer(inner, global_clipnorm=1.0)
        # A measuring wrapper (no clipping of its own) may wrap a clipping
        # optimizer, and a clipping wrapper a plain one.
        measuring = ClippedOptimizer(adam(clipnorm=1.0))
        self.assertIsNone(measuring.clipnorm)
        ClippedOptimizer(keras.optimizers.LossScaleOptimizer(adam()),
                         clipnorm=1.0)

    def test_bad_arguments(self):
        sgd = keras.optimizers.SGD
        cases = [
            (TypeError, "argument `optimizer`.*Received: optimizer=3",
             lambda: ClippedOptimizer(3)),
            (TypeError, "argument `optimizer`",
             lambda: ClippedOptimizer(keras.layers.Dense(2))),
            (ValueError, "argument `clipnorm`.*Received: clipnorm=0.0",
             lambda: ClippedOptimizer(sgd(), clipnorm=0)),
            (ValueError, "argument `clipvalue`.*Received: clipvalue=-1.0",
             lambda: ClippedOptimizer(sgd(), clipvalue=-1)),
            (ValueError, "argument `global_clipnorm`",
             lambda: ClippedOptimizer(sgd(), global_clipnorm=-0.5)),
            (ValueError, "argument `agc_factor`",
             lambda: ClippedOptimizer(sgd(), agc_factor=0.0)),
            (ValueError, "argument `agc_epsilon`",
             lambda: ClippedOptimizer(sgd(), agc_epsilon=0.0)),
            (TypeError, "argument `clipnorm`",
             lambda: ClippedOptimizer(sgd(), clipnorm="big")),
            (ValueError, ("argument `on_non_finite`.*Received: "
             "on_non_finite='ignore'"),
             lambda: ClippedOptimizer(sgd(), on_non_finite="ignore")),
            (ValueError, "does not take the arguments.*learning_rate",
             lambda: ClippedOptimizer(sgd(), learning_rate=0.1)),
        ]
        for error, message, make in cases:
            with self.assertRaisesRegex(error, message):
                make()

