"""kreg.callbacks: `model.fit` callbacks (early stopping, weight averaging)."""

from kreg.callbacks.early_stopping import EarlyStopping
from kreg.callbacks.ema import EMA
from kreg.callbacks.retrain_on_full_data import RetrainOnFullData
