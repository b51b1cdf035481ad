"""Random training subsets for the LDS (`method.md` §8.1): `count` subsets of `round(α N)` examples."""

from __future__ import annotations

import torch

from ..seeding import seeded_generator


def random_subsets(num_examples: int, alpha: float = 0.5, count: int = 100, seed: int = 0) -> torch.Tensor:
    """A `(count, num_examples)` boolean mask, True where an example is kept (sampled without replacement).

    Subset `k` is drawn from a generator seeded by (seed, k) alone, so the first subsets are the
    same whatever `count` is: an evaluation can be extended with more subsets without retraining.
    """
    if num_examples < 2:
        raise ValueError(f"num_examples must be at least 2 to remove part of the data, got {num_examples}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha (the fraction of examples kept) must be in (0, 1), got {alpha}.")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}.")
    kept = round(alpha * num_examples)
    if not 0 < kept < num_examples:
        raise ValueError(f"alpha={alpha} of {num_examples} examples keeps {kept}: nothing or everything.")
    masks = torch.zeros(count, num_examples, dtype=torch.bool)
    for subset in range(count):
        order = torch.randperm(num_examples, generator=seeded_generator(seed, "lds-subsets", subset))
        masks[subset, order[:kept]] = True
    return masks
