"""The displacement field of Keras's RandomElasticTransform, measured.

Warps a batch of 64 x 64 images whose two channels hold each pixel's own
row and column (bilinear interpolation of a linear function is exact), with
``RandomElasticTransform(factor=(1, 1), scale=1, fill_mode="nearest",
value_range=(0, 64))``, and prints, over the pixels read from inside the
image: the largest |dx - dy|, the correlation of dx and dy, and how many of
the images were not warped at all. kreg's ElasticDeformation is measured
the same way beside it.

    KERAS_BACKEND=jax python benchmarks/keras_elastic_field.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from kreg.layers import ElasticDeformation

SIZE, BATCH = 64, 16


def field(layer):
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    image = np.stack([rows, cols], axis=-1).astype("float32")
    images = np.stack([image] * BATCH)
    out = keras.ops.convert_to_numpy(layer(images, training=True))
    inside = np.all((out > 0) & (out < SIZE - 1), axis=-1)
    return out[..., 0] - rows, out[..., 1] - cols, inside


def main():
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}")
    layers = {
        "keras RandomElasticTransform": keras.layers.RandomElasticTransform(
            factor=(1.0, 1.0), scale=1.0, fill_mode="nearest",
            value_range=(0, SIZE), seed=1),
        "kreg ElasticDeformation(34, 4)": ElasticDeformation(
            34.0, 4.0, fill_mode="nearest", seed=1),
    }
    for name, layer in layers.items():
        dy, dx, inside = field(layer)
        still = int(np.sum(np.abs(dx).max(axis=(1, 2)) +
                           np.abs(dy).max(axis=(1, 2)) < 1e-4))
        corr = np.corrcoef(dx[inside], dy[inside])[0, 1]
        gap = np.abs(dx - dy)[inside]
        print(f"{name}: |dx - dy| median {np.median(gap):.2g} px, 99th "
              f"percentile {np.percentile(gap, 99):.2g} px, max "
              f"{gap.max():.2g} px; corr(dx, dy) {corr:.3f}, std dx "
              f"{dx[inside].std():.2f} px, dy {dy[inside].std():.2f} px, "
              f"images not warped "
              f"{still} of {BATCH}")


if __name__ == "__main__":
    main()
