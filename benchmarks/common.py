"""Shared pieces of kreg's benchmarks: data, the MLP, interleaved timing.

Every benchmark compares a kreg piece with the Keras built-in it replaces,
measured in the same process with the variants interleaved round by round
(so drifts in machine load hit both), and reports the median of the
per-round time ratios kreg / Keras.
"""

import argparse
import statistics
import time

import numpy as np

from kreg.walkthrough.data import load_mnist_idx


def parse_args(description, **defaults):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--mnist-dir", default=None,
        help="folder with the four MNIST IDX files (gzipped or not); "
        "random data of the same shape when absent",
    )
    parser.add_argument("--rounds", type=int,
                        default=defaults.get("rounds", 15))
    parser.add_argument("--steps", type=int, default=defaults.get("steps", 20),
                        help="train steps timed per round and variant")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--jit-compile", default="auto",
                        choices=["auto", "true", "false"])
    return parser.parse_args()


def jit_compile_value(text):
    return {"auto": "auto", "true": True, "false": False}[text]


def mnist_train_batches(folder, batch_size, count, seed=0):
    """`count` batches of flattened, scaled MNIST training images.

    Falls back to random data of the same shape when `folder` is None or
    does not hold MNIST (timing does not depend on the values).
    """
    rng = np.random.RandomState(seed)
    n = batch_size * count
    try:
        if folder is None:
            raise FileNotFoundError("no --mnist-dir given")
        mnist = load_mnist_idx(folder)
        x, y = mnist.x_train[:n], mnist.y_train[:n]
        source = mnist.source
    except (FileNotFoundError, ValueError) as error:
        x = rng.rand(n, 784).astype("float32")
        y = rng.randint(0, 10, n).astype("int32")
        source = f"random data ({error})"
    batches = [
        (x[i * batch_size:(i + 1) * batch_size],
         y[i * batch_size:(i + 1) * batch_size])
        for i in range(count)
    ]
    return batches, source


def mlp(keras, normalization=None, regularization=None, hidden=(512, 512),
        inputs=784, classes=10):
    """The benchmark MLP: Dense-[normalization]-ReLU-[regularization] blocks.

    `normalization` and `regularization` are zero-argument factories of
    layers (or None).
    """
    layers = [keras.Input((inputs,))]
    for width in hidden:
        layers.append(keras.layers.Dense(width))
        if normalization is not None:
            layers.append(normalization())
        layers.append(keras.layers.Activation("relu"))
        if regularization is not None:
            layers.append(regularization())
    layers.append(keras.layers.Dense(classes))
    return keras.Sequential(layers)


def time_train_steps(model, batches):
    """Seconds per train step over `batches` (the step is already compiled)."""
    start = time.perf_counter()
    for x, y in batches:
        logs = model.train_on_batch(x, y, return_dict=True)
    float(logs["loss"])  # waits for the last step
    return (time.perf_counter() - start) / len(batches)


def interleaved(models, batches, rounds, warmup_steps=3):
    """Times each model's train step, round-robin; returns per-model lists."""
    for model in models.values():
        time_train_steps(model, batches[:warmup_steps])
    times = {name: [] for name in models}
    for round_index in range(rounds):
        names = list(models)
        if round_index % 2:
            names.reverse()
        for name in names:
            times[name].append(time_train_steps(models[name], batches))
    return times


def report(times, baseline, limit=None):
    """Prints per-variant medians and median per-round ratios to `baseline`.

    Returns a dict name -> median ratio.
    """
    ratios = {}
    base = times[baseline]
    for name, values in times.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        ratios[name] = ratio
        print(
            f"{name:<28} median step {1e3 * statistics.median(values):8.3f} ms"
            f"   ratio to {baseline}: {ratio:.3f}"
        )
    if limit is not None:
        worst = max(r for n, r in ratios.items() if n != baseline)
        verdict = "OK" if worst <= limit else "OVER"
        print(f"limit {limit:.2f}: {verdict} (worst ratio {worst:.3f})")
    return ratios
