import os
import tempfile
import types
import unittest

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from kreg.walkthrough.__main__ import DEFAULT_EXPERIMENTS  # noqa: E402
from kreg.walkthrough.__main__ import NoRetracingWarning  # noqa: E402
from kreg.walkthrough.__main__ import main  # noqa: E402
from kreg.walkthrough.__main__ import parse_args  # noqa: E402


class QuickRunTest(unittest.TestCase):
    def test_quick_run_writes_tables_and_non_empty_plots(self):
        import matplotlib.image

        with tempfile.TemporaryDirectory() as folder:
            written = main(["--quick", "--seeds", "1", "--output", folder])
            self.assertEqual([e.key for e, _ in written],
                             DEFAULT_EXPERIMENTS)
            with open(os.path.join(folder, "results.md")) as f:
                markdown = f.read()
            for experiment, plots in written:
                self.assertIn(f"## {experiment.title}", markdown)
                for arm in experiment.arms:
                    self.assertIn(f"| {arm.name} |", markdown)
                self.assertTrue(plots)
                for name in plots:
                    self.assertIn(f"]({name})", markdown)
                    image = matplotlib.image.imread(os.path.join(folder, name))
                    self.assertGreater(image.shape[0], 100)
                    self.assertGreater(image.shape[1], 100)
                    # Not a blank canvas: many distinct pixel values.
                    self.assertGreater(
                        len(np.unique(image.reshape(-1, image.shape[-1]),
                                      axis=0)), 20
                    )
            results = {e.key: e for e, _ in written}
        # Every arm ran once and produced a finite accuracy in [0, 1].
        for experiment in results.values():
            self.assertEqual(len(experiment.results), len(experiment.arms))
            for run in experiment.results:
                self.assertTrue(0.0 <= run.test_accuracy <= 1.0)
        # The vanishing-gradient arm shows it: first layer << output layer.
        norms = {r.arm: r.extras["layer_norms"]
                 for r in results["gradients"].results
                 if r.extras.get("layer_norms")}
        vanishing = norms["sigmoid, N(0, 0.01^2) init"]
        self.assertLess(vanishing[0], 1e-3 * vanishing[-1])
        lecture = norms["ReLU, 1/sqrt(n_in) init (lecture)"]
        self.assertGreater(lecture[0], 1e-2 * lecture[-1])


class AugmentationRunTest(unittest.TestCase):
    def test_quick_run_by_name_writes_every_arm_and_a_plot(self):
        self.assertNotIn("augmentation", DEFAULT_EXPERIMENTS)
        with tempfile.TemporaryDirectory() as folder:
            written = main(["--quick", "--seeds", "1", "--experiments",
                            "augmentation", "--output", folder])
            [(experiment, plots)] = written
            self.assertEqual(experiment.key, "augmentation")
            self.assertEqual(len(experiment.results), len(experiment.arms))
            self.assertGreaterEqual(len(experiment.arms), 6)
            for run in experiment.results:
                self.assertTrue(0.0 <= run.test_accuracy <= 1.0)
            self.assertTrue(plots)
            for name in plots:
                self.assertTrue(os.path.exists(os.path.join(folder, name)))


class ArgumentsTest(unittest.TestCase):
    def test_defaults_and_errors(self):
        args = parse_args([])
        self.assertEqual(args.seeds, 3)
        self.assertEqual(args.experiments, DEFAULT_EXPERIMENTS)
        self.assertNotIn("dropout_paper", DEFAULT_EXPERIMENTS)
        self.assertEqual(
            parse_args(["--experiments", "dropout_paper"]).experiments,
            ["dropout_paper"])
        self.assertEqual(parse_args(["--quick"]).seeds, 1)
        with self.assertRaises(SystemExit):
            parse_args(["--experiments", "nope"])
        with self.assertRaises(SystemExit):
            parse_args(["--seeds", "0"])


