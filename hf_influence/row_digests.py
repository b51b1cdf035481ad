"""Row digests: what tells a dataset's rows apart from another dataset's rows with the same ids.

Ids alone cannot: two datasets (or two versions of one) may share ids 0 … N − 1. Every row read by fitting or
indexing gets a 62-bit digest of its id and of the columns the task reads (the image, the label or caption).
An index stores each example's digest beside its id, so `AttributionResult.rows` and `GradientIndex.check_dataset`
notice another dataset; a fit checkpoint records the digest of the rows it has consumed, so a resume on other
data is refused. A dataset's digest is the sum of its rows' digests (mod 2⁶²): the same whatever the order of
the rows or how they were split over processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

DIGEST_BITS = 62
DIGEST_MODULUS = 1 << DIGEST_BITS


def row_digest(row: dict[str, Any], example_id: Any, columns: Sequence[str]) -> int:
    """The digest of one row: its id and the values of `columns` (images by their pixels)."""
    digest = hashlib.blake2b(repr(example_id).encode(), digest_size=8)
    for column in columns:
        digest.update(column.encode())
        digest.update(_value_bytes(row[column]))
    return int.from_bytes(digest.digest(), "little") % DIGEST_MODULUS


def combine(digests: Iterable[int]) -> int:
    """The digest of a set of rows: the sum of theirs, mod 2⁶²."""
    return sum(digests) % DIGEST_MODULUS


def describe(count: int, digest: int) -> str:
    """A dataset's digest as config.json records it: the number of rows and the combined digest."""
    return f"{count}:{digest:016x}"


def check_rows(
    rows: Sequence[dict[str, Any]], ids: Sequence[Any], expected: Sequence[int], columns: Sequence[str]
) -> None:
    """Refuse rows whose digests are not the recorded ones, naming the first id that differs."""
    for row, example_id, recorded in zip(rows, ids, expected, strict=True):
        if row_digest(row, example_id, columns) != recorded:
            raise ValueError(
                f"The dataset's row with id {example_id!r} is not the row that was indexed (its "
                f"{', '.join(columns)} differ): this is another dataset, or another version of it, with the same "
                "ids. Use the dataset the index was built from."
            )


def _value_bytes(value: Any) -> bytes:
    if isinstance(value, PIL.Image.Image):
        return f"{value.mode}{value.size}".encode() + value.tobytes()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, list):
        return repr(np.asarray(value).tolist()).encode()
    return repr(value).encode()
