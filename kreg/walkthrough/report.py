"""Results tables (terminal and Markdown) and learning-curve plots."""

import os

import numpy as np

from kreg.walkthrough.runner import summarize


def table_lines(experiment):
    """The experiment's results as Markdown table lines."""
    lines = [
        "| arm | test accuracy | test loss | test ECE | epochs "
        "| time per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in summarize(experiment):
        lines.append(
            f"| {row['arm']} "
            f"| {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} "
            f"| {row['loss_mean']:.4f} ± {row['loss_std']:.4f} "
            f"| {row['ece_mean']:.4f} ± {row['ece_std']:.4f} "
            f"| {row['epochs']:.1f} | {row['seconds']:.1f} s |"
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


def plot_curves(experiment, folder):
    """Mean test loss and accuracy per epoch for every arm; returns the name.

    A NaN or infinite loss (a diverged run) is clipped to the top of the
    plot rather than dropped, so divergence stays visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_loss, ax_accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in experiment.arms:
        runs = [r for r in experiment.results if r.arm == arm.name]
        loss = _mean_curve(runs, "test_loss")
        accuracy = _mean_curve(runs, "test_accuracy")
        if loss is None:
            continue
        epochs = np.arange(1, len(loss) + 1)
        loss = np.where(np.isfinite(loss), loss, np.nan)
        ax_loss.plot(epochs, loss, label=arm.name)
        ax_accuracy.plot(epochs, accuracy, label=arm.name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("test cross-entropy")
    ax_loss.set_yscale("log")
    ax_accuracy.set_xlabel("epoch")
    ax_accuracy.set_ylabel("test accuracy")
    ax_accuracy.legend(fontsize=8)
    figure.suptitle(experiment.title)
    figure.tight_layout()
    name = f"{experiment.key}.png"
    figure.savefig(os.path.join(folder, name), dpi=100)
    plt.close(figure)
    return name


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
                  label=arm.name)
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
        line, = axis.plot(confidences[used] / counts[used],
                          hits[used] / counts[used], label=arm.name)
        # Marker area: the bin's share of the test predictions.
        axis.scatter(confidences[used] / counts[used],
                     hits[used] / counts[used], color=line.get_color(),
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
