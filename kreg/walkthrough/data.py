"""Offline data sets for the walkthrough and the benchmarks.

Every loader returns a `Dataset` of NumPy arrays with inputs standardized to
mean 0 and standard deviation 1 on the training split (the lecture: scale
the inputs so every dimension is treated alike). Nothing here downloads:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images).
- ``breast_cancer``: scikit-learn's bundled tabular set (569 x 30, 2 classes).
- ``mnist``: the four standard IDX files (gzipped or not) in a local folder,
  or a tensorflow-datasets copy already prepared under that folder.
- any other name: a tensorflow-datasets data set already prepared under
  ``data_dir`` (never downloaded; tfds would retry the network for minutes).
"""

import dataclasses
import gzip
import os
import struct

import numpy as np

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass
class Dataset:
    """Train and test arrays of a classification problem."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str

    @property
    def input_dim(self):
        return int(np.prod(self.x_train.shape[1:]))

    def subset(self, train_size, seed=0, test_size=None):
        """A copy with random subsets of `train_size` training rows (and of
        `test_size` test rows); None keeps all."""
        rng = np.random.RandomState(seed)
        data = self
        for split, size in (("train", train_size), ("test", test_size)):
            x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
            if size is None or size >= len(x):
                continue
            index = np.sort(rng.permutation(len(x))[:size])
            data = dataclasses.replace(
                data, **{f"x_{split}": x[index], f"y_{split}": y[index]})
        return data


def class_split(dataset, classes):
    """A copy holding only `classes` (both splits), relabelled 0, 1, ...
    in the order given; the inputs keep their standardization."""
    classes = [int(c) for c in classes]
    relabel = np.full(dataset.num_classes, -1, dtype="int32")
    relabel[classes] = np.arange(len(classes), dtype="int32")
    arrays = {}
    for split in ("train", "test"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        keep = np.isin(y, classes)
        arrays[f"x_{split}"] = x[keep]
        arrays[f"y_{split}"] = relabel[y[keep]]
    names = ", ".join(str(c) for c in classes)
    return dataclasses.replace(
        dataset, num_classes=len(classes),
        source=f"{dataset.source}, classes {names}", **arrays)


def labelled_indices(labels, fraction, seed):
    """Training rows for a labelled subset of `fraction` of `labels`.

    Stratified: about `fraction` of every class (rounded, at least one
    image per class), drawn with `seed`; returned sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            "Invalid value received for argument `fraction`. Expected a "
            f"float in (0, 1]. Received: fraction={fraction}")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(rows))))
        chosen.append(rng.choice(rows, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def labelled_subset(dataset, fraction, seed):
    """A copy whose training split is a stratified `fraction` of its
    labelled rows (`labelled_indices`); the test split is kept."""
    index = labelled_indices(dataset.y_train, fraction, seed)
    return dataclasses.replace(dataset, x_train=dataset.x_train[index],
                               y_train=dataset.y_train[index])


def repeated(dataset, rows):
    """A copy whose training split is its rows cycled in order to `rows`
    rows (each row `rows // n` or one more times), or kept when it has
    more; the test split is kept."""
    index = np.arange(max(rows, len(dataset.y_train))) % len(dataset.y_train)
    return dataclasses.replace(dataset, x_train=dataset.x_train[index],
                               y_train=dataset.y_train[index])


def standardize(x_train, x_test):
    """Scales every input dimension to mean 0 and std 1 on the train split."""
    x_train = x_train.reshape(len(x_train), -1).astype("float32")
    x_test = x_test.reshape(len(x_test), -1).astype("float32")
    mean = x_train.mean(0)
    std = x_train.std(0)
    std[std == 0] = 1.0
    return (x_train - mean) / std, (x_test - mean) / std


def _split(name, x, y, source, test_size, seed):
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    x_train, x_test = standardize(x_train, x_test)
    return Dataset(
        name, x_train, y_train.astype("int32"), x_test,
        y_test.astype("int32"), int(y.max()) + 1, source,
    )


def load_digits(test_size=0.3, seed=0):
    """scikit-learn's bundled 8x8 handwritten digits, 10 classes."""
    from sklearn import datasets

    bunch = datasets.load_digits()
    return _split("digits", bunch.data, bunch.target,
                  "scikit-learn load_digits (bundled)", test_size, seed)


def load_breast_cancer(test_size=0.3, seed=0):
    """scikit-learn's bundled Wisconsin breast-cancer table, 2 classes."""
    from sklearn import datasets

    bunch = datasets.load_breast_cancer()
    return _split("breast_cancer", bunch.data, bunch.target,
                  "scikit-learn load_breast_cancer (bundled)", test_size, seed)


def read_idx(path):
    """Reads one IDX file (gzipped or not) of unsigned bytes into NumPy."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        header = f.read(4)
        if len(header) != 4:
            raise ValueError(f"{path} is not an IDX file (too short)")
        zero, type_code, ndim = struct.unpack(">HBB", header)
        if zero != 0 or type_code != 0x08:
            raise ValueError(
                f"{path} is not an IDX file of unsigned bytes (header "
                f"{header.hex()})"
            )
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} holds {data.size} values, its header says {shape}"
        )
    return data.reshape(shape)


def _idx_path(folder, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {stem} or {stem}.gz in {folder}")


def load_mnist_idx(folder):
    """MNIST from the four standard IDX files in `folder`."""
    arrays = {
        key: read_idx(_idx_path(folder, stem))
        for key, stem in MNIST_FILES.items()
    }
    x_train, x_test = standardize(
        arrays["x_train"] / 255.0, arrays["x_test"] / 255.0
    )
    return Dataset(
        "mnist", x_train, arrays["y_train"].astype("int32"), x_test,
        arrays["y_test"].astype("int32"), 10, f"MNIST IDX files in {folder}",
    )


def load_tfds(name, data_dir):
    """A tensorflow-datasets set already prepared under `data_dir`.

    Raises `FileNotFoundError` when it is not there: this never downloads.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise FileNotFoundError(
            f"tensorflow-datasets is not installed ({error})"
        ) from error
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tensorflow-datasets {name!r} is not prepared under {data_dir}"
        )
    keys = builder.info.supervised_keys or ("image", "label")
    splits = tfds.as_numpy(
        builder.as_dataset(split=["train", "test"], batch_size=-1)
    )
    (x_train, y_train), (x_test, y_test) = [
        (split[keys[0]], split[keys[1]]) for split in splits
    ]
    num_classes = builder.info.features[keys[1]].num_classes
    if np.issubdtype(x_train.dtype, np.integer):
        x_train, x_test = x_train / 255.0, x_test / 255.0
    x_train, x_test = standardize(x_train, x_test)
    return Dataset(
        name, x_train, y_train.astype("int32"), x_test,
        y_test.astype("int32"), int(num_classes),
        f"tensorflow-datasets {name} in {data_dir}",
    )


BUNDLED = {"digits": load_digits, "breast_cancer": load_breast_cancer}


def load_dataset(name, data_dir=None, log=print):
    """Loads `name`; falls back to the bundled digits with one clear line.

    Bundled names load directly. ``mnist`` tries the IDX files in `data_dir`,
    then a prepared tensorflow-datasets copy there. Other names need a
    prepared tensorflow-datasets copy in `data_dir`.
    """
    if name in BUNDLED:
        return BUNDLED[name]()
    reasons = []
    if data_dir is None:
        reasons.append("no --data-dir given")
    else:
        if name == "mnist":
            try:
                return load_mnist_idx(data_dir)
            except (FileNotFoundError, ValueError) as error:
                reasons.append(str(error))
        try:
            return load_tfds(name, data_dir)
        except FileNotFoundError as error:
            reasons.append(str(error))
    log(
        f"Data set {name!r} is not available offline ({'; '.join(reasons)}): "
        "falling back to scikit-learn's bundled digits."
    )
    return load_digits()
