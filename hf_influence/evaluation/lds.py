"""The Linear Datamodelling Score (`method.md` §8.1).

For each query, the prediction for subset `S_k` is the sum of the scores of the examples it
*removed*, `Σ_{j∉S_k} τ(q, j)`: with the library's sign convention (positive τ = removing j is
predicted to increase the measurement) this predicts the change of the measurement, so a good
method has a positive LDS. The LDS is the Spearman correlation between predictions and the
seed-averaged measurements over the subsets, averaged over queries, with the standard error of the
mean over queries. Everything is computed in fp64.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .ground_truth import GroundTruth


@dataclass
class LDSResult:
    """A rank correlation per query and its mean ± standard error over queries (fractions, not %)."""

    mean: float
    stderr: float
    per_query: torch.Tensor  # (Q,) fp64

    @classmethod
    def from_per_query(cls, per_query: torch.Tensor) -> LDSResult:
        count = len(per_query)
        stderr = per_query.std(unbiased=True).item() / math.sqrt(count) if count > 1 else float("nan")
        return cls(per_query.mean().item(), stderr, per_query)

    def as_dict(self) -> dict[str, float | list[float]]:
        return {"mean": self.mean, "stderr": self.stderr, "per_query": self.per_query.tolist()}

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f} ± {100 * self.stderr:.1f} %"


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based) along the last dimension, ties sharing their average rank."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    for row, (sorted_values, order) in enumerate(zip(*values.sort(dim=-1), strict=True)):
        _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).to(torch.float64)
        average = ends - (counts.to(torch.float64) - 1) / 2
        ranks[row, order] = average[inverse]
    return ranks


def spearman(predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row of two `(Q, K)` tensors (NaN where a row is constant)."""
    if predicted.shape != actual.shape or predicted.dim() != 2:
        raise ValueError(f"Expected two (Q, K) tensors of the same shape, got {predicted.shape} and {actual.shape}.")
    if not (torch.isfinite(predicted).all() and torch.isfinite(actual).all()):
        raise ValueError("Predictions and measurements must be finite.")
    a, b = (_average_ranks(x.to(torch.float64)) for x in (predicted, actual))
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))


def predicted_changes(scores: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """`(Q, S)`: for each query and subset, the summed scores of the examples the subset removed."""
    if scores.dim() != 2 or scores.shape[1] != subsets.shape[1]:
        raise ValueError(
            f"scores must be (queries, {subsets.shape[1]} training examples), got {tuple(scores.shape)}: "
            "the columns must follow the training set's order."
        )
    return scores.to(torch.float64) @ (~subsets).to(torch.float64).T


def lds(scores: torch.Tensor, ground_truth: GroundTruth) -> LDSResult:
    """The LDS of a `(Q, N)` score matrix (positive = removal increases the measurement) against a ground truth."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] != ground_truth.num_queries:
        raise ValueError(
            f"scores have shape {tuple(scores.shape)}, but the ground truth has {ground_truth.num_queries} queries "
            f"and {ground_truth.num_examples} training examples."
        )
    predicted = predicted_changes(scores, ground_truth.subsets)
    return LDSResult.from_per_query(spearman(predicted, ground_truth.mean_measurements().T))


def _balanced_splits(seeds: int) -> list[tuple[list[int], list[int]]]:
    """Every split of the seeds into two halves of equal size (each unordered pair once; an odd seed out)."""
    half = seeds // 2
    splits = []
    for first in itertools.combinations(range(seeds), half):
        rest = [seed for seed in range(seeds) if seed not in first]
        for second in itertools.combinations(rest, half):
            if first < second:
                splits.append((list(first), list(second)))
    return splits


def split_half_correlation(ground_truth: GroundTruth) -> LDSResult:
    """Per query, the Spearman correlation over subsets between the seed-averaged measurements of two
    disjoint halves of the training seeds, averaged over every balanced split (needs ≥ 2 seeds)."""
    seeds = ground_truth.num_seeds
    if seeds < 2:
        raise ValueError("The exact-retraining ceiling needs measurements from at least 2 training seeds.")
    measurements = ground_truth.measurements.to(torch.float64)
    per_split = [
        spearman(measurements[:, first].mean(dim=1).T, measurements[:, second].mean(dim=1).T)
        for first, second in _balanced_splits(seeds)
    ]
    return LDSResult.from_per_query(torch.stack(per_split).mean(dim=0))


def exact_retraining_ceiling(ground_truth: GroundTruth) -> LDSResult:
    """The LDS that the noise-free expected measurement would score against this ground truth: an upper
    reference for any method, whose predictions do not know the training seeds' noise.

    Model each measurement as the subset's expectation plus independent seed noise. The split-half
    correlation `r` between two half-seed means then measures the noise, the Spearman–Brown formula
    `2r / (1 + r)` gives the reliability of the mean over all seeds, and its square root is the
    correlation of the expectation with that mean (per query, `r` clamped at 0). The model is Pearson's
    and the LDS Spearman's, so this is a close reference rather than an exact bound; with more seeds it is
    both tighter and better estimated (`split_half_correlation` is the measured part)."""
    halves = split_half_correlation(ground_truth).per_query.clamp(min=0)
    return LDSResult.from_per_query((2 * halves / (1 + halves)).sqrt())
