"""Runs the arms of a controlled comparison over several seeds.

An arm is one way of training the same baseline network: a model builder,
an optimizer, a training loss and callbacks. Every arm of an experiment gets
the same data, seeds, epoch budget and batch size; what is measured is the
test accuracy and the test cross-entropy (always against the plain labels,
so arms that change the training loss, like label smoothing, are scored
alike), the expected calibration error, the epochs actually run, the wall
time, the process CPU time (user + system, all threads) and per-epoch
curves.
"""

import dataclasses
import time
from typing import Callable

import keras
import numpy as np


def cross_entropy_and_accuracy(logits, labels):
    """Mean sparse categorical cross-entropy and accuracy, in NumPy."""
    logits = np.asarray(logits, dtype="float64")
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    accuracy = (logits.argmax(axis=1) == labels).mean()
    return float(loss), float(accuracy)


def calibration_bins(logits, labels, num_bins=15):
    """Per confidence bin over [0, 1]: the count, the sum of confidences
    and the number of correct predictions (NumPy)."""
    logits = np.asarray(logits, dtype="float64")
    if not np.all(np.isfinite(logits)):  # a diverged run
        nan = np.full(num_bins, np.nan)
        return nan, nan, nan
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    bins = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    return (np.bincount(bins, minlength=num_bins).astype(float),
            np.bincount(bins, confidence, minlength=num_bins),
            np.bincount(bins, correct, minlength=num_bins))


def expected_calibration_error(bins):
    """ECE from `calibration_bins`: sum_b |hits_b - confidence_b| / n."""
    counts, confidences, hits = bins
    return float(np.abs(hits - confidences).sum() / max(counts.sum(), 1))


def default_optimizer():
    return keras.optimizers.Adam(1e-3)


def default_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@dataclasses.dataclass
class Arm:
    """One way of training, compared with the other arms of an experiment.

    Attributes:
        name: the row label in the results table.
        build: ``build(seed, dataset) -> keras.Model`` (uncompiled, logits).
        optimizer: zero-argument factory of a fresh optimizer.
        loss: zero-argument factory of the training loss.
        callbacks: ``callbacks(seed, dataset) -> list`` of fresh callbacks.
        fit: optional ``fit(model, dataset, epochs, batch_size, callbacks)
            -> keras.callbacks.History`` replacing the plain ``model.fit``
            on the whole training split (e.g. to hold out validation data).
        collect: optional ``collect(callbacks) -> dict`` run after training
            on the arm's callbacks; the dict is kept as the run's `extras`.
        predict: optional ``predict(model, x) -> logits`` replacing
            ``model.predict`` for the test scores (e.g. MC dropout).
        train_data: optional ``train_data(seed, dataset) -> dataset``, the
            data the run builds and trains on (e.g. a labelled subset drawn
            with the seed); its test split is the one scored.
        factors: the arm's settings in a factorial experiment (e.g.
            ``{"method": "from scratch", "label_fraction": 0.05}``), for
            plots that draw one factor against another.
    """

    name: str
    build: Callable
    optimizer: Callable = default_optimizer
    loss: Callable = default_loss
    callbacks: Callable = lambda seed, dataset: []
    fit: Callable = None
    collect: Callable = None
    predict: Callable = None
    train_data: Callable = None
    factors: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunResult:
    arm: str
    seed: int
    test_loss: float
    test_accuracy: float
    test_ece: float
    epochs: int
    seconds: float
    curves: dict  # name -> list of per-epoch values
    extras: dict = dataclasses.field(default_factory=dict)
    cpu_seconds: float = 0.0  # process CPU time (user + system) of the run


class TestCurves(keras.callbacks.Callback):
    """Records test cross-entropy and accuracy after every epoch, on the
    whole test set (the one the table scores), with the arm's own
    ``predict(model, x) -> logits`` where it has one (MC dropout), else
    with the model's deterministic output.

    For plotting only: no training decision reads these numbers.
    """

    def __init__(self, x_test, y_test, cpu_start=None, predict=None):
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.predict = predict
        self.loss, self.accuracy = [], []
        # Process CPU seconds since `cpu_start` at the end of every epoch.
        self.cpu_start = (time.process_time() if cpu_start is None
                          else cpu_start)
        self.cpu = []

    def on_epoch_end(self, epoch, logs=None):
        if self.predict is not None:
            logits = self.predict(self.model, self.x_test)
        else:
            # Direct calls: `predict` costs a data pipeline per call.
            logits = np.concatenate([
                keras.ops.convert_to_numpy(self.model(
                    self.x_test[start:start + 2048], training=False))
                for start in range(0, len(self.x_test), 2048)])
        loss, accuracy = cross_entropy_and_accuracy(logits, self.y_test)
        self.loss.append(loss)
        self.accuracy.append(accuracy)
        self.cpu.append(time.process_time() - self.cpu_start)


