"""Results tables (terminal and Markdown) and learning-curve plots."""

import collections
import os

import numpy as np

from kreg.walkthrough.runner import summarize


def _cell(row, key, digits):
    """``mean ± std`` of a column, or how many runs diverged (NaN)."""
    diverged = row[f"{key}_diverged"]
    if diverged:
        return f"diverged in {diverged} of {row['seeds']} runs"
    return f"{row[f'{key}_mean']:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"


def table_lines(experiment):
    """The experiment's results as Markdown table lines."""
    if experiment.references:
        return _reference_table_lines(experiment)
    lines = [
        "| arm | test accuracy | test loss | test ECE | epochs "
        "| time per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in summarize(experiment):
        lines.append(
            f"| {row['arm']} "
            f"| {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} "
            f"| {_cell(row, 'loss', 4)} | {_cell(row, 'ece', 4)} "
            f"| {row['epochs']:.1f} | {row['seconds']:.1f} s |"
        )
    return lines


def _duration(seconds):
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _reference_table_lines(experiment):
    """Test error (%) beside the published figure, with CPU and wall time."""
    lines = [
        "| arm | test error (%) | published test error | test loss "
        "| test ECE | epochs | CPU time per run | wall time per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in summarize(experiment):
        error = 100 * (1 - row["accuracy_mean"])
        lines.append(
            f"| {row['arm']} "
            f"| {error:.2f} ± {100 * row['accuracy_std']:.2f} "
            f"| {experiment.references.get(row['arm'], '')} "
            f"| {_cell(row, 'loss', 4)} | {_cell(row, 'ece', 4)} "
            f"| {row['epochs']:.1f} | {_duration(row['cpu_seconds'])} "
            f"| {_duration(row['seconds'])} |"
        )
    return lines


def markdown_section(experiment, plot_names=()):
    seeds = len({r.seed for r in experiment.results})
    lines = [
        f"## {experiment.title}",
        "",
        experiment.question,
        "",
        f"Data: {experiment.dataset.source}, {len(experiment.dataset.x_train)}"
        f" training and {len(experiment.dataset.x_test)} test examples; "
        f"{experiment.epochs} epochs budget, batch {experiment.batch_size}, "
        f"{seeds} seeds (mean ± std).",
        "",
        *table_lines(experiment),
        "",
    ]
    lines += [f"- {note}" for note in experiment.notes]
    if experiment.notes:
        lines.append("")
    for name in plot_names:
        lines += [f"![{experiment.title}]({name})", ""]
    return "\n".join(lines)


def print_table(experiment, write=print):
    write("")
    write(experiment.title)
    for line in table_lines(experiment):
        write(line)
    for note in experiment.notes:
        write(f"  note: {note}")


def _mean_curve(runs, key):
    curves = [r.curves[key] for r in runs if r.curves.get(key)]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    if length == 0:
        return None
    return np.mean([c[:length] for c in curves], axis=0)


def _mean_ending_at_table(runs, key):
    """The mean per-epoch ``test_loss`` or ``test_accuracy`` curve of the
    runs (up to the shortest), its last point replaced by the mean of the
    runs' final scores: the table's value."""
    runs = [r for r in runs if r.curves.get(key)]
    curve = _mean_curve(runs, key)
    if curve is None:
        return None
    curve = np.array(curve, dtype=float)
    curve[-1] = np.mean([getattr(r, key) for r in runs])
    return curve


Line = collections.namedtuple("Line", "epochs loss accuracy style label")


def curve_lines(experiment, arm):
    """The lines `plot_curves` draws for `arm`, as `Line` tuples of
    per-epoch test loss and accuracy: the mean over the arm's runs, or,
    for runs with a second phase (RetrainOnFullData), one line per run
    and phase (phase 1 ``"-"``, phase 2 ``"--"``).

    A line ends at the table's scores: its last point is the runs' final
    test loss and accuracy (their mean), the trained model as the table
    scores it (with the arm's own predict, e.g. MC dropout, and after
    callbacks that change the weights at the end, e.g. EMA or
    restore_best_weights); the points before are the per-epoch scores.
    """
    runs = [r for r in experiment.results if r.arm == arm.name]
    phased = [r for r in runs if 2 in r.curves.get("phase", [])]
    if not phased:
        loss = _mean_ending_at_table(runs, "test_loss")
        accuracy = _mean_ending_at_table(runs, "test_accuracy")
        if loss is None or accuracy is None:
            return []
        count = min(len(loss), len(accuracy))
        return [Line(np.arange(1, count + 1), loss[:count],
                     accuracy[:count], "-", arm.name)]
    lines = []
    for index, run in enumerate(phased):
        loss = _mean_ending_at_table([run], "test_loss")
        accuracy = _mean_ending_at_table([run], "test_accuracy")
        phases = np.asarray(run.curves["phase"])
        count = min(len(phases), len(loss), len(accuracy))
        epochs = np.arange(1, count + 1)
        for phase, style in ((1, "-"), (2, "--")):
            part = phases[:count] == phase
            label = arm.name if index == 0 and phase == 1 else None
            lines.append(Line(epochs[part], loss[:count][part],
                              accuracy[:count][part], style, label))
    return lines


def _arm_colour(experiment, arm):
    """The same colour for an arm in every plot of its experiment."""
    return f"C{experiment.arms.index(arm) % 10}"


def plot_curves(experiment, folder):
    """Mean test loss and accuracy per epoch for every arm; returns the name.

    The lines are `curve_lines`: each ends at the arm's scores in the
    table. A NaN or infinite loss (a diverged run) is drawn as a cross at
    the top of the plot rather than dropped, so divergence stays visible.
    Runs with a second training phase (RetrainOnFullData) are drawn one by
    one, phase 2 dashed after phase 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (ax_loss, ax_accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    finite = [v for r in experiment.results for v in r.curves["test_loss"]
              if np.isfinite(v)]
    top = 2.0 * max(finite) if finite else 1.0
    for arm in experiment.arms:
        colour = _arm_colour(experiment, arm)
        for line in curve_lines(experiment, arm):
            _plot_run(ax_loss, ax_accuracy, line.epochs, line.loss,
                      line.accuracy, colour, top, line.style, line.label)
    for axis in (ax_loss, ax_accuracy):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_ylabel("test cross-entropy (x: diverged)")
    ax_loss.set_yscale("log")
    ax_accuracy.set_ylabel("test accuracy")
    ax_accuracy.legend(fontsize=8)
    phased = any(2 in r.curves.get("phase", []) for r in experiment.results)
    figure.suptitle(experiment.title + (
        " (one line per run; phase 2, on all the data, dashed)"
        if phased else ""))
    figure.tight_layout()
    name = f"{experiment.key}.png"
    figure.savefig(os.path.join(folder, name), dpi=100)
    plt.close(figure)
    return name


def _plot_run(ax_loss, ax_accuracy, epochs, loss, accuracy, colour, top,
              style, label):
    loss = np.asarray(loss, dtype=float)
    bad = ~np.isfinite(loss)
    ax_loss.plot(epochs, np.where(bad, top, loss), style, color=colour,
                 label=label)
    if bad.any():
        ax_loss.plot(epochs[bad], np.full(bad.sum(), top), "x",
                     color=colour, markersize=8)
    ax_accuracy.plot(epochs, accuracy, style, color=colour, label=label)


def write_markdown(experiments, folder, header):
    path = os.path.join(folder, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + "\n\n")
        for experiment, plot_names in experiments:
            f.write(markdown_section(experiment, plot_names) + "\n")
    return path


def plot_layer_norms(experiment, folder):
    """Mean first-epoch gradient norm per layer (input to output) per arm.

    Returns the file name, or None when no arm recorded layer norms.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    plotted = False
    for arm in experiment.arms:
        norms = [r.extras["layer_norms"] for r in experiment.results
                 if r.arm == arm.name and r.extras.get("layer_norms")]
        if not norms:
            continue
        mean = np.mean(norms, axis=0)
        axis.plot(np.arange(1, len(mean) + 1), mean, marker="o",
                  color=_arm_colour(experiment, arm), label=arm.name)
        plotted = True
    if not plotted:
        plt.close(figure)
        return None
    axis.set_yscale("log")
    axis.set_xlabel("Dense layer (1 = next to the input)")
    axis.set_ylabel("gradient norm, first epoch")
    axis.legend(fontsize=8)
    axis.set_title("Where the gradient vanishes")
    figure.tight_layout()
    name = f"{experiment.key}_layer_norms.png"
    figure.savefig(os.path.join(folder, name), dpi=100)
    plt.close(figure)
    return name


def plot_reliability(experiment, folder):
    """Reliability diagram: accuracy against confidence per arm (test
    predictions of all seeds pooled, 15 bins; a marker's area is its bin's
    share of the predictions); returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":",
              label="perfectly calibrated")
    for arm in experiment.arms:
        bins = [r.extras["calibration_bins"] for r in experiment.results
                if r.arm == arm.name]
        if not bins:
            continue
        counts, confidences, hits = (np.sum(part, axis=0)
                                     for part in zip(*bins))
        used = counts > 0
        colour = _arm_colour(experiment, arm)
        axis.plot(confidences[used] / counts[used],
                  hits[used] / counts[used], color=colour, label=arm.name)
        # Marker area: the bin's share of the test predictions.
        axis.scatter(confidences[used] / counts[used],
                     hits[used] / counts[used], color=colour,
                     s=8 + 400 * counts[used] / counts.sum())
    axis.set_xlabel("confidence (mean per bin)")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    axis.set_title(f"{experiment.title}: calibration (marker area: share "
                   "of predictions)", fontsize=10)
    figure.tight_layout()
    name = f"{experiment.key}_reliability.png"
    figure.savefig(os.path.join(folder, name), dpi=100)
    plt.close(figure)
    return name


def plot_label_fractions(experiment, folder):
    """Test accuracy (mean ± std over seeds) against the fraction of
    labelled images, one line per method (the arms' ``factors``); returns
    the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {}  # method -> fraction -> accuracies
    images = {}
    for arm in experiment.arms:
        method = arm.factors["method"]
        fraction = arm.factors["label_fraction"]
        images[fraction] = arm.factors.get("labelled_images")
        points.setdefault(method, {})[fraction] = [
            r.test_accuracy for r in experiment.results if r.arm == arm.name]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (method, by_fraction) in enumerate(points.items()):
        fractions = sorted(f for f, acc in by_fraction.items() if acc)
        if not fractions:
            continue
        mean = [np.mean(by_fraction[f]) for f in fractions]
        std = [np.std(by_fraction[f]) for f in fractions]
        axis.errorbar(fractions, mean, yerr=std, marker="o", capsize=4,
                      color=f"C{index % 10}", label=method)
    fractions = sorted(images)
    axis.set_xscale("log")
    axis.set_xticks(fractions)
    axis.set_xticklabels([
        f"{f * 100:g} %" + (f"\n({images[f]} images)" if images[f] else "")
        for f in fractions])
    axis.minorticks_off()
    axis.set_xlabel("fraction of the training images with labels")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    seeds = len({r.seed for r in experiment.results})
    axis.set_title(f"{experiment.title}\n({seeds} seeds, "
                   f"{experiment.epochs} supervised epochs per arm)",
                   fontsize=10)
    figure.tight_layout()
    name = f"{experiment.key}.png"
    figure.savefig(os.path.join(folder, name), dpi=100)
    plt.close(figure)
    return name


def plot_error_curves(experiment, folder, references=None):
    """Test error (%) per epoch and against the run's CPU minutes, per arm
    (mean over seeds, log scale, the last point the table's), with
    `references` ({label: error %}) drawn as dotted lines; returns the file
    name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_epoch, ax_cpu) = plt.subplots(1, 2, figsize=(11, 4.5))
    for arm in experiment.arms:
        runs = [r for r in experiment.results if r.arm == arm.name]
        accuracy = _mean_ending_at_table(runs, "test_accuracy")
        if accuracy is None:
            continue
        error = 100 * (1 - accuracy)
        colour = _arm_colour(experiment, arm)
        ax_epoch.plot(np.arange(1, len(error) + 1), error, color=colour,
                      label=arm.name)
        cpu = _mean_curve(runs, "cpu_seconds")
        if cpu is not None:
            count = min(len(cpu), len(error))
            ax_cpu.plot(cpu[:count] / 60, error[:count], color=colour,
                        label=arm.name)
    for index, (label, value) in enumerate((references or {}).items()):
        for axis in (ax_epoch, ax_cpu):
            axis.axhline(value, color=f"C{7 + index % 3}", linestyle=":",
                         label=f"paper: {label} ({value:.2f} %)"
                         if axis is ax_epoch else None)
    for axis in (ax_epoch, ax_cpu):
        axis.set_yscale("log")
        axis.set_ylabel("test error (%)")
        axis.grid(True, which="both", alpha=0.3)
    ax_epoch.set_xlabel("epoch")
    ax_cpu.set_xlabel("CPU minutes into the run (user + system)")
    ax_epoch.legend(fontsize=7)
    figure.suptitle(experiment.title)
    figure.tight_layout()
    name = f"{experiment.key}.png"
    figure.savefig(os.path.join(folder, name), dpi=100)
    plt.close(figure)
    return name


def plot_arm_accuracy(experiment, folder):
    """Test accuracy per arm (mean ± std over seeds, each seed a dot), one
    horizontal bar per arm; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [arm.name for arm in experiment.arms]
    accuracies = [[r.test_accuracy for r in experiment.results
                   if r.arm == name] for name in names]
    figure, axis = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    rows = np.arange(len(names))[::-1]
    means = [np.mean(a) if a else np.nan for a in accuracies]
    stds = [np.std(a) if a else 0.0 for a in accuracies]
    axis.barh(rows, means, xerr=stds, capsize=4,
              color=[f"C{i % 10}" for i in range(len(names))], alpha=0.6)
    for row, values in zip(rows, accuracies):
        axis.plot(values, [row] * len(values), "k.", markersize=5)
    finite = [m for m in means if np.isfinite(m)]
    low = min(min(a) for a in accuracies if a) if finite else 0.0
    axis.set_xlim(max(0.0, low - 0.05), 1.0)
    axis.set_yticks(rows)
    axis.set_yticklabels(names, fontsize=8)
    axis.set_xlabel("test accuracy (clean labels; bar: mean ± std, dots: "
                    "seeds)")
    axis.grid(axis="x", alpha=0.3)
    seeds = len({r.seed for r in experiment.results})
    axis.set_title(f"{experiment.title}\n({seeds} seeds, "
                   f"{experiment.epochs} epochs per arm)", fontsize=10)
    figure.tight_layout()
    name = f"{experiment.key}_accuracy.png"
    figure.savefig(os.path.join(folder, name), dpi=100)
    plt.close(figure)
    return name
