"""kreg.metrics: calibration of predicted probabilities (Keras metrics).

The negative log-likelihood is Keras's own
`keras.metrics.SparseCategoricalCrossentropy` /
`keras.metrics.CategoricalCrossentropy`.
"""

from kreg.metrics.brier_score import BrierScore
from kreg.metrics.expected_calibration_error import ExpectedCalibrationError

__all__ = ["BrierScore", "ExpectedCalibrationError"]
