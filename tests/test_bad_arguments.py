"""Every public kreg constructor and function against bad arguments.

A table of rows, one per call: the public name, the arguments that replace
valid ones, the exception expected (``None``: the value is valid and must be
accepted) and the substrings its message must hold (by default
``"<argument>=<repr(value)>"``, which names both the argument and the bad
value). Wrong types raise `TypeError`, wrong values `ValueError`, both before
any training. Constructors and argument checks only, but for the accepted
rows of the functions that do work (`mc_predict`, `pretrain_layerwise`: one
epoch on 4 samples).

``python tests/test_bad_arguments.py`` prints the sweep's outcome table
(clear error / unclear message / accepted silently / valid value refused).
"""

import dataclasses
import inspect
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kreg  # noqa: E402

INF = float("inf")
NAN = float("nan")
# The public subpackages; a new one must be added here (and get rows).
PUBLIC_MODULES = ("callbacks", "diagnostics", "initializers", "layers",
                  "losses", "metrics", "models", "optimizers", "regularizers")
# Public names that users receive, not call: no arguments to sweep.
RESULT_TYPES = {"diagnostics.Problem", "diagnostics.Report"}


class Fresh:
    """An argument value built anew for every call (a model, a layer)."""

    def __init__(self, factory, label):
        self.factory = factory
        self.label = label

    def __repr__(self):
        return self.label


def _resolve(arguments):
    return {k: v.factory() if isinstance(v, Fresh) else v
            for k, v in arguments.items()}


def x_data(n=4):
    return np.random.RandomState(0).normal(size=(n, 3)).astype("float32")


def dense_model(name="net"):
    return keras.Sequential([keras.Input((3,)),
                             keras.layers.Dense(4, name="hidden"),
                             keras.layers.Dense(2, name="head")], name=name)


def mc_model():
    return keras.Sequential([keras.Input((3,)),
                             kreg.layers.Dropout(0.5, mc=True),
                             keras.layers.Dense(2)])


DENSE = Fresh(dense_model, "<dense model>")
MC = Fresh(mc_model, "<mc model>")
LAYER = Fresh(lambda: keras.layers.Dense(2), "<Dense layer>")
SGD = Fresh(lambda: keras.optimizers.SGD(0.1), "<SGD>")
X = x_data()
Y = np.zeros(4, "int32")


def call(function, **valid):
    """`function` called with the `valid` arguments, some replaced."""

    def run(**arguments):
        return function(**_resolve({**valid, **arguments}))

    return run


