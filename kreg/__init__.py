"""kreg: Keras 3 pieces that make deep networks train stably and generalize.

Layers (`kreg.layers`), regularizers (`kreg.regularizers`), losses
(`kreg.losses`), an optimizer wrapper (`kreg.optimizers`), `model.fit`
callbacks (`kreg.callbacks`), ensembles (`kreg.models`) and calibration
metrics (`kreg.metrics`), each a drop-in for the Keras piece of the same
name, following the formulas of the lecture documents this project is built on.
"""

from kreg import callbacks
from kreg import diagnostics
from kreg import initializers
from kreg import layers
from kreg import losses
from kreg import metrics
from kreg import models
from kreg import optimizers
from kreg import regularizers
from kreg.diagnostics import diagnose
from kreg.version import __version__

__all__ = [
    "__version__",
    "callbacks",
    "diagnose",
    "diagnostics",
    "initializers",
    "layers",
    "losses",
    "metrics",
    "models",
    "optimizers",
    "regularizers",
]
