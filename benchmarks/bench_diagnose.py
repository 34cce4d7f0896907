"""kreg.diagnose against 3 train steps of the same model.

A 20-layer MLP of 256 ReLU units (256 inputs, 10 classes), compiled with
SGD; one batch of 256 samples. Per round: one `kreg.diagnose(model, x, y)`
call (forward and backward pass) and 3 `train_on_batch` steps (already
compiled), interleaved. Prints the medians and the median per-round ratio
diagnose / (3 train steps) (target <= 1).

    python benchmarks/bench_diagnose.py [--rounds 15]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kreg  # noqa: E402


def model_and_batch(depth=20, width=256, batch=256, classes=10):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(width, activation="relu")
               for _ in range(depth - 1)]
    layers.append(keras.layers.Dense(classes))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(0)
    x = rng.normal(size=(batch, width)).astype("float32")
    y = rng.randint(0, classes, batch).astype("int32")
    return model, x, y


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    model, x, y = model_and_batch()
    print(f"backend {keras.backend.backend()}, Keras {keras.__version__}")
    # Warm-up: compile the train step; the first diagnose call of a model.
    start = time.perf_counter()
    kreg.diagnose(model, x, y)
    first = time.perf_counter() - start
    for _ in range(3):
        model.train_on_batch(x, y)
    diagnose_times, train_times = [], []
    for round_index in range(args.rounds):
        order = ("diagnose", "train") if round_index % 2 else (
            "train", "diagnose")
        for name in order:
            start = time.perf_counter()
            if name == "diagnose":
                report = kreg.diagnose(model, x, y)
                diagnose_times.append(time.perf_counter() - start)
            else:
                for _ in range(3):
                    loss = model.train_on_batch(x, y)
                float(loss)  # waits for the last step
                train_times.append(time.perf_counter() - start)
    ratio = statistics.median(
        d / t for d, t in zip(diagnose_times, train_times))
    print(f"first diagnose call        {1e3 * first:8.1f} ms")
    print(f"diagnose                   "
          f"{1e3 * statistics.median(diagnose_times):8.1f} ms (median)")
    print(f"3 train steps              "
          f"{1e3 * statistics.median(train_times):8.1f} ms (median)")
    verdict = "OK" if ratio <= 1 else "OVER"
    print(f"ratio diagnose / 3 steps   {ratio:8.2f}  (target <= 1: "
          f"{verdict}); problems found: {len(report.problems)}")


if __name__ == "__main__":
    main()
