"""fit time: kreg.callbacks.EMA vs no EMA vs a hand-written NumPy EMA.

MLP 784-512-512-10, batch 128, SGD. Three models start from the same
weights; each round runs one ``fit`` epoch of ``--steps`` batches per variant,
interleaved. The hand-written callback is what users write: ``get_weights``
and NumPy arithmetic after every batch, ``set_weights`` at the end. Prints
median per-round ratios; targets: EMA / without <= 1.05 and
hand-written / kreg EMA >= 2.

    python benchmarks/bench_ema.py [--mnist-dir DIR] [--steps 50]
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from common import (
    jit_compile_value,
    mlp,
    mnist_train_batches,
    parse_args,
    report,
)

import kreg

DECAY = 0.999


class NumpyEMA(keras.callbacks.Callback):
    """The hand-written EMA: NumPy copies of every weight, every batch."""

    def on_train_begin(self, logs=None):
        self.shadow = [w.copy() for w in self.model.get_weights()]

    def on_train_batch_end(self, batch, logs=None):
        self.shadow = [
            DECAY * s + (1.0 - DECAY) * w
            for s, w in zip(self.shadow, self.model.get_weights())
        ]

    def on_train_end(self, logs=None):
        self.model.set_weights(self.shadow)


def timed_fit(model, x, y, batch_size, callbacks):
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False,
              verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def main():
    args = parse_args(__doc__, steps=50, rounds=11)
    batches, source = mnist_train_batches(
        args.mnist_dir, args.batch_size, args.steps
    )
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    print(f"backend {keras.backend.backend()}, data: {source}, "
          f"{args.steps} steps per fit")
    variants = {
        "without EMA": list,
        "kreg EMA": lambda: [kreg.callbacks.EMA(DECAY)],
        "hand-written NumPy EMA": lambda: [NumpyEMA()],
    }
    models, callbacks = {}, {}
    for name, make_callbacks in variants.items():
        keras.utils.set_random_seed(0)
        model = mlp(keras)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile_value(args.jit_compile),
        )
        models[name] = model
        callbacks[name] = make_callbacks()
        # Warm-up: compiles the train step (and the EMA update).
        timed_fit(model, x[: 3 * args.batch_size], y[: 3 * args.batch_size],
                  args.batch_size, callbacks[name])
    times = {name: [] for name in variants}
    for round_index in range(args.rounds):
        names = list(variants)
        if round_index % 2:
            names.reverse()
        for name in names:
            times[name].append(timed_fit(
                models[name], x, y, args.batch_size, callbacks[name]
            ) / args.steps)
    ratios = report(times, baseline="without EMA")
    hand = statistics.median(
        h / k for h, k in
        zip(times["hand-written NumPy EMA"], times["kreg EMA"])
    )
    print(f"kreg EMA / without: {ratios['kreg EMA']:.3f} (target <= 1.05): "
          f"{'OK' if ratios['kreg EMA'] <= 1.05 else 'OVER'}")
    print(f"hand-written / kreg EMA: {hand:.2f} (target >= 2): "
          f"{'OK' if hand >= 2 else 'UNDER'}")


if __name__ == "__main__":
    main()