# Public name -> the call with valid arguments (each row replaces some).
CALLS = {
    "layers.BatchNormalization": call(kreg.layers.BatchNormalization),
    "layers.Dropout": call(kreg.layers.Dropout, rate=0.5),
    "layers.GaussianNoise": call(kreg.layers.GaussianNoise, stddev=0.1),
    "layers.WeightNoise": call(kreg.layers.WeightNoise, layer=LAYER,
                               stddev=0.1),
    "layers.mc_predict": call(kreg.layers.mc_predict, model=MC, x=X,
                              num_samples=2),
    "layers.mc_sampling": call(kreg.layers.mc_sampling, model=MC),
    "regularizers.L1": call(kreg.regularizers.L1),
    "regularizers.L1L2": call(kreg.regularizers.L1L2),
    "regularizers.L2": call(kreg.regularizers.L2),
    "regularizers.ParameterSharing": call(
        kreg.regularizers.ParameterSharing, strength=0.1,
        reference=np.zeros((3, 4), "float32")),
    "regularizers.apply_weight_decay": call(
        kreg.regularizers.apply_weight_decay, model=DENSE, regularizer=0.1),
    "regularizers.anchor_weights": call(
        kreg.regularizers.anchor_weights, model=DENSE, strength=0.1),
    "regularizers.tie_weights": call(kreg.regularizers.tie_weights,
                                     model_a=DENSE, model_b=DENSE,
                                     strength=0.1),
    "losses.LabelSmoothingCrossentropy": call(
        kreg.losses.LabelSmoothingCrossentropy),
    "losses.label_smoothing_crossentropy": call(
        kreg.losses.label_smoothing_crossentropy, y_true=np.array([0, 2]),
        y_pred=np.full((2, 3), 1 / 3, "float32")),
    "losses.smooth_labels": call(kreg.losses.smooth_labels,
                                 y=np.eye(3, dtype="float32"), epsilon=0.1),
    "optimizers.AveragingOptimizer": call(kreg.optimizers.AveragingOptimizer,
                                          optimizer=SGD),
    "optimizers.ClippedOptimizer": call(kreg.optimizers.ClippedOptimizer,
                                        optimizer=SGD),
    "optimizers.FineTuningOptimizer": call(
        kreg.optimizers.FineTuningOptimizer, optimizer=SGD),
    "callbacks.EMA": call(kreg.callbacks.EMA),
    "callbacks.FineTuning": call(kreg.callbacks.FineTuning, base="base"),
    "callbacks.BackupAndRestore": call(kreg.callbacks.BackupAndRestore,
                                       backup_dir="backup"),
    "callbacks.EarlyStopping": call(kreg.callbacks.EarlyStopping),
    "callbacks.GradientMonitor": call(kreg.callbacks.GradientMonitor),
    "callbacks.ModelCheckpoint": call(kreg.callbacks.ModelCheckpoint,
                                      filepath="model.keras"),
    "callbacks.RetrainOnFullData": call(kreg.callbacks.RetrainOnFullData,
                                        x=X, y=Y),
    "metrics.BrierScore": call(kreg.metrics.BrierScore),
    "metrics.ExpectedCalibrationError": call(
        kreg.metrics.ExpectedCalibrationError),
    "models.Ensemble": call(kreg.models.Ensemble, members=dense_model,
                            num_members=2),
    "models.predict_with_uncertainty": call(
        kreg.models.predict_with_uncertainty, model=MC, x=X, num_samples=2),
    "models.pretrain_layerwise": call(kreg.models.pretrain_layerwise,
                                      model=DENSE, x=X, epochs=1,
                                      batch_size=4, verbose=0),
    "layers.ElasticDeformation": call(kreg.layers.ElasticDeformation),
    "diagnostics.diagnose": call(kreg.diagnostics.diagnose, model=DENSE,
                                 x=X),
    "initializers.lsuv": call(kreg.initializers.lsuv, model=DENSE, x=X),
}


@dataclasses.dataclass
class Row:
    name: str  # the public name, a key of CALLS
    arguments: dict  # replace the valid ones
    error: type = None  # None: valid, must be accepted
    fragments: tuple = None  # in the message; None: "argument=repr(value)"

    def __post_init__(self):
        if self.fragments is None:
            self.fragments = tuple(f"{k}={v!r}"
                                   for k, v in self.arguments.items())

    @property
    def id(self):
        given = ",".join(f"{k}={_short(v)}" for k, v in self.arguments.items())
        return f"{self.name}({given})"[:120]


def _short(value):
    """A value's repr for a row id, arrays as their shape."""
    if isinstance(value, np.ndarray):
        return f"<array {value.shape}>"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_short(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) else f"[{inner}]"
    # Without memory addresses: every test process names a row alike.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def numbers(argument, *out_of_range, optional=False, infinite=()):
    """A float argument: non-finite values and `out_of_range` (ValueError),
    wrong types (TypeError); `infinite`: the infinities it accepts."""
    rows = [({argument: v}, ValueError)
            for v in (INF, -INF, NAN, *out_of_range) if v not in infinite]
    rows += [({argument: v}, None) for v in infinite]
    rows += [({argument: v}, TypeError)
             for v in ("a", True) + (() if optional else (None,))]
    return rows


