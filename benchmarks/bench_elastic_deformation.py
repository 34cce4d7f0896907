"""Cost of kreg.layers.ElasticDeformation against Keras's image layers.

1. Layers: train steps of ``Input(28, 28, 1) -> augmentation -> Flatten ->
   Dense(10)`` on batches of ``--batch-size`` (128), compiled as Keras
   compiles by default, for no augmentation, kreg's
   ``ElasticDeformation(34, 4)``, Keras's
   ``RandomElasticTransform(factor=(1, 1))`` (every image warped) and
   ``RandomTranslation(0.1, 0.1)``, interleaved round by round. Target:
   ElasticDeformation / RandomElasticTransform <= 1.5.
2. Epoch: one ``fit`` epoch of the MLP 784-512-512-10 on the 60,000 MNIST
   training images, with ElasticDeformation against without. On the
   TensorFlow backend the augmentation runs in a ``tf.data`` map with
   ``num_parallel_calls=AUTOTUNE`` (``--epoch-mode tf.data``); on the
   others, as the model's first layer. Target: <= 1.3.

    KERAS_BACKEND=jax python benchmarks/bench_elastic_deformation.py \\
        [--mnist-dir DIR] [--rounds 15] [--steps 20] [--epoch-rounds 3]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from common import interleaved
from common import mlp
from common import report

from kreg.layers import ElasticDeformation
from kreg.walkthrough.data import load_mnist_idx


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epoch-rounds", type=int, default=3,
                        help="rounds of the epoch comparison (0: skip it)")
    return parser.parse_args()


def images(folder, count):
    """MNIST training images in [0, 1] with labels, or random ones."""
    if folder:
        mnist = load_mnist_idx(folder)
        x, y = mnist.x_train[:count], mnist.y_train[:count]
    else:
        rng = np.random.RandomState(0)
        x = rng.rand(count, 784).astype("float32")
        y = rng.randint(0, 10, count)
    x = np.asarray(x, "float32").reshape(-1, 28, 28, 1)
    return x / max(float(x.max()), 1.0), np.asarray(y, "int32")


def layer_models():
    variants = {
        "no augmentation": None,
        "kreg ElasticDeformation": lambda: ElasticDeformation(34.0, 4.0,
                                                              seed=1),
        "keras RandomElasticTransform": lambda: (
            keras.layers.RandomElasticTransform(
                factor=(1.0, 1.0), value_range=(0, 1), seed=1)),
        "keras RandomTranslation": lambda: keras.layers.RandomTranslation(
            0.1, 0.1, seed=1),
    }
    models = {}
    for name, make in variants.items():
        layers = [keras.Input((28, 28, 1))]
        layers += [] if make is None else [make()]
        layers += [keras.layers.Flatten(), keras.layers.Dense(10)]
        model = keras.Sequential(layers)
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        models[name] = model
    return models


def fit_epoch(model, data, batch_size):
    start = time.perf_counter()
    if isinstance(data, tuple):
        model.fit(*data, batch_size=batch_size, epochs=1, verbose=0)
    else:
        model.fit(data, epochs=1, verbose=0)
    return time.perf_counter() - start


def epoch_variants(x, y, batch_size):
    """name -> (model, data): the MLP with and without the augmentation."""
    def classifier(augment):
        body = mlp(keras)
        layers = [keras.Input((28, 28, 1))]
        if augment and keras.backend.backend() != "tensorflow":
            layers.append(ElasticDeformation(34.0, 4.0, seed=1))
        model = keras.Sequential(layers + [keras.layers.Flatten(), body])
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        return model

    if keras.backend.backend() != "tensorflow":
        return {"MLP": (classifier(False), (x, y)),
                "MLP, ElasticDeformation in the model":
                    (classifier(True), (x, y))}
    import tensorflow as tf

    augment = ElasticDeformation(34.0, 4.0, seed=1)

    def dataset(with_augment):
        data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
            len(x), seed=0).batch(batch_size)
        if with_augment:
            data = data.map(lambda a, b: (augment(a, training=True), b),
                            num_parallel_calls=tf.data.AUTOTUNE)
        return data.prefetch(tf.data.AUTOTUNE)

    return {"MLP": (classifier(False), dataset(False)),
            "MLP, ElasticDeformation in tf.data":
                (classifier(True), dataset(True))}


def main():
    args = parse_args()
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}")
    x, y = images(args.mnist_dir, 60000)
    batches = [(x[i * args.batch_size:(i + 1) * args.batch_size],
                y[i * args.batch_size:(i + 1) * args.batch_size])
               for i in range(args.steps)]
    models = layer_models()
    for name, model in list(models.items()):
        try:
            model.train_on_batch(*batches[0])
        except Exception as error:  # a Keras layer that fails to compile
            print(f"{name}: cannot train on {keras.backend.backend()}: "
                  f"{type(error).__name__}: {str(error)[:200]}")
            del models[name]
    times = interleaved(models, batches, args.rounds)
    baseline = "keras RandomElasticTransform"
    ratios = report(times, baseline if baseline in times else
                    "keras RandomTranslation")
    if baseline in times:
        print(f"ElasticDeformation / RandomElasticTransform: "
              f"{ratios['kreg ElasticDeformation']:.3f} (target <= 1.5)")
    if args.epoch_rounds <= 0:
        return
    variants = epoch_variants(x, y, args.batch_size)
    for model, data in variants.values():
        fit_epoch(model, data, args.batch_size)  # compiles
    epochs = {name: [] for name in variants}
    for round_index in range(args.epoch_rounds):
        names = list(variants)[::-1 if round_index % 2 else 1]
        for name in names:
            epochs[name].append(fit_epoch(*variants[name], args.batch_size))
    base = epochs["MLP"]
    for name, values in epochs.items():
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"{name:<38} median epoch {statistics.median(values):7.2f} s"
              f"   ratio to MLP: {ratio:.3f}")
    print("target for the augmented epoch: <= 1.3")


if __name__ == "__main__":
    main()