class ReportTest(unittest.TestCase):
    def test_diverged_runs_print_as_diverged_and_plots_keep_them(self):
        import matplotlib.image

        from kreg.walkthrough import report
        from kreg.walkthrough.runner import Arm
        from kreg.walkthrough.runner import Experiment
        from kreg.walkthrough.runner import RunResult

        def run(arm, seed, loss):
            return RunResult(
                arm=arm, seed=seed, test_loss=loss, test_accuracy=0.1,
                test_ece=loss if not np.isfinite(loss) else 0.05, epochs=2,
                seconds=1.0, curves={"train_loss": [1.0, loss],
                                     "test_loss": [2.0, loss],
                                     "test_accuracy": [0.1, 0.1]})

        arms = [Arm("fine", None), Arm("blows up", None)]
        experiment = Experiment("toy", "Toy", "?", None, arms, epochs=2)
        experiment.results = [run("fine", 0, 0.5), run("fine", 1, 0.7),
                              run("blows up", 0, float("nan")),
                              run("blows up", 1, 0.9)]
        lines = report.table_lines(experiment)
        self.assertIn("| 0.6000 ± 0.1000 |", lines[2])
        self.assertIn("diverged in 1 of 2 runs", lines[3])
        self.assertNotIn("nan", " ".join(lines))
        with tempfile.TemporaryDirectory() as folder:
            name = report.plot_curves(experiment, folder)
            image = matplotlib.image.imread(os.path.join(folder, name))
        self.assertGreater(image.shape[0], 100)

    def test_a_new_run_gets_its_own_folder(self):
        first = parse_args([]).output
        self.assertTrue(first.startswith(os.path.join(
            "walkthrough_output", "run-")))
        self.assertEqual(parse_args(["--output", "x"]).output, "x")


class LabelsExperimentTest(unittest.TestCase):
    """The "too little labelled data" experiment on a tiny budget."""

    def setUp(self):
        from kreg.walkthrough import data
        from kreg.walkthrough import experiments

        self.experiment = experiments.labels(
            data.load_digits(), quick=True, epochs=2, source_epochs=1,
            pretrain_epochs=1)

    def test_target_task_arms_and_head_only_base(self):
        from kreg.walkthrough import data
        from kreg.walkthrough import experiments

        # Building the arms trains nothing.
        experiment = experiments.labels(data.load_digits())
        self.assertEqual(experiment.dataset.num_classes, 5)
        self.assertEqual(len(experiment.arms), 12)
        self.assertEqual(
            {(a.factors["method"], a.factors["label_fraction"])
             for a in experiment.arms},
            {(m, f) for m in ("from scratch", "transfer, head only",
                              "transfer, head then unfreeze (FineTuning)",
                              "unsupervised pretraining (pretrain_layerwise)"
                              ", then supervised")
             for f in (0.01, 0.05, 0.2)})
        # The tiny budget's (1 source epoch) head-only arm at 1 %.
        head_only = next(a for a in self.experiment.arms
                         if a.factors["method"] == "transfer, head only")
        subset = head_only.train_data(0, self.experiment.dataset)
        self.assertEqual(len(subset.x_train), 5)  # one image per class
        model = head_only.build(0, subset)
        self.assertFalse(model.get_layer("base").trainable)
        self.assertEqual(len(model.trainable_weights), 2)  # the head
        self.assertEqual(model.output_shape, (None, 5))

    def test_too_few_classes_is_not_applicable(self):
        from kreg.walkthrough import data
        from kreg.walkthrough import experiments

        with self.assertRaisesRegex(experiments.NotApplicable,
                                    "breast_cancer has 2"):
            experiments.labels(data.load_breast_cancer(), quick=True)

    def test_quick_run_writes_rows_and_plot(self):
        import matplotlib.image

        from kreg.walkthrough import experiments
        from kreg.walkthrough import report
        from kreg.walkthrough.runner import run_experiment

        experiment = run_experiment(self.experiment, [0])
        experiment.notes += experiments.label_fraction_notes(experiment)
        lines = report.table_lines(experiment)
        # --quick: 4 methods x 2 label fractions (1 and 20 %).
        self.assertEqual(len(lines), 2 + 8)
        for arm, line in zip(experiment.arms, lines[2:]):
            self.assertTrue(line.startswith(f"| {arm.name} |"))
        self.assertEqual(len(experiment.notes), 2)
        for run in experiment.results:
            self.assertEqual(run.epochs, 2)
            self.assertTrue(0.0 <= run.test_accuracy <= 1.0)
        with tempfile.TemporaryDirectory() as folder:
            name = report.plot_label_fractions(experiment, folder)
            self.assertEqual(name, "labels.png")
            image = matplotlib.image.imread(os.path.join(folder, name))
        self.assertGreater(image.shape[0], 100)
        self.assertGreater(
            len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)), 20)
