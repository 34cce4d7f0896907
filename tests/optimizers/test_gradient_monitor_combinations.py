"""GradientMonitor in the combinations of COMBINATIONS.md: `grad_norm`
against the gradient computed by hand in NumPy under non-default loss
reductions, sample and class weights, several outputs, a regularizer, and
data from NumPy, tf.data, a PyDataset or a torch DataLoader."""

import keras
import numpy as np
from absl.testing import parameterized

from kreg.callbacks import GradientMonitor
from kreg.regularizers import L2
from kreg.testing import TestCase

N, D, BATCH, L2_STRENGTH = 24, 3, 8, 0.3
W1, B1, W2, B2 = 0.5, 0.1, -0.25, 0.2


def _data():
    rng = np.random.RandomState(0)
    x = rng.randn(N, D).astype("float32")
    y1 = rng.randn(N, 1).astype("float32")
    y2 = rng.randn(N, 1).astype("float32")
    weights = rng.uniform(0.2, 2.0, N).astype("float32")
    return x, y1, y2, weights


def _two_output_model(nested=False):
    """Two linear outputs; the first (kreg L2 on its kernel) inside a
    nested Sequential when `nested`."""
    inputs = keras.Input((D,))
    first = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(W1),
        bias_initializer=keras.initializers.Constant(B1),
        kernel_regularizer=L2(L2_STRENGTH), name="first")
    if nested:
        first = keras.Sequential([keras.Input((D,)), first], name="sub")
    second = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(W2),
        bias_initializer=keras.initializers.Constant(B2),
        name="second")(inputs)
    return keras.Model(inputs, [first(inputs), second])


def numpy_two_output_layer_norms(x, y1, y2, sw, loss_weights=(1.0, 0.5)):
    """Gradient norms of the layers "first" and "second" for ``a1 *
    sum(sw * e1^2) + a2 * sum(sw * e2^2) / B + L2 / 2 * ||W1||^2``
    (reductions "sum" and "sum_over_batch_size") at the initial
    weights."""
    a1, a2 = loss_weights
    e1 = (x @ np.full((D, 1), W1) + B1 - y1)[:, 0] * sw
    e2 = (x @ np.full((D, 1), W2) + B2 - y2)[:, 0] * sw
    first = [a1 * 2 * x.T @ e1 + L2_STRENGTH * np.full(D, W1),
             a1 * 2 * e1.sum()]
    second = [a2 * 2 * x.T @ e2 / len(x), a2 * 2 * e2.sum() / len(x)]
    return [np.sqrt(sum(np.sum(np.square(g)) for g in grads))
            for grads in (first, second)]


def numpy_two_output_norm(*arrays):
    """The global gradient norm of the same loss."""
    return np.sqrt(np.sum(np.square(numpy_two_output_layer_norms(*arrays))))


def _compile_two_outputs(model, **kwargs):
    model.compile(
        keras.optimizers.SGD(0.0),
        [keras.losses.MeanSquaredError(reduction="sum"),
         keras.losses.MeanSquaredError()],
        loss_weights=[1.0, 0.5], **kwargs)


class _Batches(keras.utils.PyDataset):
    def __init__(self, arrays):
        super().__init__()
        self.arrays = arrays

    def __len__(self):
        return N // BATCH

    def __getitem__(self, i):
        part = slice(i * BATCH, (i + 1) * BATCH)
        x, y1, y2, sw = (a[part] for a in self.arrays)
        return x, (y1, y2), sw


def _inputs(kind, arrays):
    x, y1, y2, sw = arrays
    if kind == "numpy":
        return {"x": x, "y": (y1, y2), "sample_weight": sw,
                "batch_size": BATCH}
    if kind == "tf.data":
        import tensorflow as tf

        return {"x": tf.data.Dataset.from_tensor_slices(
            (x, (y1, y2), sw)).batch(BATCH)}
    if kind == "PyDataset":
        return {"x": _Batches(arrays)}
    import torch

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return x[i], (y1[i], y2[i]), sw[i]

    return {"x": torch.utils.data.DataLoader(Samples(), batch_size=BATCH)}


