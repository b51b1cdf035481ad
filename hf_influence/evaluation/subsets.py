"""Random training subsets for the LDS (`method.md` §8.1): `count` subsets of `round(α N)` examples."""

from __future__ import annotations

import torch

from ..seeding import seeded_generator
from ..validation import check_float, check_int


def random_subsets(num_examples: int, alpha: float = 0.5, count: int = 100, seed: int = 0) -> torch.Tensor:
    """A `(count, num_examples)` boolean mask, True where an example is kept (sampled without replacement).

    Subset `k` is drawn from a generator seeded by (seed, k) alone, so the first subsets are the
    same whatever `count` is: an evaluation can be extended with more subsets without retraining.
    """
    num_examples = check_int("num_examples (at least 2, to remove part of the data)", num_examples, minimum=2)
    alpha = check_float("alpha (the fraction of examples kept)", alpha, minimum=0, maximum=1)
    if alpha in (0.0, 1.0):
        raise ValueError(f"alpha (the fraction of examples kept) must be in (0, 1), got {alpha}.")
    count = check_int("count", count, minimum=1)
    seed = check_int("seed", seed)
    kept = round(alpha * num_examples)
    if not 0 < kept < num_examples:
        raise ValueError(f"alpha={alpha} of {num_examples} examples keeps {kept}: nothing or everything.")
    masks = torch.zeros(count, num_examples, dtype=torch.bool)
    for subset in range(count):
        order = torch.randperm(num_examples, generator=seeded_generator(seed, "lds-subsets", subset))
        masks[subset, order[:kept]] = True
    return masks
