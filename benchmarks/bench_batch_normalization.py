"""Train-step time: kreg.layers.BatchNormalization vs keras's, same MLP.

MLP 784-512-512-10 with batch normalization after each hidden Dense, batch
128, SGD; the two variants start from the same weights and are timed
interleaved. Prints the median per-round ratio kreg / Keras (target <= 1.05).

    python benchmarks/bench_batch_normalization.py [--mnist-dir DIR]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from common import interleaved  # noqa: E402
from common import jit_compile_value  # noqa: E402
from common import mlp  # noqa: E402
from common import mnist_train_batches  # noqa: E402
from common import parse_args  # noqa: E402
from common import report  # noqa: E402

import kreg  # noqa: E402


def main():
    args = parse_args(__doc__)
    batches, source = mnist_train_batches(
        args.mnist_dir, args.batch_size, args.steps
    )
    print(f"backend {keras.backend.backend()}, data: {source}")
    models = {}
    for name, layer in [
        ("keras.BatchNormalization", keras.layers.BatchNormalization),
        ("kreg.BatchNormalization", kreg.layers.BatchNormalization),
    ]:
        keras.utils.set_random_seed(0)
        model = mlp(keras, normalization=layer)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile_value(args.jit_compile),
        )
        models[name] = model
    times = interleaved(models, batches, args.rounds)
    report(times, baseline="keras.BatchNormalization", limit=1.05)


if __name__ == "__main__":
    main()
