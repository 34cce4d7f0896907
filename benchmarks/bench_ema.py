"""fit time: kreg.callbacks.EMA vs no EMA, Keras's built-in EMA and a
hand-written NumPy EMA.

Three configurations (``--config``, default ``all``):

- ``mlp``: the benchmark MLP 784-512-512-10 (0.67M weights), batch
  ``--batch-size`` (128): compute dominates.
- ``wide``: MLP 784-2048-2048-10 (5.8M weights), batch ``--wide-batch-size``
  (8): the per-step cost is dominated by touching the weights, where an EMA
  (which touches every weight again) matters most.
- ``deep``: 24 blocks Dense(128)-BatchNormalization-ReLU (0.49M weights in
  146 variables), batch ``--deep-batch-size`` (256): a deep network, where
  a hand-written callback pays per variable (each ``get_weights`` and
  ``set_weights`` element is one host transfer) and kreg's swaps at each
  epoch are one compiled call for all variables.

SGD. For each configuration one model is fit without EMA, with kreg's EMA
and with the hand-written one (one model: the same compiled step and
buffers), a second model from the same weights with Keras's EMA; each round
runs one ``fit`` epoch of ``--steps`` batches per variant, interleaved
(order reversed every other round). Keras's built-in is the optimizer's
``use_ema=True`` (updated inside the optimizer step). The hand-written
callbacks are what users write: the issue's reference does ``get_weights``,
NumPy arithmetic and ``set_weights`` (into a second model holding the
average) after every batch; the lighter one, widely copied from Keras 2
code, does ``get_weights`` and NumPy arithmetic after every batch and
``set_weights`` only at the end. Prints, per configuration, median
per-round ratios of whole-``fit`` times; targets: EMA / without <= 1.05,
kreg EMA / Keras use_ema <= 1.05 and hand-written (get/set) / kreg EMA
>= 2; hand-written (get only) / kreg EMA is printed too.

    python benchmarks/bench_ema.py [--mnist-dir DIR] [--steps 100]
        [--config all|mlp|wide|deep] [--wide-batch-size 8]
        [--deep-batch-size 256]
"""

import os
import statistics
import sys
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
HAND = "hand-written get/set"
HAND_GET_ONLY = "hand-written get only"


class NumpyEMA(keras.callbacks.Callback):
    """The hand-written EMA of the issue: ``get_weights`` and
    ``set_weights`` every batch. The average is kept in a second model
    (``ema_model``, a clone) that other code can evaluate or save at any
    time; it goes into the trained model at the end."""

    def __init__(self, ema_model):
        super().__init__()
        self.ema_model = ema_model

    def on_train_begin(self, logs=None):
        self.shadow = [w.copy() for w in self.model.get_weights()]
        self.ema_model.set_weights(self.shadow)

    def on_train_batch_end(self, batch, logs=None):
        self.shadow = [
            DECAY * s + (1.0 - DECAY) * w
            for s, w in zip(self.shadow, self.model.get_weights())
        ]
        self.ema_model.set_weights(self.shadow)

    def on_train_end(self, logs=None):
        self.model.set_weights(self.shadow)


class NumpyEMAGetOnly(keras.callbacks.Callback):
    """The lighter hand-written EMA widely copied from Keras 2 code (the
    "ExponentialMovingAverage" callback): ``get_weights`` and NumPy
    arithmetic every batch, ``set_weights`` only at the end."""

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
    elapsed = time.perf_counter() - start
    if model.optimizer.use_ema and keras.backend.backend() == "jax":
        # Keras's use_ema ends a fit with each weight sharing its buffer
        # with its average; the next fit then fails on JAX ("Attempt to
        # donate the same buffer twice"). Untimed workaround: copies.
        for variable in model.trainable_variables:
            variable.assign(keras.ops.copy(variable.value))
    return elapsed


CONFIGS = {
    # name: (hidden widths, batch size argument)
    "mlp": ((512, 512), "batch_size"),
    "wide": ((2048, 2048), "wide_batch_size"),
    "deep": ((128,) * 24, "deep_batch_size"),
}


def own_args():
    """Takes this script's own options out of sys.argv (common.parse_args
    knows only the shared ones)."""
    own = {"--config": "all", "--wide-batch-size": "8",
           "--deep-batch-size": "256"}
    rest = [sys.argv[0]]
    argv = iter(sys.argv[1:])
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in own:
            own[key] = value or next(argv)
        else:
            rest.append(arg)
    sys.argv = rest
    config = own["--config"]
    if config not in ("all", *CONFIGS):
        raise SystemExit(
            f"--config must be all, {', '.join(CONFIGS)}: {config!r}")
    names = list(CONFIGS) if config == "all" else [config]
    return names, {"wide_batch_size": int(own["--wide-batch-size"]),
                   "deep_batch_size": int(own["--deep-batch-size"])}