class DropoutPaperTest(unittest.TestCase):
    def test_quick_run_prints_errors_beside_the_paper(self):
        from kreg.walkthrough import experiments

        with tempfile.TemporaryDirectory() as folder:
            written = main(["--quick", "--seeds", "1", "--experiments",
                            "dropout_paper", "--output", folder])
            with open(os.path.join(folder, "results.md")) as f:
                markdown = f.read()
            (experiment, plots), = written
            self.assertEqual(plots, ["dropout_paper.png"])
            self.assertTrue(os.path.getsize(os.path.join(folder, plots[0])))
        self.assertEqual(len(experiment.arms), 3)
        self.assertIn("| test error (%) | published test error |", markdown)
        for arm in experiment.arms:
            self.assertIn(f"| {arm.name} |", markdown)
        self.assertIn("1.60 % (standard neural net)", markdown)
        self.assertIn("1.06 % (dropout + max-norm)", markdown)
        self.assertEqual(len(experiment.notes), 3)
        for run in experiment.results:
            self.assertEqual(run.epochs, experiment.epochs)
            self.assertEqual(len(run.curves["cpu_seconds"]), run.epochs)
            self.assertGreater(run.cpu_seconds, 0.0)
            self.assertTrue(0.0 <= run.test_accuracy <= 1.0)
        # The recipe's layers: dropout 0.2 / 0.5 and max-norm kernels.
        model = experiment.arms[1].build(0, experiment.dataset)
        import kreg
        rates = [layer.rate for layer in model.layers
                 if isinstance(layer, kreg.layers.Dropout)]
        self.assertEqual(rates, [0.2, 0.5, 0.5])
        import keras
        for layer in model.layers:
            if isinstance(layer, keras.layers.Dense):
                self.assertIsInstance(layer.kernel_constraint,
                                      keras.constraints.MaxNorm)
        self.assertEqual(experiments.PAPER_MNIST_ERRORS[
            "dropout NN (ReLU)"], 1.25)

    def test_unit_range_bounds_the_inputs(self):
        from kreg.walkthrough import experiments
        from kreg.walkthrough.data import Dataset

        x_train = np.array([[0.0, 5.0, 1.0], [2.0, 5.0, 3.0]], "float32")
        x_test = np.array([[4.0, 5.0, 2.0], [-1.0, 7.0, 1.0]], "float32")
        data = experiments._unit_range(Dataset(
            "toy", x_train, np.array([0, 1]), x_test, np.array([0, 1]), 2,
            "toy"))
        np.testing.assert_allclose(data.x_train,
                                   [[0, 0, 0], [1, 0, 1]])
        np.testing.assert_allclose(data.x_test,
                                   [[1, 0, 0.5], [0, 1, 0]])


def test_the_retracing_warning_is_dropped_and_others_pass():
    import logging

    def record(message):
        return logging.LogRecord("tensorflow", logging.WARNING, __file__, 1,
                                 message, None, None)

    keep = NoRetracingWarning().filter
    assert not keep(record(
        "5 out of the last 5 calls to <function f> triggered tf.function "
        "retracing. Tracing is expensive ..."))
    assert keep(record("Gradients do not exist for variables ['kernel']"))


def write_idx(path, array):
    """Writes `array` (unsigned bytes) as an IDX file."""
    import struct

    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


