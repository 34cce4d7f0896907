"""kreg.models: ensembles of models trained in one `fit` (bagging), and the
predictive mean and spread of an ensemble or of MC dropout."""

from kreg.models.ensemble import Ensemble
from kreg.models.predict_with_uncertainty import predict_with_uncertainty

__all__ = ["Ensemble", "predict_with_uncertainty"]
