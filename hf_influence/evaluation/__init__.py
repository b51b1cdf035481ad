"""Evaluation of attribution scores against retraining (`method.md` §8).

* `random_subsets`: the LDS subsets (α, count, seed), as a boolean mask of kept examples.
* `retrain_subsets` / `retrain_without`: one model per (subset, seed) with `train_ddpm`, resumable,
  skipping finished runs.
* `measure`: a measurement of generated samples with common random numbers (draws seeded per query).
* `GroundTruth`: the subsets and the measured retrained models (safetensors + JSON, Hub dataset repo).
* `lds`, `exact_retraining_ceiling`, `split_half_correlation`: the Linear Datamodelling Score, the LDS the
  noise-free expectation would score (an upper reference), and the seed-noise measurement it rests on.
* `top_k_removal`: retraining without each query's top-k examples, against removing k random ones.
"""

from .ground_truth import GroundTruth, GroundTruthProtocol, build_ground_truth, measure, measure_models
from .lds import LDSResult, exact_retraining_ceiling, lds, predicted_changes, spearman, split_half_correlation
from .retraining import RetrainedModel, retrain_subsets, retrain_without
from .subsets import random_subsets
from .top_k_removal import TopKRemovalResult, top_k_removal

__all__ = [
    "GroundTruth",
    "GroundTruthProtocol",
    "LDSResult",
    "RetrainedModel",
    "TopKRemovalResult",
    "build_ground_truth",
    "exact_retraining_ceiling",
    "lds",
    "measure",
    "measure_models",
    "predicted_changes",
    "random_subsets",
    "retrain_subsets",
    "retrain_without",
    "spearman",
    "split_half_correlation",
    "top_k_removal",
]
