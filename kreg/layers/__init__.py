"""kreg.layers: batch normalization, dropout, elastic deformation, Gaussian
noise, weight noise.

Each layer is a drop-in for the Keras layer of the same name; see each
class's docstring for the formula and where it differs from Keras.
"""

from kreg.layers.batch_normalization import BatchNormalization
from kreg.layers.dropout import Dropout
from kreg.layers.elastic_deformation import ElasticDeformation
from kreg.layers.gaussian_noise import GaussianNoise
from kreg.layers.mc_predict import mc_predict
from kreg.layers.mc_predict import mc_sampling
from kreg.layers.weight_noise import WeightNoise

__all__ = [
    "BatchNormalization",
    "Dropout",
    "ElasticDeformation",
    "GaussianNoise",
    "WeightNoise",
    "mc_predict",
    "mc_sampling",
]