class TransferMnistTest(unittest.TestCase):
    """transfer_mnist on a tiny stand-in for MNIST (random strokes in
    IDX files), through the command line."""

    def test_quick_run_writes_two_experiments_with_rows_and_plots(self):
        from kreg.walkthrough import experiments

        rng = np.random.RandomState(0)
        with tempfile.TemporaryDirectory() as folder:
            for stem, count in (("train", 100), ("t10k", 50)):
                images = rng.randint(0, 256, (count, 28, 28))
                images *= rng.rand(count, 28, 28) < 0.2
                write_idx(os.path.join(folder, f"{stem}-images-idx3-ubyte"),
                          images)
                write_idx(os.path.join(folder, f"{stem}-labels-idx1-ubyte"),
                          np.arange(count) % 10)
            written = main(["--quick", "--seeds", "1", "--dataset", "mnist",
                            "--data-dir", folder, "--experiments",
                            "transfer_mnist", "--output", folder])
            with open(os.path.join(folder, "results.md")) as f:
                markdown = f.read()
            for experiment, plots in written:
                self.assertEqual(plots, [f"{experiment.key}.png"])
                self.assertTrue(os.path.getsize(os.path.join(folder,
                                                             plots[0])))
        self.assertEqual([e.key for e, _ in written],
                         ["transfer_mnist_digits", "transfer_mnist_cnn"])
        digits, cnn = (e for e, _ in written)
        self.assertEqual(digits.dataset.x_train.shape, (1257, 64))
        self.assertEqual(cnn.dataset.x_train.shape[1:], (28, 28, 1))
        self.assertEqual(cnn.dataset.num_classes, 5)
        for experiment in (digits, cnn):
            self.assertEqual(len(experiment.arms), 4)  # --quick: 20 %
            for arm in experiment.arms:
                self.assertIn(f"| {arm.name} |", markdown)
            for run in experiment.results:
                self.assertEqual(run.epochs, experiment.epochs)
                self.assertTrue(0.0 <= run.test_accuracy <= 1.0)
            # The source network and the pretraining: once per seed.
            self.assertEqual(
                {k: len(v) for k, v in experiment.shared_seconds.items()},
                {"source network": 1, "pretraining": 1})
            self.assertEqual(len(experiment.notes), 1 + 2)
        # The head-only arm: the CNN's trained base frozen, a new head.
        head_only = next(a for a in cnn.arms
                         if a.factors["method"] == "transfer, head only")
        model = head_only.build(0, head_only.train_data(0, cnn.dataset))
        self.assertFalse(model.get_layer("base").trainable)
        self.assertEqual(len(model.trainable_weights), 2)
        self.assertEqual(model.output_shape, (None, 5))
        self.assertNotIn("transfer_mnist", DEFAULT_EXPERIMENTS)
        with self.assertRaisesRegex(experiments.NotApplicable,
                                    "needs MNIST"):
            from kreg.walkthrough import data
            experiments.transfer_mnist(data.load_digits())

    def test_mnist_8x8_draws_the_ink_box_like_the_digits(self):
        from kreg.walkthrough import experiments

        # A bar 20 rows tall and 5 columns wide: the box is widened to a
        # 20 x 20 square, so the bar fills every row and the middle 2
        # columns of the 8 x 8 image.
        image = np.zeros((28, 28), "float32")
        image[4:24, 10:15] = 1.0
        small = experiments.mnist_8x8(image.reshape(1, 784)).reshape(8, 8)
        expected = np.zeros((8, 8))
        expected[:, 3:5] = 1.0
        np.testing.assert_allclose(small, expected)
        self.assertEqual(
            experiments.mnist_8x8(np.zeros((1, 784))).tolist(), [[0.0] * 64])


