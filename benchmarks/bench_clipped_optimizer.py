"""Train-step time: kreg ClippedOptimizer vs Keras's built-in clipping.

MLP 784-512-512-10, batch 128: `ClippedOptimizer(Adam(), global_clipnorm=1.0)`
against `Adam(global_clipnorm=1.0)` and against the bare `Adam()`, all three
models from the same weights, timed interleaved. Prints the median
per-round ratios kreg / Keras's clipping (target <= 1.05) and kreg / bare
Adam (the cost of clipping; target <= 1.10).
With `--monitor`, adds a third variant: the kreg optimizer plus
`GradientMonitor()` at its default frequency, driven through `fit` (target
<= 1.05 against the same kreg optimizer without the callback).

    python benchmarks/bench_clipped_optimizer.py [--mnist-dir DIR] [--monitor]
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from common import interleaved
from common import jit_compile_value
from common import mlp
from common import mnist_train_batches
from common import parse_args
from common import report

import kreg
from kreg.callbacks.gradient_monitor import GradientMonitor


def compiled(optimizer, weights, jit_compile):
    model = mlp(keras)
    model.set_weights(weights)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def fit_times(models, callbacks, x, y, batch_size, rounds):
    """Seconds per step of one `fit` epoch per round, interleaved."""
    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up (compilation)
        model.fit(x[:batch_size * 3], y[:batch_size * 3], epochs=1,
                  batch_size=batch_size, verbose=0,
                  callbacks=callbacks[name]())
    steps = len(x) // batch_size
    for round_index in range(rounds):
        names = list(models)
        if round_index % 2:
            names.reverse()
        for name in names:
            start = time.perf_counter()
            models[name].fit(x, y, epochs=1, batch_size=batch_size,
                             verbose=0, shuffle=False,
                             callbacks=callbacks[name]())
            times[name].append((time.perf_counter() - start) / steps)
    return times


def main():
    monitor = "--monitor" in sys.argv
    if monitor:
        sys.argv.remove("--monitor")
    args = parse_args(__doc__, steps=40, rounds=31)
    batches, source = mnist_train_batches(
        args.mnist_dir, args.batch_size, args.steps
    )
    print(f"backend {keras.backend.backend()}, data: {source}")
    jit_compile = jit_compile_value(args.jit_compile)
    keras.utils.set_random_seed(0)
    weights = mlp(keras).get_weights()
    models = {
        "keras.Adam()": compiled(keras.optimizers.Adam(), weights,
                                 jit_compile),
        "keras.Adam(global_clipnorm)": compiled(
            keras.optimizers.Adam(global_clipnorm=1.0), weights, jit_compile
        ),
        "kreg.ClippedOptimizer": compiled(
            kreg.optimizers.ClippedOptimizer(
                keras.optimizers.Adam(), global_clipnorm=1.0
            ),
            weights, jit_compile,
        ),
    }
    times = interleaved(models, batches, args.rounds)
    report({name: times[name] for name in list(models)[1:]},
           baseline="keras.Adam(global_clipnorm)", limit=1.05)
    report({name: times[name] for name in ("keras.Adam()",
                                           "kreg.ClippedOptimizer")},
           baseline="keras.Adam()", limit=1.10)

    if monitor:
        # GradientMonitor's default frequency is 100 batches: time whole
        # epochs of 200 batches through fit, with and without it.
        steps = 200
        batches, _ = mnist_train_batches(args.mnist_dir, args.batch_size,
                                         steps)
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        optimizer = kreg.optimizers.ClippedOptimizer
        fit_models = {
            "kreg, no callback": compiled(
                optimizer(keras.optimizers.Adam(), global_clipnorm=1.0),
                weights, jit_compile,
            ),
            "kreg + GradientMonitor": compiled(
                optimizer(keras.optimizers.Adam(), global_clipnorm=1.0),
                weights, jit_compile,
            ),
        }
        callbacks = {
            "kreg, no callback": list,
            "kreg + GradientMonitor": lambda: [GradientMonitor()],
        }
        times = fit_times(fit_models, callbacks, x, y, args.batch_size,
                          max(3, args.rounds // 3))
        report(times, baseline="kreg, no callback", limit=1.05)


if __name__ == "__main__":
    main()
