"""Where factors and indices come from: the pipeline (repo id, commit, denoiser, fingerprint) and the
dataset (repo id, revision, split, id column) they were computed on.

Both are written into config.json and the Hub card, so a reader can tell what a repo belongs to, and
a loader can say exactly what differs when it refuses a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelSource:
    """Where a pipeline was read from: a Hub `repo_id` (or a local path) and the commit it was read at."""

    repo_id: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class ModelProvenance:
    """The model a run was computed on: its source, the denoiser's class and a hash of its weights."""

    repo_id: str | None
    revision: str | None
    denoiser: str
    fingerprint: str

    def mismatch(self, other: ModelProvenance) -> str:
        """A sentence naming the fields that differ (where both sides know them), for refusals."""
        differences = [
            f"{item.name} {getattr(self, item.name)!r} vs {getattr(other, item.name)!r}"
            for item in fields(self)
            if getattr(self, item.name) is not None
            and getattr(other, item.name) is not None
            and getattr(self, item.name) != getattr(other, item.name)
        ]
        return "; ".join(differences)


@dataclass(frozen=True)
class DatasetSource:
    """The training set a run read: `repo_id` (a Hub id or a local path), the resolved `revision`
    (a commit, when known), the `split`, the `id_column`, and the `digest` of the rows that were read (their number
    and combined digest, `row_digests.py`; None until a run has read them)."""

    repo_id: str | None = None
    revision: str | None = None
    split: str | None = None
    id_column: str = "id"
    digest: str | None = None

    @classmethod
    def describe(cls, dataset: Any, id_column: str) -> DatasetSource:
        """What `datasets` itself records about a dataset object (its name and split; no revision)."""
        info = getattr(dataset, "info", None)
        split = getattr(dataset, "split", None)
        return cls(getattr(info, "dataset_name", None), None, None if split is None else str(split), id_column)


def dataset_provenance(
    dataset: Any, id_column: str, source: DatasetSource | None = None, digest: str | None = None
) -> DatasetSource:
    """The given source (the CLI knows the repo and commit it loaded), else what the dataset records, with the
    `digest` of the rows a run read."""
    if source is None:
        source = DatasetSource.describe(dataset, id_column)
    return DatasetSource(source.repo_id, source.revision, source.split, id_column, digest)
