"""ElasticDeformation against SciPy and the statistics of its field.

The reference warp: the layer's first draw is
``keras.random.uniform((batch, 2, H, W), -1, 1)`` with its seed (rows'
field, then columns'); SciPy smooths it (``ndimage.gaussian_filter``) and
resamples (``ndimage.map_coordinates``). The field itself is measured by
warping an image whose channels hold each pixel's row and column: bilinear
interpolation of a linear function is exact, so the output holds
``row + dy`` and ``column + dx`` wherever it is not clipped.
"""

import math

import keras
import numpy as np
import pytest

from kreg.layers import ElasticDeformation
from kreg.testing import TestCase

ndimage = pytest.importorskip("scipy.ndimage")

BACKEND = keras.backend.backend()
SCIPY_MODES = {"constant": "grid-constant", "nearest": "nearest",
               "reflect": "reflect", "mirror": "mirror", "wrap": "grid-wrap"}


def _kernel(sigma):
    """The normalized 1-D Gaussian of ``gaussian_filter`` (radius 4 sigma)."""
    offsets = np.arange(-int(4 * sigma + 0.5), int(4 * sigma + 0.5) + 1)
    kernel = np.exp(-offsets**2 / (2 * sigma**2))
    return kernel / kernel.sum()


def _coordinate_images(batch, size, copies=1):
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    image = np.stack([rows, cols] * copies, axis=-1).astype("float32")
    return np.stack([image] * batch)


def _field(layer, batch, size, copies=1):
    """``(dy, dx, inside)``: the displacements the layer applies to a batch
    of `size` x `size` images, and where they are measured exactly. With
    ``copies=2``, checks that both copies of the channels moved alike."""
    images = _coordinate_images(batch, size, copies)
    out = keras.ops.convert_to_numpy(layer(images, training=True))
    np.testing.assert_array_equal(out[..., 2:], out[..., :2 * copies - 2])
    inside = np.all((out[..., :2] > 0) & (out[..., :2] < size - 1), axis=-1)
    return out[..., 0] - images[..., 0], out[..., 1] - images[..., 1], inside


