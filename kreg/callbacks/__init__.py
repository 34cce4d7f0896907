"""kreg.callbacks: `model.fit` callbacks.

- `EarlyStopping`: Keras's rule with a resumable state, and the EMA's
  weights kept when it restores.
- `EMA`: exponential moving average of the weights,
  ``s_t = decay * s_{t-1} + (1 - decay) * w_t``.
- `RetrainOnFullData`: after early stopping, train again on all the data
  (Goodfellow et al., algorithms 7.2 and 7.3).
- `BackupAndRestore`: Keras's, plus resuming kreg's `EarlyStopping`, `EMA`
  and `RetrainOnFullData` state in the same folder.
- `ModelCheckpoint`: Keras's, plus the state of kreg's callbacks beside
  each file (``EMA(resume_from=file)`` continues from it).
- `FineTuning`: transfer learning, a frozen pre-trained base unfrozen from
  the top in steps, with a lower learning rate for it.
- `GradientMonitor`: gradient norms in the logs, with any optimizer, and
  warnings on vanishing or exploding layers.
"""

from kreg.callbacks.backup_and_restore import BackupAndRestore
from kreg.callbacks.early_stopping import EarlyStopping
from kreg.callbacks.ema import EMA
from kreg.callbacks.fine_tuning import FineTuning
from kreg.callbacks.gradient_monitor import GradientMonitor
from kreg.callbacks.model_checkpoint import ModelCheckpoint
from kreg.callbacks.retrain_on_full_data import RetrainOnFullData

__all__ = [
    "EMA",
    "BackupAndRestore",
    "EarlyStopping",
    "FineTuning",
    "GradientMonitor",
    "ModelCheckpoint",
    "RetrainOnFullData",
]
