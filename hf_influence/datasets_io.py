"""Open a training set from wherever it lives: a Hub id, a local folder (imagefolder, parquet, ...),
a parquet file, or a folder written by `Dataset.save_to_disk` (which `load_dataset` cannot read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .provenance import DatasetSource


def load_training_dataset(
    path_or_id: str, split: str = "train", streaming: bool = False, revision: str | None = None
) -> Any:
    """One split of a dataset, as a `datasets.Dataset` (or an `IterableDataset` with `streaming=True`);
    `revision` (a branch, tag or commit) applies to Hub datasets."""
    import datasets

    from .hub import check_local_or_repo_id

    check_local_or_repo_id(path_or_id, "dataset folder, parquet file or Hub dataset id")
    path = Path(path_or_id)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise KeyError(f"{path} has no split {split!r}; its splits are {sorted(saved)}.")
            saved = saved[split]
        return saved.to_iterable_dataset() if streaming else saved
    if path.is_file() and path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split=split, streaming=streaming)
    return datasets.load_dataset(path_or_id, split=split, streaming=streaming, revision=revision)


def resolve_dataset_source(
    path_or_id: str, split: str, revision: str | None = None, id_column: str = "id"
) -> DatasetSource:
    """Where a training set comes from, with a Hub dataset's revision resolved to its commit, so that
    factors and indices record exactly which data they were computed on (offline: the revision as given)."""
    from huggingface_hub import HfApi, constants

    if Path(path_or_id).exists() or constants.HF_HUB_OFFLINE:
        return DatasetSource(path_or_id, revision, split, id_column)
    commit = HfApi().dataset_info(path_or_id, revision=revision).sha
    return DatasetSource(path_or_id, commit, split, id_column)
