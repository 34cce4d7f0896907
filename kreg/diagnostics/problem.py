"""Problem: one finding of `kreg.diagnose`."""

import dataclasses

KINDS = (
    "inputs_not_standardized",
    "saturated",
    "dead_units",
    "near_linear",
    "duplicate_units",
    "vanishing_gradient",
    "exploding_gradient",
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A problem `kreg.diagnose` found in a network before training.

    Attributes:
        layer: the layer's name, or `None` for the inputs.
        kind: one of `"inputs_not_standardized"`, `"saturated"`,
            `"dead_units"`, `"near_linear"`, `"duplicate_units"`,
            `"vanishing_gradient"`, `"exploding_gradient"`.
        message: what was measured, and the lecture's fix.
    """

    layer: object
    kind: str
    message: str

    def __str__(self):
        return f"[{self.kind}] {self.message}"