def integers(argument, low, optional=False):
    """An integer argument >= `low`: NumPy integers accepted, bools and
    floats refused."""
    return [
        ({argument: low - 1}, ValueError),
        ({argument: -1 if low > 0 else -2}, ValueError),
        ({argument: 2.5}, TypeError),
        ({argument: float(low + 1)}, TypeError),
        ({argument: INF}, TypeError),
        ({argument: "a"}, TypeError),
        ({argument: True}, TypeError),
        ({argument: np.int64(low + 1)}, None),
        ({argument: np.int32(low + 2)}, None),
    ] + ([] if optional else [({argument: None}, TypeError)])


def bools(argument):
    return [({argument: v}, TypeError) for v in ("yes", 1, None)] + [
        ({argument: np.bool_(True)}, None)]


def choices(argument, optional=False):
    rows = [({argument: "bogus"}, ValueError), ({argument: 3}, ValueError)]
    return rows + ([] if optional else [({argument: None}, ValueError)])


def paths(argument):
    return [({argument: 5}, TypeError), ({argument: ["a"]}, TypeError)]


def seeds(argument="seed"):
    return [({argument: -1}, ValueError), ({argument: 2.5}, TypeError),
            ({argument: "a"}, TypeError), ({argument: True}, TypeError),
            ({argument: np.int64(3)}, None)]


def getters(argument):
    """An argument resolved by Keras's `*.get` (initializers...)."""
    return [({argument: "bogus"}, ValueError), ({argument: 5}, ValueError)]


def rows_of(name, *groups):
    return [Row(name, arguments, error)
            for group in groups for arguments, error in group]


def _pattern_rows():
    name = "regularizers.apply_weight_decay"
    return [
        Row(name, {"include": "typo*"}, ValueError, ("include", "'typo*'")),
        Row(name, {"include": "Dense"}, ValueError,
            ("include", "'Dense'", "keras.layers.Dense")),
        Row(name, {"include": ["head", "typo"]}, ValueError,
            ("include", "'typo'")),
        Row(name, {"exclude": "typo*"}, ValueError, ("exclude", "'typo*'")),
        Row(name, {"include": keras.layers.Conv2D}, ValueError,
            ("include", "Conv2D")),
        Row(name, {"include": "head"}, None),
        Row(name, {"include": keras.layers.Dense, "exclude": "he*"}, None),
        Row(name, {"model": "m"}, TypeError),
        Row(name, {"model": Fresh(lambda: keras.Sequential(
            [keras.layers.Dense(2)]), "<unbuilt>")}, ValueError,
            ("model", "built")),
        Row(name, {"regularizer": "l2"}, TypeError),
        Row(name, {"regularizer": None}, TypeError),
        Row(name, {"regularizer": kreg.regularizers.L1(0.1)}, None),
    ] + rows_of(name, numbers("regularizer", -1, optional=True),
                bools("overwrite"), [({"include": 3}, TypeError),
                                     ({"exclude": [None]}, TypeError)])


def _label_rows():
    name = "losses.smooth_labels"
    loss = "losses.label_smoothing_crossentropy"
    probabilities = np.full((3, 3), 1 / 3, "float32")
    rows = [
        Row(name, {"y": np.array([0, 1, 4])}, ValueError,
            ("num_classes",)),
        Row(name, {"y": np.array([0, 1, 4]), "num_classes": 3}, ValueError,
            ("y", "4", "[0, 3)")),
        Row(name, {"y": [0, -1], "num_classes": 3}, ValueError,
            ("y", "-1", "[0, 3)")),
        Row(name, {"y": np.array([0, 2]), "num_classes": np.int64(3)}, None),
        Row(name, {"y": np.eye(3, dtype="int32")}, None),
        Row(name, {"y": np.ones((3, 1), "float32")}, ValueError, ("y",)),
        Row(loss, {"y_true": np.array([0, 3, 1]), "y_pred": probabilities},
            ValueError, ("y_true", "3", "[0, 3)")),
        Row(loss, {"y_true": np.array([[-1], [0], [1]]),
                   "y_pred": probabilities},
            ValueError, ("y_true", "-1", "[0, 3)")),
        Row(loss, {"y_pred": np.ones((2, 1), "float32")}, ValueError,
            ("y_pred",)),
    ]
    return rows + rows_of(
        name, numbers("epsilon", -0.1, 1.5),
        integers("num_classes", 2, optional=True),
    ) + rows_of(loss, numbers("epsilon", -0.1, 1.5), bools("from_logits"))


