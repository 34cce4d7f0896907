"""The python code blocks of README.md and docs/*.md run, each in a fresh
namespace.

The snippets use names they do not define (``x``, ``y``, a pre-trained
model file): each block gets a small prelude that defines them with small
data, and long runs are shortened (``epochs=200`` becomes a few epochs) by
the substitutions listed per block. A block added without a prelude entry
fails `test_every_block_has_a_prelude`.
"""

import os
import re
import warnings

import keras
import numpy as np
import pytest

import kreg

ROOT = os.path.dirname(os.path.dirname(__file__))


def python_blocks(path):
    """The ```python blocks of a Markdown file (indented ones dedented), in
    order."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text,
                             re.M | re.S):
        indent = len(match.group(1))
        lines = [line[indent:] for line in match.group(2).splitlines()]
        blocks.append("\n".join(lines) + "\n")
    return blocks


def data(n=64, d=8, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.randint(0, classes, size=(n, 1))
    return x, y


def small_model(d=8, classes=3, activation="softmax"):
    return keras.Sequential([keras.Input((d,)),
                             keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(classes,
                                                activation=activation,
                                                name="head")])


def prelude_layers():
    return {"x_test": data(n=16, d=784)[0]}


def prelude_regularizers():
    small_model().save("pretrained.keras")
    tower_a, tower_b = small_model(), small_model()
    dense = keras.layers.Dense(4)
    dense.build((None, 3))
    w0 = keras.ops.convert_to_numpy(dense.kernel) + 1.0
    return {"tower_a": tower_a, "tower_b": tower_b, "dense": dense,
            "w0": w0}


def prelude_clipping():
    x, y = data()
    return {"x": x, "y": y, "model": small_model()}


def prelude_retrain():
    x, y = data(n=96)
    model = small_model(activation=None)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    return {"model": model, "x_all": x, "y_all": y, "x_train": x[:64],
            "y_train": y[:64], "x_val": x[64:], "y_val": y[64:]}


def prelude_checkpoint():
    x, y = data()
    model = small_model(activation=None)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    model.fit(x, y, epochs=5, verbose=0, callbacks=[
        kreg.callbacks.EMA(0.99),
        kreg.callbacks.EarlyStopping(patience=5, monitor="loss"),
        kreg.callbacks.ModelCheckpoint("ckpt/epoch{epoch:02d}.keras")])
    return {"x": x, "y": y}


def prelude_ensemble():
    x, y = data(n=64, d=64, classes=10)
    return {"x": x, "y": y, "x_test": x[:8]}


def prelude_fine_tuning():
    base = keras.Sequential([keras.Input((64,)),
                             keras.layers.Dense(16, activation="relu"),
                             keras.layers.BatchNormalization(),
                             keras.layers.Dense(16, activation="relu")])
    base.save("pretrained_base.keras")
    x, y = data(n=40, d=64, classes=5)
    return {"x_few": x, "y_few": y}


def check_fine_tuning(namespace):
    """The compiled optimizer is back after the fit; batch normalization in
    the base kept its pre-trained statistics; the L2-SP penalty is in the
    losses."""
    model = namespace["model"]
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert not hasattr(model.optimizer, "inner_optimizer")
    saved = keras.models.load_model("pretrained_base.keras").layers[1]
    trained = model.layers[0].layers[1]
    for before, after in zip(saved.weights, trained.weights):
        assert np.array_equal(keras.ops.convert_to_numpy(before),
                              keras.ops.convert_to_numpy(after))
    # The penalty of each base kernel (Keras leaves out those of frozen
    # layers): the layers are trainable again after the fit, as before it.
    training = [layer for layer in model.layers[0].layers
                if isinstance(layer, keras.layers.Dense) and layer.trainable]
    assert len(training) == 2 and len(model.losses) == len(training)


def check_regularizers(namespace):
    """The penalties the block attaches are in the losses."""
    assert len(namespace["dense"].losses) == 1
    assert len(namespace["model"].losses) == 1  # the body kernel only
    assert len(namespace["tower_a"].losses) == 4


def check_layers(namespace):
    assert float(namespace["std"].max()) > 0.0


def prelude_none():
    return {}


def check_example(namespace):
    """The example's model trained, and its file loads without
    custom_objects."""
    model = keras.models.load_model("digits.keras")
    assert isinstance(model.optimizer, kreg.optimizers.ClippedOptimizer)
    assert namespace["model"].history.history["accuracy"][-1] > 0.2


def prelude_initialization():
    x, y = data(n=128, d=20, classes=10)
    return {"x_train": 3 * x + 5, "y_train": y}


def check_initialization(namespace):
    assert namespace["report"].problems == []
    assert all(abs(std - 1) <= 0.1 for std in namespace["stds"].values())


def prelude_augmentation():
    rng = np.random.RandomState(0)
    return {"x_train": rng.rand(32, 28, 28, 1).astype("float32"),
            "y_train": rng.randint(0, 10, 32)}


# Per file, in the file's order: (prelude, {text: replacement} shortening
# the run[, a check of the namespace after the block]).
PRELUDES = {
    "README.md": [
        (prelude_none, {"epochs=100": "epochs=2"}, check_example),
    ],
    "docs/layers.md": [(prelude_layers, {}, check_layers)],
    "docs/regularizers.md": [
        (prelude_regularizers, {}, check_regularizers)],
    "docs/clipping.md": [(prelude_clipping, {})],
    "docs/callbacks.md": [
        (prelude_retrain, {"epochs=200": "epochs=6"}),
        (prelude_checkpoint, {}),
    ],
    # Two processes: tests/callbacks/test_multi_worker_processes.py runs it.
    "docs/multi_worker.md": [(None, {})],
    "docs/ensembles.md": [(prelude_ensemble, {"epochs=40": "epochs=2"})],
    "docs/initialization.md": [
        (prelude_initialization, {}, check_initialization)],
    "docs/transfer.md": [
        (prelude_fine_tuning, {"epochs=20": "epochs=8"}, check_fine_tuning)],
    "docs/augmentation.md": [
        (prelude_augmentation, {"epochs=20": "epochs=1"})],
}
BLOCKS = [(path, index) for path, preludes in PRELUDES.items()
          for index in range(len(preludes))]


def test_every_block_has_a_prelude():
    documents = ["README.md"] + sorted(
        os.path.join("docs", name)
        for name in os.listdir(os.path.join(ROOT, "docs"))
        if name.endswith(".md"))
    for path in documents:
        assert len(python_blocks(path)) == len(PRELUDES.get(path, [])), path


@pytest.mark.parametrize("path,index", BLOCKS)
def test_block_runs(path, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    block = python_blocks(path)[index]
    prelude, replacements, *check = PRELUDES[path][index]
    if prelude is None:
        pytest.skip("a multi-process snippet, run by the slow tests")
    for old, new in replacements.items():
        assert old in block, f"{path} block {index}: {old!r} is gone"
        block = block.replace(old, new)
    namespace = {"keras": keras, "kreg": kreg, "np": np,
                 "__name__": "readme"}
    namespace.update(prelude())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, f"{path} block {index}", "exec"), namespace)
    for function in check:
        function(namespace)