def run_config(name, args, batch_size):
    hidden, _ = CONFIGS[name]
    normalization = keras.layers.BatchNormalization if name == "deep" else None
    batches, source = mnist_train_batches(args.mnist_dir, batch_size,
                                          args.steps)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    variants = {
        "without EMA": lambda model: [],
        "kreg EMA": lambda model: [kreg.callbacks.EMA(DECAY)],
        "Keras SGD(use_ema=True)": lambda model: [],
        HAND: lambda model: [NumpyEMA(keras.models.clone_model(model))],
        HAND_GET_ONLY: lambda model: [NumpyEMAGetOnly()],
    }
    models, callbacks = {}, {}
    shared = None
    for variant, make_callbacks in variants.items():
        use_ema = variant.startswith("Keras")
        callbacks[variant] = make_callbacks(shared)
        if shared is not None and not use_ema:
            # The callback variants share one model (same compiled step,
            # same buffers): differences between model instances would
            # otherwise show up as EMA cost.
            models[variant] = shared
            timed_fit(shared, x[: 3 * batch_size], y[: 3 * batch_size],
                      batch_size, callbacks[variant])
            continue
        keras.utils.set_random_seed(0)
        model = mlp(keras, hidden=hidden, normalization=normalization)
        model.compile(
            optimizer=keras.optimizers.SGD(
                0.01, use_ema=use_ema, ema_momentum=DECAY
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile_value(args.jit_compile),
        )
        models[variant] = model
        if not use_ema:
            shared = model
        # Warm-up: compiles the train step (and the EMA update).
        timed_fit(model, x[: 3 * batch_size], y[: 3 * batch_size],
                  batch_size, callbacks[variant])
    shape = (f"{len(hidden)} x Dense({hidden[0]})-BatchNormalization"
             if normalization else f"784-{'-'.join(map(str, hidden))}-10")
    print(f"\n[{name}] MLP {shape}, "
          f"{models['without EMA'].count_params() / 1e6:.2f}M weights in "
          f"{len(models['without EMA'].weights)} variables, "
          f"batch {batch_size}, {args.steps} steps per fit, "
          f"{args.rounds} rounds, data: {source}")
    times = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        names = list(variants)
        if round_index % 2:
            names.reverse()
        for variant in names:
            times[variant].append(timed_fit(
                models[variant], x, y, batch_size, callbacks[variant]
            ) / args.steps)
    ratios = report(times, baseline="without EMA")

    def median_ratio(numerator, denominator):
        return statistics.median(
            n / d for n, d in zip(times[numerator], times[denominator])
        )

    # Supplementary (not a target): the time each EMA adds per step.
    extra = {
        variant: 1e3 * statistics.median(
            v - b for v, b in zip(times[variant], times["without EMA"])
        )
        for variant in ("kreg EMA", HAND, HAND_GET_ONLY)
    }
    print(f"[{name}] added per step (median of per-round differences): "
          f"kreg EMA {extra['kreg EMA']:+.2f} ms, hand-written "
          f"{extra[HAND]:+.2f} ms (get only: {extra[HAND_GET_ONLY]:+.2f})")
    print(f"[{name}] kreg EMA / without: {ratios['kreg EMA']:.3f} "
          f"(target <= 1.05): "
          f"{'OK' if ratios['kreg EMA'] <= 1.05 else 'OVER'}")
    builtin = median_ratio("kreg EMA", "Keras SGD(use_ema=True)")
    print(f"[{name}] kreg EMA / Keras use_ema: {builtin:.3f} "
          f"(target <= 1.05): {'OK' if builtin <= 1.05 else 'OVER'}")
    hand = median_ratio(HAND, "kreg EMA")
    print(f"[{name}] hand-written (get/set_weights every batch) / kreg "
          f"EMA: {hand:.2f} (target >= 2): "
          f"{'OK' if hand >= 2 else 'UNDER'}")
    get_only = median_ratio(HAND_GET_ONLY, "kreg EMA")
    print(f"[{name}] hand-written, get_weights only / kreg EMA: "
          f"{get_only:.2f} (no target)")
    for variant in (HAND, HAND_GET_ONLY):
        if extra["kreg EMA"] < 0.01:  # below the noise: no ratio
            added = "n/a (kreg adds < 0.01 ms)"
        else:
            added = f"{extra[variant] / extra['kreg EMA']:.1f}x"
        print(f"[{name}] time added by the EMA, {variant} / kreg: {added}")


def main():
    names, sizes = own_args()
    args = parse_args(__doc__, steps=100, rounds=11)
    print(f"backend {keras.backend.backend()}")
    sizes["batch_size"] = args.batch_size
    for name in names:
        run_config(name, args, sizes[CONFIGS[name][1]])


if __name__ == "__main__":
    main()
