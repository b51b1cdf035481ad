"""Seeded random generators keyed by what they are for, never by a shared RNG state.

Every random choice the library makes — a draw's timestep and noise, a projection matrix, an LDS subset —
comes from a CPU generator seeded by a key such as (seed, stream, example id). The same key gives the same
numbers on every machine, whatever the batch size, the order of the data or the number of processes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def seeded_generator(*key: Any) -> torch.Generator:
    """A CPU generator that depends only on `key` (joined as text: `seeded_generator(0, "fit", 17)`)."""
    digest = hashlib.blake2b("/".join(str(part) for part in key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
