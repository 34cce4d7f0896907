"""kreg.models: ensembles of models trained in one `fit` (bagging), the
predictive mean and spread of an ensemble or of MC dropout, and greedy
layer-wise unsupervised pretraining of a Dense stack."""

from kreg.models.ensemble import Ensemble
from kreg.models.predict_with_uncertainty import predict_with_uncertainty
from kreg.models.pretrain_layerwise import pretrain_layerwise

__all__ = ["Ensemble", "predict_with_uncertainty", "pretrain_layerwise"]