class PlottedSeriesTest(unittest.TestCase):
    """The learning-curve lines end at the table's scores, and an arm with
    its own `predict` (MC dropout) is drawn with it."""

    def test_every_line_ends_at_the_tables_values(self):
        from kreg.walkthrough import report
        from kreg.walkthrough.runner import Arm
        from kreg.walkthrough.runner import Experiment
        from kreg.walkthrough.runner import RunResult
        from kreg.walkthrough.runner import summarize

        def run(arm, seed, loss, accuracy, curve_loss, curve_accuracy,
                phase=()):
            # The final scores differ from the last epoch's (MC passes,
            # EMA or restored weights after the last epoch).
            return RunResult(
                arm=arm, seed=seed, test_loss=loss, test_accuracy=accuracy,
                test_ece=0.0, epochs=len(curve_loss), seconds=1.0,
                curves={"train_loss": list(curve_loss),
                        "test_loss": list(curve_loss),
                        "test_accuracy": list(curve_accuracy),
                        "phase": list(phase)})

        arms = [Arm("mean of equal runs", None),
                Arm("stopped early", None),
                Arm("two phases", None)]
        experiment = Experiment("toy", "Toy", "?", None, arms, epochs=4)
        experiment.results = [
            run("mean of equal runs", 0, 0.5, 0.8, [2.0, 1.0, 0.4],
                [0.5, 0.7, 0.9]),
            run("mean of equal runs", 1, 0.7, 0.6, [2.0, 1.2, 0.3],
                [0.4, 0.6, 0.95]),
            run("stopped early", 0, 0.9, 0.7, [2.0, 1.5], [0.3, 0.5]),
            run("stopped early", 1, 0.8, 0.75, [2.0, 1.5, 1.1, 1.3],
                [0.3, 0.5, 0.6, 0.55]),
            run("two phases", 0, 0.6, 0.85, [2.0, 1.0, 1.5, 0.9],
                [0.4, 0.6, 0.5, 0.7], phase=(1, 1, 2, 2)),
            run("two phases", 1, 0.4, 0.95, [2.0, 1.1, 0.8],
                [0.4, 0.6, 0.8], phase=(1, 2, 2)),
        ]
        table = {row["arm"]: row for row in summarize(experiment)}
        for arm in arms[:2]:
            line, = report.curve_lines(experiment, arm)
            self.assertAlmostEqual(line.loss[-1],
                                   table[arm.name]["loss_mean"],
                                   msg=arm.name)
            self.assertAlmostEqual(line.accuracy[-1],
                                   table[arm.name]["accuracy_mean"],
                                   msg=arm.name)
        # One line per run and phase: each run's phase 2 (dashed) ends at
        # its own scores, whose mean is the table's.
        ends = [(line.loss[-1], line.accuracy[-1])
                for line in report.curve_lines(experiment, arms[2])
                if line.style == "--"]
        self.assertEqual(ends, [(0.6, 0.85), (0.4, 0.95)])
        self.assertAlmostEqual(np.mean(ends, axis=0)[0],
                               table["two phases"]["loss_mean"])
        self.assertAlmostEqual(np.mean(ends, axis=0)[1],
                               table["two phases"]["accuracy_mean"])
        # The points before the last are the per-epoch scores.
        line, = report.curve_lines(experiment, arms[0])
        np.testing.assert_allclose(line.loss[:2], [2.0, 1.1])
        np.testing.assert_allclose(line.epochs, [1, 2, 3])

    def test_test_curves_score_with_the_arms_predict(self):
        import keras

        from kreg.walkthrough.runner import Arm
        from kreg.walkthrough.runner import cross_entropy_and_accuracy
        from kreg.walkthrough.runner import run_arm

        rng = np.random.RandomState(0)
        data = types.SimpleNamespace(
            x_train=rng.normal(size=(16, 3)).astype("float32"),
            y_train=rng.randint(0, 2, 16),
            x_test=rng.normal(size=(8, 3)).astype("float32"),
            y_test=rng.randint(0, 2, 8))
        # An arm's own predict (as MC dropout's): here logits that do not
        # depend on the model at all, so the curves must be its scores.
        logits = rng.normal(size=(8, 2))
        calls = []

        def predict(model, x):
            calls.append(len(x))
            return logits

        def build(seed, dataset):
            return keras.Sequential([keras.Input((3,)),
                                     keras.layers.Dense(2)])

        result = run_arm(Arm("own predict", build, predict=predict), data,
                         seed=0, epochs=2, batch_size=8)
        loss, accuracy = cross_entropy_and_accuracy(logits, data.y_test)
        self.assertEqual(calls, [8, 8, 8])  # two epochs, then the table
        np.testing.assert_allclose(result.curves["test_loss"], [loss] * 2)
        np.testing.assert_allclose(result.curves["test_accuracy"],
                                   [accuracy] * 2)
        self.assertAlmostEqual(result.test_loss, loss)
