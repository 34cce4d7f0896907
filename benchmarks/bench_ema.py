"""fit time with kreg.callbacks.EMA, as users write it, against fit without.

The issue's benchmark MLP: 784-512-BatchNormalization-512-BatchNormalization
-10 (ReLU), batch ``--batch-size`` (128), ``--steps`` (64) batches per
epoch, SGD with momentum, validation on 1024 images after every epoch. Two
models from the same weights: one fit without an EMA, one with
``callbacks=[kreg.callbacks.EMA()]``. Each round runs one ``fit`` of each,
interleaved (the order reversed every other round), for fits of 1 epoch
and of 10 epochs.

- ``--mode fresh`` (default): a new ``EMA()`` in every fit, as users write
  it. The first fit of each model (which compiles the train step) is not
  timed.
- ``--mode reused``: one ``EMA()`` instance passed to every fit.

Prints the median per-round ratio of whole-``fit`` times, EMA / without
(targets: <= 1.15 for 1-epoch fits, <= 1.05 for 10-epoch fits), over
``--rounds`` rounds of 1-epoch fits and a third as many of longer ones.

    python benchmarks/bench_ema.py [--mnist-dir DIR] [--mode fresh|reused]
        [--rounds 15] [--epochs 1,10]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from common import mlp, mnist_train_batches

import kreg


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--mode", choices=["fresh", "reused"],
                        default="fresh")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", default="1,10")
    return parser.parse_args()


def compiled(weights):
    model = mlp(keras, normalization=keras.layers.BatchNormalization)
    model.set_weights(weights)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def timed_fit(model, data, epochs, callbacks):
    x, y, validation, batch_size = data
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs,
              validation_data=validation, shuffle=False, verbose=0,
              callbacks=callbacks)
    return time.perf_counter() - start


def main():
    args = parse_args()
    batches, source = mnist_train_batches(
        args.mnist_dir, args.batch_size, args.steps + 8)
    x = np.concatenate([b[0] for b in batches[:args.steps]])
    y = np.concatenate([b[1] for b in batches[:args.steps]])
    validation = (np.concatenate([b[0] for b in batches[args.steps:]]),
                  np.concatenate([b[1] for b in batches[args.steps:]]))
    data = (x, y, validation, args.batch_size)
    print(f"backend {keras.backend.backend()}, data: {source}, "
          f"{args.steps} steps of {args.batch_size} per epoch, "
          f"mode {args.mode}")
    keras.utils.set_random_seed(0)
    weights = mlp(keras, normalization=keras.layers.BatchNormalization
                  ).get_weights()
    plain, averaged = compiled(weights), compiled(weights)
    reused = kreg.callbacks.EMA()

    def ema():
        return [reused if args.mode == "reused" else kreg.callbacks.EMA()]

    # The first fit of each model compiles its train step.
    timed_fit(plain, data, 1, [])
    timed_fit(averaged, data, 1, ema())
    for epochs in (int(e) for e in args.epochs.split(",")):
        ratios, without, with_ema = [], [], []
        rounds = args.rounds if epochs == 1 else max(3, args.rounds // 3)
        for round_index in range(rounds):
            order = [("plain", plain), ("ema", averaged)]
            if round_index % 2:
                order.reverse()
            times = {}
            for name, model in order:
                callbacks = ema() if name == "ema" else []
                times[name] = timed_fit(model, data, epochs, callbacks)
            without.append(times["plain"])
            with_ema.append(times["ema"])
            ratios.append(times["ema"] / times["plain"])
        limit = 1.15 if epochs == 1 else 1.05
        ratio = statistics.median(ratios)
        print(f"{epochs:>2}-epoch fits: without {statistics.median(without):.3f}"
              f" s, with EMA {statistics.median(with_ema):.3f} s, "
              f"EMA / without {ratio:.3f} (target <= {limit}: "
              f"{'OK' if ratio <= limit else 'OVER'})")


if __name__ == "__main__":
    main()
