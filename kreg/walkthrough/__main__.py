"""python -m kreg.walkthrough: what every lecture technique buys, measured.

Runs controlled experiments (same network, data, seeds and budget per arm)
on real data that ships offline, prints a results table per experiment and
writes ``results.md`` and learning-curve PNGs to ``--output``.
"""

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import kreg  # noqa: E402
from kreg.walkthrough import data as data_module  # noqa: E402
from kreg.walkthrough import experiments as catalog  # noqa: E402
from kreg.walkthrough import report  # noqa: E402
from kreg.walkthrough.runner import run_experiment  # noqa: E402

QUICK_TRAIN, QUICK_TEST = 3000, 2000

EXPERIMENTS = {
    "overfitting": catalog.overfitting,
    "early_stopping": catalog.early_stopping,
    "gradients": catalog.gradients,
    "optimizers": catalog.optimizers,
    "bagging": catalog.bagging,
    "labels": catalog.labels,
    "dropout_paper": catalog.dropout_paper,
    "augmentation": catalog.augmentation,
    "transfer_mnist": catalog.transfer_mnist,
}
# Run when --experiments is not given. dropout_paper and transfer_mnist need
# MNIST (about 35 and 12 CPU minutes), and augmentation keeps the default
# run short: ask for them by name.
MNIST_EXPERIMENTS = ("dropout_paper", "transfer_mnist")
BY_NAME_ONLY = MNIST_EXPERIMENTS + ("augmentation",)
DEFAULT_EXPERIMENTS = [key for key in EXPERIMENTS
                       if key not in BY_NAME_ONLY]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m kreg.walkthrough", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--dataset", default="digits",
        help="digits (bundled, default), breast_cancer (bundled), mnist "
        "(IDX files or a prepared tensorflow-datasets copy in --data-dir), "
        "or another prepared tensorflow-datasets name",
    )
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the data set (never downloaded)")
    parser.add_argument("--output", default=None,
                        help="folder for results.md and the PNG plots "
                        "(default: a new walkthrough_output/run-<date-time>"
                        ")")
    parser.add_argument("--quick", action="store_true",
                        help="small budgets: a smoke run of a few minutes")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per arm (default 3, --quick 1)")
    parser.add_argument(
        "--experiments", default=",".join(DEFAULT_EXPERIMENTS),
        help=f"comma-separated subset of: {', '.join(EXPERIMENTS)} "
        f"(default: all but augmentation, run it with --experiments "
        f"augmentation, and the MNIST ones: dropout_paper, the comparison "
        f"with Srivastava et al. 2014, and transfer_mnist, transfer from "
        f"MNIST to the digits and from 0-4 to 5-9 with a CNN; run them with "
        f"--dataset mnist --data-dir DIR --experiments NAME)",
    )
    args = parser.parse_args(argv)
    args.experiments = [e.strip() for e in args.experiments.split(",") if e]
    unknown = [e for e in args.experiments if e not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiments {unknown}; "
                     f"choose from {list(EXPERIMENTS)}")
    if args.output is None:
        args.output = os.path.join(
            "walkthrough_output", time.strftime("run-%Y%m%d-%H%M%S"))
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


class NoRetracingWarning(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning, which
    the walkthrough causes by building new models for every run; every
    other warning passes."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("tensorflow").addFilter(NoRetracingWarning())
    os.makedirs(args.output, exist_ok=True)
    start = time.perf_counter()
    dataset = data_module.load_dataset(args.dataset, args.data_dir)
    if args.quick:
        # A smoke run on any data set: at most this many images.
        dataset = dataset.subset(QUICK_TRAIN, seed=0, test_size=QUICK_TEST)
    header = (
        f"# kreg walkthrough\n\nkreg {kreg.__version__}, Keras "
        f"{keras.__version__}, backend {keras.backend.backend()}; data: "
        f"{dataset.source}; {args.seeds} seeds"
        f"{'; --quick budgets' if args.quick else ''}."
    )
    print(header.replace("# ", "").replace("\n\n", ": "))
    experiments = []
    for key in args.experiments:
        try:
            made = EXPERIMENTS[key](dataset, quick=args.quick)
            experiments += made if isinstance(made, list) else [made]
        except catalog.NotApplicable as reason:
            print(f"Skipping {key!r} on {dataset.name}: {reason}.")
    total = sum(e.runs for e in experiments) * args.seeds
    progress = keras.utils.Progbar(total, unit_name="run")
    done = [0]

    def on_run(experiment, result):
        done[0] += 1
        progress.update(done[0])

    written = []
    for experiment in experiments:
        run_experiment(experiment, range(args.seeds), progress=on_run)
        if experiment.key == "optimizers":
            experiment.notes += catalog.epochs_to_reach(experiment, 0.95)
        if experiment.key == "gradients":
            experiment.notes += catalog.layer_norm_notes(experiment)
        if experiment.key in catalog.LABEL_EXPERIMENTS:
            experiment.notes += catalog.label_fraction_notes(experiment)
        if experiment.key == "dropout_paper":
            experiment.notes += catalog.error_notes(experiment, 1.25)
        report.print_table(experiment)
        if experiment.key in catalog.LABEL_EXPERIMENTS:
            # Twelve arms: accuracy against the label fraction, not curves.
            plots = [report.plot_label_fractions(experiment, args.output)]
        elif experiment.key == "dropout_paper":
            plots = [report.plot_error_curves(
                experiment, args.output, catalog.PAPER_MNIST_ERRORS)]
        else:
            plots = [report.plot_curves(experiment, args.output),
                     report.plot_layer_norms(experiment, args.output)]
        if experiment.key == "bagging":
            plots.append(report.plot_reliability(experiment, args.output))
        if experiment.key == "augmentation":
            plots.append(report.plot_arm_accuracy(experiment, args.output))
        written.append((experiment, [p for p in plots if p]))
    path = report.write_markdown(written, args.output, header)
    count = sum(len(plots) for _, plots in written)
    print(f"\nWrote {path} and {count} plot(s) to {args.output} "
          f"in {time.perf_counter() - start:.0f} s.")
    return written


if __name__ == "__main__":
    main()