def _retrain_rows():
    name = "callbacks.RetrainOnFullData"
    stop = keras.callbacks.History()
    return [
        Row(name, {"callbacks": "abc"}, TypeError, ("callbacks=",)),
        Row(name, {"callbacks": [None]}, TypeError, ("callbacks", "None")),
        Row(name, {"callbacks": 5}, TypeError, ("callbacks=5",)),
        Row(name, {"callbacks": [stop, "x"]}, TypeError,
            ("callbacks", "'x'")),
        Row(name, {"callbacks": (stop,)}, None),
        Row(name, {"validation_data": "v", "algorithm": "continue"},
            TypeError, ("validation_data='v'",)),
        Row(name, {"validation_data": "v"}, TypeError,
            ("validation_data='v'",)),
        Row(name, {"validation_data": (X,), "algorithm": "continue"},
            ValueError, ("validation_data",)),
        Row(name, {"validation_data": (X, Y), "algorithm": "continue"}, None),
        Row(name, {"algorithm": "continue"}, ValueError,
            ("validation_data=None",)),
        Row(name, {"x": None}, ValueError, ("x=None",)),
        Row(name, {"x": "abc"}, TypeError, ("x='abc'",)),
        Row(name, {"x": iter([X])}, TypeError, ("x",)),
        Row(name, {"y": "abc"}, TypeError, ("y='abc'",)),
        Row(name, {"y": None}, ValueError, ("y=None",)),
        Row(name, {"y": np.zeros(3)}, ValueError, ("y", "3", "4")),
        Row(name, {"sample_weight": "w"}, TypeError, ("sample_weight='w'",)),
        Row(name, {"sample_weight": np.ones(5)}, ValueError,
            ("sample_weight", "5", "4")),
        Row(name, {"class_weight": "w"}, TypeError, ("class_weight='w'",)),
        Row(name, {"class_weight": {0: "a"}}, TypeError, ("class_weight",)),
        Row(name, {"class_weight": {0: 1.0, 1: np.float32(2)}}, None),
        Row(name, {"batch_size": np.int64(32), "max_epochs": np.int64(3)},
            None),
    ] + rows_of(name, choices("algorithm"), choices("length"),
                integers("batch_size", 1, optional=True),
                integers("max_epochs", 1),
                integers("steps_per_epoch", 1, optional=True),
                paths("backup_dir"), paths("resume_from"), bools("shuffle"))


def _gradient_monitor_rows():
    name = "callbacks.GradientMonitor"
    return [
        Row(name, {"vanishing_threshold": 1.0, "exploding_threshold": 0.5},
            ValueError, ("vanishing_threshold=1.0",)),
        Row(name, {"frequency": np.int64(5)}, None),
    ] + rows_of(name, integers("frequency", 1),
                numbers("vanishing_threshold", -1),
                numbers("exploding_threshold", 0, -1, infinite=(INF,)),
                bools("warn"))


def _mc_rows(name):
    rows = [
        Row(name, {"model": "m"}, TypeError),
        Row(name, {"x": None}, TypeError, ("x=None",)),
        Row(name, {"x": "abc"}, TypeError, ("x='abc'",)),
        Row(name, {"model": DENSE}, ValueError, ("Dropout",)),
        Row(name, {"batch_size": np.int64(2), "num_samples": np.int64(2)},
            None),
    ]
    return rows + rows_of(name, integers("num_samples", 2),
                          [r for r in integers("batch_size", 1, True)
                           if r[1] is not None])


