"""kreg: Keras 3 pieces that make deep networks train stably and generalize.

Layers (`kreg.layers`), regularizers (`kreg.regularizers`), losses
(`kreg.losses`), an optimizer wrapper (`kreg.optimizers`) and `model.fit`
callbacks (`kreg.callbacks`), each a drop-in for the Keras piece of the same
name, following the formulas of the lecture documents this project is built on.
"""

from kreg import callbacks
from kreg import layers
from kreg import losses
from kreg import optimizers
from kreg import regularizers
from kreg.version import __version__

__all__ = [
    "__version__",
    "callbacks",
    "layers",
    "losses",
    "optimizers",
    "regularizers",
]
