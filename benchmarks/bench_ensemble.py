"""k members in one fit (kreg.models.Ensemble) against k fits one by one.

The walkthrough's network (64-256-256-10 ReLU, Adam, batch 32) on
scikit-learn's digits (1,257 training images), ``--epochs`` epochs. Each
round times, interleaved (the order reversed every other round):

- ``ensemble``: build, compile and fit one ``Ensemble`` of ``--members``
  members;
- ``one by one``: build, compile and fit the member network ``--members``
  times, as a user's loop would.

Prints the median per-round time ratio ensemble / one by one (target <=
0.6) and the peak resident memory of each variant, each measured alone in
a child process.

    python benchmarks/bench_ensemble.py [--members 5] [--epochs 10]
        [--rounds 5]
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import kreg  # noqa: E402
from kreg.walkthrough.data import load_digits  # noqa: E402
from kreg.walkthrough.experiments import mlp  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only", choices=["ensemble", "one by one"],
                        help="run one variant once and print its peak "
                        "memory (used by the parent process)")
    return parser.parse_args()


def compiled(model):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    return model


def run(variant, data, args):
    start = time.perf_counter()
    if variant == "ensemble":
        ensemble = compiled(kreg.models.Ensemble(
            lambda: mlp(data, None), num_members=args.members))
        ensemble.fit(data.x_train, data.y_train, epochs=args.epochs,
                     batch_size=args.batch_size, verbose=0)
    else:
        for _ in range(args.members):
            compiled(mlp(data, None)).fit(
                data.x_train, data.y_train, epochs=args.epochs,
                batch_size=args.batch_size, verbose=0)
    return time.perf_counter() - start


def peak_memory_mb(variant):
    command = [sys.executable, __file__, "--only", variant] + [
        a for a in sys.argv[1:]]
    output = subprocess.run(command, capture_output=True, text=True,
                            check=True).stdout
    return float(output.strip().splitlines()[-1])


def main():
    args = parse_args()
    data = load_digits()
    if args.only:
        run(args.only, data, args)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    print(f"backend {keras.backend.backend()}, {args.members} members, "
          f"{args.epochs} epochs, {len(data.x_train)} training images")
    run("ensemble", data, args)  # first builds (imports, kernels)
    run("one by one", data, args)
    ratios, times = [], {"ensemble": [], "one by one": []}
    for round_index in range(args.rounds):
        order = ["ensemble", "one by one"]
        if round_index % 2:
            order.reverse()
        for variant in order:
            times[variant].append(run(variant, data, args))
        ratios.append(times["ensemble"][-1] / times["one by one"][-1])
    ratio = statistics.median(ratios)
    print(f"ensemble {statistics.median(times['ensemble']):.2f} s, one by "
          f"one {statistics.median(times['one by one']):.2f} s, ensemble / "
          f"one by one {ratio:.3f} (target <= 0.6: "
          f"{'OK' if ratio <= 0.6 else 'OVER'})")
    for variant in times:
        print(f"peak resident memory, {variant} alone: "
              f"{peak_memory_mb(variant):.0f} MB")


if __name__ == "__main__":
    main()