ROWS = (
    rows_of("layers.BatchNormalization", numbers("momentum", -0.1, 1.5),
            numbers("epsilon", 0, -1e-3),
            [({"axis": "a"}, TypeError), ({"axis": 1.5}, TypeError),
             ({"axis": True}, TypeError), ({"axis": []}, TypeError),
             ({"axis": np.int64(-1)}, None)],
            bools("center"), bools("scale"), bools("synchronized"),
            getters("beta_initializer"), getters("gamma_initializer"),
            getters("moving_mean_initializer"),
            getters("moving_variance_initializer"),
            getters("beta_regularizer"), getters("gamma_regularizer"),
            getters("beta_constraint"), getters("gamma_constraint"))
    + rows_of("layers.Dropout", numbers("rate", -0.1, 1.0, 1.5),
              [({"noise_shape": "a"}, TypeError),
               ({"noise_shape": (0, 3)}, ValueError),
               ({"noise_shape": (None, 2.5)}, TypeError),
               ({"noise_shape": (None, np.int64(3))}, None)],
              seeds(), bools("mc"))
    + rows_of("layers.GaussianNoise", numbers("stddev", -0.1), seeds())
    + rows_of("layers.WeightNoise", numbers("stddev", -0.1), seeds(),
              [({"layer": "dense"}, TypeError), ({"layer": None}, TypeError)])
    + _mc_rows("layers.mc_predict")
    + [Row("layers.mc_predict", {"x": Fresh(lambda: iter([X]), "<batches>"),
                                 "batch_size": 2}, ValueError,
           ("batch_size=2",)),
       Row("layers.mc_predict", {"x": Fresh(lambda: iter([(X, Y)]),
                                            "<batches>")}, None),
       Row("layers.mc_predict", {"x": Fresh(lambda: iter([]), "<none>")},
           ValueError, ("x=", "no batches")),
       Row("layers.mc_sampling", {"model": "m"}, TypeError),
       Row("layers.mc_sampling", {"model": DENSE}, ValueError,
           ("Dropout", "mc=True")),
       Row("layers.mc_sampling", {"model": MC}, None)]
    + rows_of("regularizers.L1", numbers("l1", -1))
    + rows_of("regularizers.L2", numbers("l2", -1))
    + rows_of("regularizers.L1L2", numbers("l1", -1), numbers("l2", -1))
    + rows_of("regularizers.ParameterSharing", numbers("strength", -1),
              [({"reference": "a"}, TypeError),
               ({"reference": None}, TypeError)])
    + [Row("regularizers.ParameterSharing",
           {"reference": np.array([1.0, NAN])}, ValueError,
           ("reference", "non-finite"))]
    + _pattern_rows()
    + rows_of("regularizers.anchor_weights", numbers("strength", -1),
              bools("overwrite"), [({"model": "m"}, TypeError),
                                   ({"include": 3}, TypeError),
                                   ({"exclude": [None]}, TypeError),
                                   ({"include": "typo*"}, ValueError)])
    + rows_of("regularizers.tie_weights", numbers("strength", -1),
              bools("kernels_only"))
    + [Row("regularizers.tie_weights", {"model_a": "m"}, TypeError),
       Row("regularizers.tie_weights", {"model_b": Fresh(
           lambda: keras.Sequential([keras.Input((3,)),
                                     keras.layers.Dense(4)]), "<small>")},
           ValueError, ("model_b",))]
    + rows_of("losses.LabelSmoothingCrossentropy",
              numbers("epsilon", -0.1, 1.5), bools("from_logits"),
              [({"dtype": "bogus"}, ValueError)])
    # Keras's Loss checks `reduction` (its message: reduction=bogus).
    + [Row("losses.LabelSmoothingCrossentropy", {"reduction": "bogus"},
           ValueError, ("`reduction`", "bogus"))]
    + _label_rows()
    + rows_of("optimizers.AveragingOptimizer",
              [({"optimizer": 5}, TypeError),
               ({"optimizer": None}, TypeError),
               ({"optimizer": "adam"}, None)])  # keras.optimizers.get
    + rows_of("optimizers.ClippedOptimizer",
              numbers("clipvalue", 0, -1, optional=True),
              numbers("clipnorm", 0, -1, optional=True),
              numbers("global_clipnorm", 0, -1, optional=True),
              numbers("agc_factor", 0, -1, optional=True),
              numbers("agc_epsilon", 0, -1),
              choices("on_non_finite"),
              [({"optimizer": 5}, TypeError),
               ({"optimizer": None}, TypeError),
               ({"optimizer": "adam", "clipnorm": np.int64(1)}, None)])
    + [Row("optimizers.ClippedOptimizer", {"learning_rate": 0.1},
           ValueError, ("learning_rate",)),
       Row("optimizers.ClippedOptimizer",
           {"optimizer": Fresh(lambda: keras.optimizers.Adam(clipnorm=1.0),
                               "<Adam(clipnorm=1)>"), "clipnorm": 1.0},
           ValueError, ("`optimizer.clipnorm`", "clipnorm=1.0")),
       Row("optimizers.ClippedOptimizer",
           {"optimizer": Fresh(lambda: keras.optimizers.Adam(clipnorm=1.0),
                               "<Adam(clipnorm=1)>")}, None)]
    + rows_of("optimizers.FineTuningOptimizer",
              numbers("base_learning_rate_factor", 0, -1),
              [({"optimizer": 5}, TypeError),
               ({"optimizer": None}, TypeError),
               ({"optimizer": "adam"}, None),
               ({"base_indices": "0"}, TypeError),
               ({"base_indices": [-1]}, TypeError),
               ({"base_indices": [0.5]}, TypeError),
               ({"base_indices": [np.int64(0)]}, None)])
    + [Row("optimizers.FineTuningOptimizer",
           {"optimizer": Fresh(lambda: kreg.optimizers.ClippedOptimizer(
               "sgd", clipnorm=1.0), "<ClippedOptimizer>")},
           ValueError, ("`optimizer`", "plain"))]
    + rows_of("callbacks.FineTuning",
              integers("freeze_epochs", 0), integers("unfreeze_steps", 1),
              integers("epochs_per_step", 1),
              numbers("base_learning_rate_factor", 0, -1),
              bools("freeze_batch_normalization"),
              [({"base": 5}, TypeError), ({"base": None}, TypeError),
               ({"base": Fresh(lambda: keras.layers.Dense(2),
                               "<Dense>")}, None)])
    + rows_of("callbacks.EMA", numbers("decay", -0.1, 1.0),
              numbers("warmup_power", 0, -1), bools("warmup"),
              bools("validate_with_averaged"), bools("keep_averaged"),
              bools("average_non_trainable"), paths("backup_dir"),
              paths("resume_from"))
    + rows_of("callbacks.BackupAndRestore",
              [({"save_freq": 0}, ValueError), ({"save_freq": -1}, ValueError),
               ({"save_freq": "bogus"}, ValueError),
               ({"save_freq": 2.5}, TypeError),
               ({"save_freq": np.int64(2)}, None)],
              [({"backup_dir": None}, ValueError),
               ({"backup_dir": 5}, TypeError)],
              bools("double_checkpoint"), bools("delete_checkpoint"))
    + rows_of("callbacks.EarlyStopping", numbers("min_delta"),
              numbers("baseline", optional=True),
              integers("patience", 0), integers("verbose", 0),
              integers("start_from_epoch", 0), choices("mode"),
              bools("restore_best_weights"), paths("backup_dir"),
              paths("resume_from"),
              [({"monitor": ""}, TypeError), ({"monitor": 5}, TypeError)])
    + _gradient_monitor_rows()
    + rows_of("callbacks.ModelCheckpoint",
              [({"filepath": 5}, TypeError), ({"filepath": None}, TypeError),
               ({"save_freq": 0}, ValueError), ({"save_freq": -1}, ValueError),
               ({"save_freq": np.int64(2)}, None),
               ({"monitor": 5}, TypeError),
               ({"initial_value_threshold": "a"}, TypeError),
               ({"initial_value_threshold": NAN}, ValueError)],
              choices("mode"), integers("verbose", 0),
              bools("save_best_only"),
              [({"save_weights_only": v}, TypeError)
               for v in ("yes", 1, None)],
              [({"filepath": "model.weights.h5",
                 "save_weights_only": np.True_}, None)])
    + _retrain_rows()
    + rows_of("metrics.BrierScore", bools("from_logits"),
              [({"dtype": "bogus"}, ValueError)])
    + rows_of("metrics.ExpectedCalibrationError", integers("num_bins", 1),
              bools("from_logits"), [({"dtype": "bogus"}, ValueError)])
    + rows_of("models.Ensemble", integers("num_members", 1, optional=True),
              choices("mode"), choices("combine"), seeds(),
              bools("vectorize"),
              [({"members": "m"}, TypeError), ({"members": None}, TypeError)])
    + _mc_rows("models.predict_with_uncertainty")
    + rows_of("models.predict_with_uncertainty", bools("from_logits"))
    + rows_of("models.pretrain_layerwise",
              [r for r in integers("epochs", 1) if r[1] is not None],
              [r for r in integers("batch_size", 1) if r[1] is not None],
              numbers("corruption", -0.1, 1.0), seeds(),
              [({"model": "m"}, TypeError), ({"x": None}, TypeError),
               ({"x": "abc"}, TypeError)])
    + [Row("models.pretrain_layerwise", {"layers": "typo"}, ValueError,
           ("layers", "'typo'")),
       Row("models.pretrain_layerwise",
           {"epochs": np.int64(1), "batch_size": np.int64(4)}, None)]
    + rows_of("layers.ElasticDeformation",
              [({"alpha": -1.0}, ValueError), ({"sigma": 0.0}, ValueError),
               ({"sigma": -1.0}, ValueError),
               ({"interpolation": "bogus"}, ValueError),
               ({"fill_mode": "bogus"}, ValueError)])
    + rows_of("diagnostics.diagnose", [({"model": "m"}, TypeError)])
    + [Row("diagnostics.diagnose", {"x": x_data()[:, :2]}, ValueError,
           ("`x`", "(4, 2)")),
       Row("diagnostics.diagnose", {"y": Y}, ValueError, ("`loss`",)),
       Row("initializers.lsuv", {"x": x_data()[:, :2]}, ValueError,
           ("`x`", "(4, 2)"))]
    + rows_of("initializers.lsuv",
              [({"tol": 0.0}, ValueError), ({"tol": -0.1}, ValueError),
               ({"max_iter": 0}, ValueError), ({"model": "m"}, TypeError)])
)