def plain_fit(model, dataset, epochs, batch_size, callbacks):
    return model.fit(
        dataset.x_train, dataset.y_train, epochs=epochs,
        batch_size=batch_size, callbacks=callbacks, verbose=0,
    )


def run_arm(arm, dataset, seed, epochs, batch_size):
    """Trains one arm with one seed; returns a `RunResult`."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    if arm.train_data is not None:
        dataset = arm.train_data(seed, dataset)
    cpu_start = time.process_time()
    model = arm.build(seed, dataset)
    model.compile(optimizer=arm.optimizer(), loss=arm.loss())
    curves = TestCurves(dataset.x_test, dataset.y_test, cpu_start,
                        predict=arm.predict)
    fit = arm.fit or plain_fit
    arm_callbacks = list(arm.callbacks(seed, dataset))
    history = fit(model, dataset, epochs, batch_size,
                  arm_callbacks + [curves])
    if arm.predict is not None:
        logits = arm.predict(model, dataset.x_test)
    else:
        logits = model.predict(dataset.x_test, verbose=0, batch_size=1024)
    test_loss, test_accuracy = cross_entropy_and_accuracy(
        logits, dataset.y_test
    )
    bins = calibration_bins(logits, dataset.y_test)
    train_loss = [float(v) for v in history.history.get("loss", [])]
    phases = list(history.history.get("phase", []))
    return RunResult(
        arm=arm.name, seed=seed, test_loss=test_loss,
        test_accuracy=test_accuracy,
        test_ece=expected_calibration_error(bins), epochs=len(train_loss),
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
        curves={
            "train_loss": train_loss,
            "test_loss": curves.loss,
            "test_accuracy": curves.accuracy,
            "cpu_seconds": curves.cpu,
            "phase": phases,
        },
        extras={"calibration_bins": bins,
                **(arm.collect(arm_callbacks) if arm.collect else {})},
    )


@dataclasses.dataclass
class Experiment:
    """A named, controlled comparison: arms x seeds on one data set."""

    key: str
    title: str
    question: str
    dataset: object
    arms: list
    epochs: int
    batch_size: int = 32
    results: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    # Arm name -> a published figure to print beside the arm's test error
    # (an experiment with references gets the error and CPU-time columns).
    references: dict = dataclasses.field(default_factory=dict)
    # Work done once per seed outside the arms (e.g. a source network
    # shared by several arms): name -> CPU seconds, one entry per seed.
    shared_seconds: dict = dataclasses.field(default_factory=dict)

    @property
    def runs(self):
        return len(self.arms)


def run_experiment(experiment, seeds, progress=None):
    """Runs every arm with every seed, interleaving arms within a seed."""
    for seed in seeds:
        for arm in experiment.arms:
            result = run_arm(arm, experiment.dataset, seed,
                             experiment.epochs, experiment.batch_size)
            experiment.results.append(result)
            if progress is not None:
                progress(experiment, result)
    return experiment


def summarize(experiment):
    """Per arm: mean and std of test accuracy, loss and ECE (and how many
    runs diverged), epochs, seconds."""
    rows = []
    for arm in experiment.arms:
        runs = [r for r in experiment.results if r.arm == arm.name]
        if not runs:
            continue
        accuracy = np.array([r.test_accuracy for r in runs])
        row = {"arm": arm.name, "accuracy_mean": accuracy.mean(),
               "accuracy_std": accuracy.std()}
        for key in ("loss", "ece"):
            values = np.array([getattr(r, f"test_{key}") for r in runs])
            row.update({f"{key}_mean": values.mean(),
                        f"{key}_std": values.std(),
                        f"{key}_diverged": int(np.sum(~np.isfinite(values)))})
        rows.append({
            **row,
            "epochs": np.mean([r.epochs for r in runs]),
            "seconds": np.mean([r.seconds for r in runs]),
            "cpu_seconds": np.mean([r.cpu_seconds for r in runs]),
            "seeds": len(runs),
        })
    return rows
