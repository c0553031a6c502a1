"""keras-stability: stability training (Zheng et al., CVPR 2016) for Keras 3.

Makes a network's outputs stable under small natural distortions (JPEG
compression, thumbnailing, cropping) by adding `alpha * D(f(x), f(x'))` on a
perturbed copy `x'` to the task loss.
"""

from keras_stability import datasets, distortions, evaluation, triplets
from keras_stability.embeddings import TripletModel, embedding_model
from keras_stability.finetune import freeze_all_but
from keras_stability.losses import StabilityKL, StabilityL2, TripletRankingLoss
from keras_stability.models import StabilityModel
from keras_stability.perturbations import GaussianPerturbation

__version__ = "0.1.0"


def __getattr__(name):
    # keras-tuner is an optional extra: import `tuning` on first use only.
    if name == "tuning":
        import importlib

        return importlib.import_module("keras_stability.tuning")
    raise AttributeError(f"module 'keras_stability' has no attribute {name!r}")


__all__ = [
    "datasets",
    "distortions",
    "evaluation",
    "triplets",
    "tuning",
    "GaussianPerturbation",
    "StabilityKL",
    "StabilityL2",
    "StabilityModel",
    "TripletModel",
    "TripletRankingLoss",
    "embedding_model",
    "freeze_all_but",
]