def outcome(row):
    """What the call does: 'clear error', 'unclear message' (an error of
    another class, or without the argument and value), 'accepted silently',
    'accepted' or 'valid value refused'; and the error, if any."""
    try:
        CALLS[row.name](**row.arguments)
    except Exception as error:  # classified below
        if row.error is None:
            return "valid value refused", error
        clear = isinstance(error, row.error) and all(
            f in str(error) for f in row.fragments)
        return ("clear error" if clear else "unclear message"), error
    return ("accepted" if row.error is None else "accepted silently"), None


def _params():
    params = []
    for row in ROWS:
        params.append(pytest.param(row, id=row.id))
    return params


@pytest.mark.parametrize("row", _params())
def test_argument(row, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # callbacks that write files write there
    got, error = outcome(row)
    expected = "accepted" if row.error is None else "clear error"
    assert got == expected, (
        f"{row.id}: {got}; expected "
        f"{row.error.__name__ if row.error else 'no error'} "
        f"with {row.fragments}; got {type(error).__name__}: {error}")


def public_names():
    return {f"{module}.{name}" for module in PUBLIC_MODULES
            for name in getattr(kreg, module).__all__} - RESULT_TYPES


def test_every_public_name_has_rows():
    # kreg.diagnose is kreg.diagnostics.diagnose.
    assert kreg.diagnose is kreg.diagnostics.diagnose
    assert set(kreg.__all__) - {"__version__", "diagnose"} == set(
        PUBLIC_MODULES)
    assert public_names() == set(CALLS)
    with_errors = {row.name for row in ROWS if row.error is not None}
    assert public_names() - with_errors == set()


# Arguments with no rows of their own, and why.
NOT_SWEPT = {
    ("losses.LabelSmoothingCrossentropy", "name"): "any name (Keras's Loss)",
    ("metrics.BrierScore", "name"): "checked by keras.metrics.Metric",
    ("metrics.ExpectedCalibrationError", "name"): "checked by Keras",
    ("optimizers.AveragingOptimizer", "name"): "checked by Keras",
    ("optimizers.ClippedOptimizer", "name"): "checked by Keras",
    ("optimizers.FineTuningOptimizer", "name"): "checked by Keras",
    ("models.pretrain_layerwise", "optimizer"): "keras.optimizers.get",
    ("models.pretrain_layerwise", "verbose"): "as fit(verbose=)",
    ("layers.ElasticDeformation", "fill_value"): "any number",
    ("layers.ElasticDeformation", "data_format"): "checked by Keras",
    ("layers.ElasticDeformation", "seed"): "tests/layers",
    ("diagnostics.diagnose", "loss"): "keras.losses.get",
    ("diagnostics.diagnose", "batch_size"): "tests/diagnostics",
    ("initializers.lsuv", "batch_size"): "tests/initializers",
    ("initializers.lsuv", "seed"): "tests/initializers",
}


def test_every_argument_has_rows():
    swept = {(row.name, k) for row in ROWS for k in row.arguments}
    missing = []
    for name in sorted(public_names()):
        module, attribute = name.split(".")
        obj = getattr(getattr(kreg, module), attribute)
        function = obj.__init__ if inspect.isclass(obj) else obj
        for parameter in inspect.signature(function).parameters.values():
            if parameter.name == "self" or parameter.kind in (
                    parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            key = (name, parameter.name)
            if key not in swept and key not in NOT_SWEPT:
                missing.append(key)
    assert missing == []


def test_row_ids_are_unique():
    ids = [row.id for row in ROWS]
    assert len(set(ids)) == len(ids), "two rows with the same id"


def sweep_table(rows=ROWS):
    """{outcome: count} and the rows that are not as expected."""
    counts, wrong = {}, []
    for row in rows:
        got, error = outcome(row)
        counts[got] = counts.get(got, 0) + 1
        if got not in ("clear error", "accepted"):
            wrong.append((row, got, error))
    return counts, wrong


if __name__ == "__main__":
    import tempfile

    os.chdir(tempfile.mkdtemp())
    counts, wrong = sweep_table()
    print(f"{len(ROWS)} cases, backend {keras.backend.backend()}\n")
    print("| outcome | cases |\n| --- | --- |")
    for key in ("clear error", "unclear message", "accepted silently",
                "accepted", "valid value refused"):
        print(f"| {key} | {counts.get(key, 0)} |")
    if "-v" in sys.argv:
        print()
        for row, got, error in wrong:
            print(f"{got:20} {row.id}\n    "
                  f"{type(error).__name__ if error else ''}: "
                  f"{str(error)[:160]}")
