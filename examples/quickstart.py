"""kreg quickstart: the same network trained plainly and with kreg's layers.

Real data that ships with scikit-learn (8x8 handwritten digits, 1,797
images), a 64-256-256-10 MLP, a fixed train/test split, several seeds. The
"kreg layers" arm adds GaussianNoise on the inputs, BatchNormalization after
each hidden Dense and Dropout (0.2 on inputs, 0.5 on hidden units, the
lecture's typical rates). Prints train and test accuracy (mean +- std over
the seeds) for each arm.

    python examples/quickstart.py [--epochs 40] [--seeds 3]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kreg  # noqa: E402
from kreg.walkthrough.data import load_digits  # noqa: E402


def plain_network():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def kreg_network(seed):
    layers = [
        keras.Input((64,)),
        kreg.layers.GaussianNoise(0.3, seed=seed),
        kreg.layers.Dropout(0.2, seed=seed),
    ]
    for width in (256, 256):
        layers += [
            keras.layers.Dense(width),
            kreg.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            kreg.layers.Dropout(0.5, seed=seed),
        ]
    layers.append(keras.layers.Dense(10))
    return keras.Sequential(layers)


def train(model, data, epochs):
    x_train, y_train, x_test, y_test = data
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    _, train_accuracy = model.evaluate(x_train, y_train, verbose=0)
    _, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    return train_accuracy, test_accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    digits = load_digits()  # standardized to mean 0, std 1 (the lecture)
    data = (digits.x_train, digits.y_train, digits.x_test, digits.y_test)
    print(
        f"kreg {kreg.__version__} on Keras {keras.__version__} "
        f"({keras.backend.backend()}); digits: {len(data[0])} train, "
        f"{len(data[2])} test images; {args.epochs} epochs x "
        f"{args.seeds} seeds"
    )
    arms = {
        "plain": lambda seed: plain_network(),
        "kreg layers": kreg_network,
    }
    results = {}
    for name, build in arms.items():
        start = time.perf_counter()
        scores = []
        for seed in range(args.seeds):
            keras.utils.set_random_seed(seed)
            scores.append(train(build(seed), data, args.epochs))
            print(f"  {name:<12} seed {seed}: train {scores[-1][0]:.4f} "
                  f"test {scores[-1][1]:.4f}", flush=True)
        results[name] = (np.array(scores), time.perf_counter() - start)

    print()
    print("| network     | train accuracy   | test accuracy    | time  |")
    print("| ----------- | ---------------- | ---------------- | ----- |")
    for name, (scores, seconds) in results.items():
        mean, std = scores.mean(0), scores.std(0)
        print(
            f"| {name:<11} | {mean[0]:.4f} +- {std[0]:.4f} | "
            f"{mean[1]:.4f} +- {std[1]:.4f} | {seconds:4.0f}s |"
        )


if __name__ == "__main__":
    main()