class ElasticDeformationTest(TestCase):
    def setUp(self):
        super().setUp()
        self.x = np.random.RandomState(0).rand(3, 12, 14, 2).astype(
            "float32")

    def test_inference_and_zero_alpha_return_input_exactly(self):
        layer = ElasticDeformation(seed=1)
        self.assertAllEqual(layer(self.x), self.x)
        self.assertAllEqual(layer(self.x, training=False), self.x)
        self.assertAllEqual(
            ElasticDeformation(0.0)(self.x, training=True), self.x)

    def test_matches_scipy_in_every_mode_and_data_format(self):
        alpha, sigma, seed = 6.0, 2.0, 3
        batch, height, width, channels = self.x.shape
        noise = self.to_numpy(keras.random.uniform(
            (batch, 2, height, width), -1.0, 1.0,
            seed=keras.random.SeedGenerator(seed))).astype("float64")
        rows, cols = np.meshgrid(np.arange(height), np.arange(width),
                                 indexing="ij")
        for fill_mode, interpolation in (
                ("constant", "bilinear"), ("nearest", "bilinear"),
                ("reflect", "bilinear"), ("mirror", "nearest"),
                ("wrap", "bilinear"), ("constant", "nearest")):
            expected = np.empty_like(self.x)
            for b in range(batch):
                dy, dx = (alpha * ndimage.gaussian_filter(noise[b, k], sigma)
                          for k in (0, 1))
                for c in range(channels):
                    expected[b, ..., c] = ndimage.map_coordinates(
                        self.x[b, ..., c], [rows + dy, cols + dx],
                        order=1 if interpolation == "bilinear" else 0,
                        mode=SCIPY_MODES[fill_mode], cval=0.5)
            arguments = dict(alpha=alpha, sigma=sigma, seed=seed,
                             interpolation=interpolation,
                             fill_mode=fill_mode, fill_value=0.5)
            with self.subTest(fill_mode=fill_mode,
                              interpolation=interpolation):
                last = ElasticDeformation(**arguments)(self.x, training=True)
                self.assertAllClose(last, expected, atol=1e-5)
                first = ElasticDeformation(
                    data_format="channels_first", **arguments)(
                        np.transpose(self.x, (0, 3, 1, 2)), training=True)
                self.assertAllEqual(
                    np.transpose(self.to_numpy(first), (0, 2, 3, 1)), last)

    def test_field_std_and_correlations_as_the_formula_predicts(self):
        # U(-1, 1) has variance 1/3; a normalized filter k (2-D: k k^T)
        # leaves variance (1/3) * (sum k^2)^2 away from the borders, about
        # (1/3) / (4 pi sigma^2). Neighbours `lag` apart correlate as the
        # kernel with itself: sum_i k_i k_(i+lag) / sum k^2. 16 images of
        # 64 x 64 give about 700 independent patches (4 pi sigma^2 pixels
        # each) per field at sigma=2: the std's relative standard error is
        # 0.027, the correlations' 0.04; the tolerances are about 3 of them.
        alpha, lag = 5.0, 2
        correlations = []
        for sigma in (1.0, 2.0):
            kernel = _kernel(sigma)
            expected_std = alpha * math.sqrt(1 / 3) * np.sum(kernel**2)
            self.assertAlmostEqual(
                expected_std,
                alpha / math.sqrt(12 * math.pi) / sigma,
                delta=0.02 * expected_std)
            dy, dx, inside = _field(
                ElasticDeformation(alpha, sigma, seed=4, fill_mode="nearest"),
                batch=16, size=64)
            border = int(4 * sigma + 0.5)
            core = (slice(None), slice(border, -border),
                    slice(border, -border))
            self.assertTrue(np.all(inside[core]))
            for d in (dy, dx):
                self.assertAlmostEqual(float(d[core].std()), expected_std,
                                       delta=0.08 * expected_std)
                self.assertAlmostEqual(float(d[core].mean()), 0.0,
                                       delta=0.08 * expected_std)
            self.assertLess(
                abs(np.corrcoef(dy[core].ravel(), dx[core].ravel())[0, 1]),
                0.1)
            predicted = np.sum(kernel[:-lag] * kernel[lag:]) / np.sum(
                kernel**2)
            measured = np.corrcoef(dx[core][:, :, :-lag].ravel(),
                                   dx[core][:, :, lag:].ravel())[0, 1]
            self.assertAlmostEqual(float(measured), predicted, delta=0.08)
            correlations.append(measured)
        self.assertGreater(correlations[1], correlations[0] + 0.3)

    def test_one_field_per_image_reproducible_with_a_seed(self):
        first = _field(ElasticDeformation(3.0, 2.0, seed=5), 4, 24, copies=2)
        again = _field(ElasticDeformation(3.0, 2.0, seed=5), 4, 24)
        other = _field(ElasticDeformation(3.0, 2.0, seed=6), 4, 24)
        self.assertAllEqual(first[1], again[1])
        core = (slice(6, -6), slice(6, -6))
        for b in range(1, 4):
            self.assertLess(abs(np.corrcoef(first[1][0][core].ravel(),
                                            first[1][b][core].ravel())[0, 1]),
                            0.6)
        self.assertGreater(np.abs(first[1] - other[1]).max(), 0.1)
        layer = ElasticDeformation(3.0, 2.0, seed=5)
        step1 = self.to_numpy(layer(self.x, training=True))
        step2 = self.to_numpy(layer(self.x, training=True))
        self.assertGreater(np.abs(step1 - step2).max(), 0.01)

    def test_unknown_batch_size_in_a_tf_data_map(self):
        if BACKEND != "tensorflow":
            import tensorflow as tf

            layer = ElasticDeformation(seed=1)
            dataset = tf.data.Dataset.from_tensor_slices(self.x).batch(2)
            with self.assertRaisesRegex(ValueError, "`inputs`.*TensorFlow"):
                next(iter(dataset.map(lambda b: layer(b, training=True))))
            return
        import tensorflow as tf

        layer = ElasticDeformation(4.0, 2.0, seed=1)
        dataset = tf.data.Dataset.from_tensor_slices(self.x).batch(2).map(
            lambda b: layer(b, training=True),
            num_parallel_calls=tf.data.AUTOTUNE)
        self.assertIsNone(dataset.element_spec.shape[0])
        epoch1 = np.concatenate([b.numpy() for b in dataset])
        epoch2 = np.concatenate([b.numpy() for b in dataset])
        self.assertEqual(epoch1.shape, self.x.shape)
        self.assertGreater(np.abs(epoch1 - self.x).max(), 0.05)
        self.assertGreater(np.abs(epoch1 - epoch2).max(), 0.05)

    def test_mixed_float16_output(self):
        with self.mixed_precision("mixed_float16"):
            layer = ElasticDeformation(2.0, 1.0, seed=1)
            y = layer(keras.ops.cast(self.x, "float16"), training=True)
            self.assertEqual(keras.backend.standardize_dtype(y.dtype),
                             "float16")
            self.assertTrue(np.all(np.isfinite(self.to_numpy(y))))

    def test_config_save_load_and_compiled_fit(self):
        _, revived = self.run_config_round_trip(ElasticDeformation(
            10.0, 3.0, seed=2, fill_mode="reflect",
            data_format="channels_first"))
        self.assertEqual((revived.alpha, revived.sigma, revived.fill_mode),
                         (10.0, 3.0, "reflect"))
        self.assertEqual(revived.data_format, "channels_first")
        model = keras.Sequential([
            keras.Input((12, 14, 2)), keras.layers.Rescaling(2.0),
            ElasticDeformation(3.0, 2.0, seed=1),
            keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
            keras.layers.Dense(1),
        ])
        self.run_compiled_fit(model, self.x, self.x[:, 0, 0, :1])
        self.run_save_load(model, self.x)

    def test_bad_arguments(self):
        for arguments, pattern in (
                (dict(alpha=-1.0), r"`alpha`.*alpha=-1.0"),
                (dict(sigma=0.0), r"`sigma`.*sigma=0.0"),
                (dict(sigma=-2.0), r"`sigma`.*sigma=-2.0"),
                (dict(interpolation="bicubic"), r"`interpolation`.*bicubic"),
                (dict(fill_mode="edge"), r"`fill_mode`.*edge"),
                (dict(data_format="nhwc"), r"`data_format`.*nhwc")):
            with self.subTest(**arguments):
                with self.assertRaisesRegex(ValueError, pattern):
                    ElasticDeformation(**arguments)
        with self.assertRaisesRegex(TypeError, r"`seed`.*'1'"):
            ElasticDeformation(seed="1")
        for shape in ((28, 28), (None, None, 1)):
            with self.subTest(shape=shape):
                with self.assertRaisesRegex(ValueError,
                                            r"`inputs`.*inputs.shape="):
                    keras.Sequential([keras.Input(shape),
                                      ElasticDeformation()])
