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
- ``--keras``: also times, in the same rounds, a third model compiled with
  Keras's own per-step average, ``SGD(..., use_ema=True,
  ema_momentum=0.999)``: the cost of an exact EMA in Keras itself.

Prints the median per-round ratio of whole-``fit`` times, EMA / without
(targets: <= 1.15 for 1-epoch fits, <= 1.05 for 10-epoch fits), over
``--rounds`` rounds of 1-epoch fits and a third as many of longer ones.

    python benchmarks/bench_ema.py [--mnist-dir DIR] [--mode fresh|reused]
        [--rounds 15] [--epochs 1,10] [--keras]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from common import mlp
from common import mnist_train_batches

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
    parser.add_argument("--keras", action="store_true")
    return parser.parse_args()


def compiled(weights, use_ema=False):
    model = mlp(keras, normalization=keras.layers.BatchNormalization)
    model.set_weights(weights)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9, use_ema=use_ema,
                                       ema_momentum=0.999),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def timed_fit(model, data, epochs, callbacks):
    x, y, validation, batch_size = data
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs,
              validation_data=validation, shuffle=False, verbose=0,
              callbacks=callbacks)
    elapsed = time.perf_counter() - start
    if model.optimizer.use_ema:
        unalias(model)
    return elapsed


def unalias(model):
    """Gives each weight a buffer of its own again. Keras's `use_ema` ends
    a fit by assigning the averages to the weights; on JAX a weight then
    shares its buffer with its average, and the next fit, which donates
    both, fails ("Attempt to donate the same buffer twice")."""
    for variable in model.trainable_variables:
        variable.assign(keras.ops.copy(variable))


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
    models = {"without": compiled(weights), "EMA": compiled(weights)}
    if args.keras:
        models["Keras use_ema"] = compiled(weights, use_ema=True)
    reused = kreg.callbacks.EMA()

    def callbacks(name):
        if name != "EMA":
            return []
        return [reused if args.mode == "reused" else kreg.callbacks.EMA()]

    for name, model in models.items():  # the first fit compiles the step
        timed_fit(model, data, 1, callbacks(name))
    for epochs in (int(e) for e in args.epochs.split(",")):
        times = {name: [] for name in models}
        rounds = args.rounds if epochs == 1 else max(3, args.rounds // 3)
        for round_index in range(rounds):
            order = list(models)
            order = order[round_index % len(order):] + order[
                :round_index % len(order)]
            if round_index % 2:
                order.reverse()
            for name in order:
                times[name].append(timed_fit(models[name], data, epochs,
                                             callbacks(name)))
        limit = 1.15 if epochs == 1 else 1.05
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"{epochs:>2}-epoch fits: " + ", ".join(
            f"{name} {median:.3f} s" for name, median in medians.items()))
        for name in list(models)[1:]:
            ratio = statistics.median(
                a / b for a, b in zip(times[name], times["without"]))
            verdict = (f" (target <= {limit}: "
                       f"{'OK' if ratio <= limit else 'OVER'})"
                       if name == "EMA" else "")
            print(f"    {name} / without {ratio:.3f}{verdict}")
        if args.keras:
            ratio = statistics.median(a / b for a, b in zip(
                times["EMA"], times["Keras use_ema"]))
            print(f"    EMA / Keras use_ema {ratio:.3f}")


if __name__ == "__main__":
    main()
