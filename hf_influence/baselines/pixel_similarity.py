"""Pixel-space similarity: the weakest baseline, a check that a method sees more than raw resemblance."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import dataset_length
from ..task import DiffusionTask


def _unit_rows(images: torch.Tensor) -> torch.Tensor:
    flat = images.flatten(1).to(torch.float64)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def pixel_similarity_scores(
    task: DiffusionTask, queries: Any, train_dataset: Iterable[dict[str, Any]], batch_size: int = 256
) -> torch.Tensor:
    """`[Q, N]` cosine similarities between each query and each training image, both as the task
    preprocesses them (pixels in [-1, 1], flattened), columns in the dataset's order. A similar image
    counts as a proponent: a positive score, the sign of the other methods' proponents."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    samples = _unit_rows(task.preprocess(queries))
    rows = iter(train_dataset)
    length = dataset_length(train_dataset)
    columns = []
    with tqdm(total=math.ceil(length / batch_size) if length else None, desc="Pixel similarity") as progress:
        while chunk := list(itertools.islice(rows, batch_size)):
            if task.image_column not in chunk[0]:
                raise KeyError(f"The dataset has no column {task.image_column!r} (its columns are {sorted(chunk[0])}).")
            columns.append(samples @ _unit_rows(task.preprocess([row[task.image_column] for row in chunk])).T)
            progress.update()
    if not columns:
        raise ValueError("The dataset is empty: there are no training examples to compare with.")
    return torch.cat(columns, dim=1).to(torch.float32)