class GradNormByHandTest(TestCase, parameterized.TestCase):
    @parameterized.parameters("numpy", "tf.data", "PyDataset", "DataLoader")
    def test_two_outputs_sum_reduction_sample_weight_regularizer(self, kind):
        if kind == "DataLoader" and keras.backend.backend() != "torch":
            self.skipTest("a torch DataLoader feeds the torch backend")
        arrays = _data()
        # Learning rate 0: each step's gradient is taken at the initial
        # weights; grad_norm is the mean of the steps' norms.
        expected = np.mean([
            numpy_two_output_norm(*(a[i:i + BATCH] for a in arrays))
            for i in range(0, N, BATCH)
        ])
        model = _two_output_model()
        _compile_two_outputs(
            model, jit_compile=self.jit_compile_setting() if kind == "numpy"
            else "auto")
        history = model.fit(**_inputs(kind, arrays), epochs=2, shuffle=False,
                            verbose=0, callbacks=[GradientMonitor()])
        self.assertAllClose(history.history["grad_norm"], [expected] * 2,
                            rtol=1e-5)

    def test_class_weight_and_logits(self):
        # Binary cross-entropy on logits z = x w + b: dL/dz = (sigmoid(z) -
        # y) * class_weight[y] / B.
        rng = np.random.RandomState(1)
        x = rng.randn(N, D).astype("float32")
        y = rng.randint(0, 2, (N, 1)).astype("float32")
        class_weight = {0: 0.3, 1: 2.5}
        norms = []
        for i in range(0, N, BATCH):
            xb, yb = x[i:i + BATCH], y[i:i + BATCH]
            z = xb @ np.full((D, 1), W1) + B1
            dz = (1 / (1 + np.exp(-z)) - yb) * np.vectorize(
                class_weight.get)(yb) / len(xb)
            norms.append(np.sqrt(np.sum((xb.T @ dz) ** 2) + dz.sum() ** 2))
        model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(
            1, kernel_initializer=keras.initializers.Constant(W1),
            bias_initializer=keras.initializers.Constant(B1))])
        model.compile(keras.optimizers.Adam(0.0),
                      keras.losses.BinaryCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False,
                            verbose=0, class_weight=class_weight,
                            callbacks=[GradientMonitor()])
        self.assertAllClose(history.history["grad_norm"], [np.mean(norms)],
                            rtol=1e-5)

    def test_reused_in_a_second_fit_of_a_nested_model(self):
        # One monitor in two fits: each epoch's grad_norm and the last
        # per-layer norms (a layer inside a nested model among them) are
        # those computed by hand; its config round-trips.
        arrays = _data()
        x, y1, y2, sw = arrays
        model = _two_output_model(nested=True)
        _compile_two_outputs(model)
        monitor = GradientMonitor(frequency=1, vanishing_threshold=1e-9)
        for _ in range(2):
            history = model.fit(x, (y1, y2), sample_weight=sw,
                                batch_size=BATCH, epochs=1, shuffle=False,
                                verbose=0, callbacks=[monitor])
            expected = np.mean([
                numpy_two_output_norm(*(a[i:i + BATCH] for a in arrays))
                for i in range(0, N, BATCH)])
            self.assertAllClose(history.history["grad_norm"], [expected],
                                rtol=1e-5)
        last = numpy_two_output_layer_norms(*(a[-BATCH:] for a in arrays))
        self.assertEqual(sorted(monitor.layer_norms),
                         ["second", "sub/first"])
        self.assertAllClose([monitor.layer_norms["sub/first"],
                             monitor.layer_norms["second"]], last, rtol=1e-5)
        self.assertEqual(len(monitor.history), 2 * (N // BATCH))
        self.run_config_round_trip(monitor)
