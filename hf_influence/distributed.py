"""The processes sharing a job: one (no accelerator) or those of an `accelerate.Accelerator`.

The library does not own the launcher: it takes the user's `Accelerator` (or none) and uses it to
split the data stream, sum statistics and share results. Every draw is seeded by its example's id,
so a job gives the same result whatever the number of processes.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Any

import torch

from .row_digests import DIGEST_MODULUS


class Ranks:
    """Rank bookkeeping and the three collectives the library needs: split, sum and broadcast."""

    def __init__(self, accelerator: Any = None) -> None:
        self.accelerator = accelerator
        self.world = 1 if accelerator is None else accelerator.num_processes
        self.rank = 0 if accelerator is None else accelerator.process_index
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world == 1:
            raise RuntimeError(
                f"This job was launched for {launched} processes but runs as one: every rank would do the whole "
                "job alone. On CPU create the Accelerator with cpu=True or set ACCELERATE_USE_CPU=true, and pass "
                "it as accelerator=..."
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, dataset: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        """This rank's part of the data; every example goes to exactly one rank."""
        if self.world == 1:
            return dataset
        try:
            from datasets import Dataset, IterableDataset
            from datasets.distributed import split_dataset_by_node

            if isinstance(dataset, (Dataset, IterableDataset)):
                return split_dataset_by_node(dataset, rank=self.rank, world_size=self.world)
        except ImportError:
            pass
        return itertools.islice(dataset, self.rank, None, self.world)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over ranks (every rank gets it)."""
        if self.world == 1:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor.contiguous(), reduction="sum")

    def sum_digest(self, digest: int, device: torch.device | str = "cpu") -> int:
        """A dataset digest (`row_digests.py`, < 2⁶²) summed over ranks, exactly: in two 31-bit halves, which
        int64 sums cannot overflow."""
        if self.world == 1:
            return digest
        low, high = digest & ((1 << 31) - 1), digest >> 31
        halves = self.sum(torch.tensor([low, high], dtype=torch.int64, device=device)).tolist()
        return (halves[0] + (halves[1] << 31)) % DIGEST_MODULUS

    def owner(self, position: int) -> int:
        """Which rank computes item `position` of a list shared out round-robin."""
        return position % self.world

    def broadcast(self, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        """`tensor` as the `owner` rank holds it (other ranks pass a tensor of the same shape)."""
        if self.world == 1:
            return tensor
        from accelerate.utils import broadcast

        return broadcast(tensor.contiguous(), from_process=owner)

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()
