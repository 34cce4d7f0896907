"""Report: what `kreg.diagnose` measured, as a table and a problem list."""

import math

COLUMNS = (
    ("layer", "layer", "{}"),
    ("type", "type", "{}"),
    ("activation", "act.", "{}"),
    ("mean", "mean", "{:.3g}"),
    ("std", "std", "{:.3g}"),
    ("saturated", "sat.", "{:.0%}"),
    ("dead", "dead", "{:.0%}"),
    ("near_linear", "linear", "{:.0%}"),
    ("duplicates", "dup.", "{}"),
    ("grad_norm", "grad norm", "{:.3g}"),
)


def _cell(value, spec):
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return spec.format(value)


class Report:
    """The network at its current weights, as `kreg.diagnose` measured it.

    Attributes:
        layers: ``{layer name: row}``, in the network's order; a row is a
            dict with `type` (the class name), `activation` (its name, or
            `None`), `checked` (False: the layer's output could not be
            measured, "not checked"), the output's `mean` and `std` over
            all entries, the fractions `saturated`, `dead` and
            `near_linear`, the number of `duplicates` (units whose weights
            equal another unit's), and `grad_norm` (the L2 norm of the
            gradient of the loss with respect to the layer's trainable
            weights); `None` where a measure does not apply.
        inputs: one dict per model input with the per-feature `mean` and
            `std` (NumPy arrays over the last axis) and `measured_at`
            (`None`, or the name of the first layer, a `Normalization` or
            `Rescaling`, whose output was measured instead).
        problems: a list of `kreg.diagnostics.Problem`.
        loss: the loss on the batch, or `None` without `y`.
    """

    def __init__(self, layers, inputs, problems, loss=None):
        self.layers = layers
        self.inputs = inputs
        self.problems = problems
        self.loss = loss

    def __str__(self):
        rows = [[title for _, title, _ in COLUMNS]]
        for name, row in self.layers.items():
            if not row["checked"]:
                cells = [name, row["type"], "not checked"]
                cells += [""] * (len(COLUMNS) - 4)
                cells.append(_cell(row["grad_norm"], "{:.3g}"))
            else:
                cells = [_cell({**row, "layer": name}[key], spec)
                         for key, _, spec in COLUMNS]
            rows.append(cells)
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        lines = ["  ".join(cell.ljust(width) for cell, width
                           in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        for number, item in enumerate(self.inputs):
            std = item["std"]
            where = (f" (after layer {item['measured_at']!r})"
                     if item["measured_at"] else "")
            lines.append(
                f"inputs {number}{where}: per-feature mean in "
                f"[{item['mean'].min():.3g}, {item['mean'].max():.3g}], "
                f"std in [{std.min():.3g}, {std.max():.3g}]")
        if self.loss is not None:
            lines.append(f"loss: {self.loss:.4g}")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {problem}" for problem in self.problems]
        else:
            lines.append("No problems found.")
        return "\n".join(lines)

    def __repr__(self):
        kinds = sorted({problem.kind for problem in self.problems})
        return (f"<Report: {len(self.layers)} layers, "
                f"{len(self.problems)} problems {kinds}>")
