"""Where factors and indices come from: the pipeline (repo id, commit, denoiser, fingerprint) and the
dataset (repo id, revision, split, id column) they were computed on.

Both are written into config.json and the Hub card, so a reader can tell what a repo belongs to, and
a loader can say exactly what differs when it refuses a mismatch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .task import DiffusionTask


@dataclass
class DatasetSource:
    """The training set a run read: `repo_id` (a Hub id or a local path), the resolved `revision`
    (a commit, when known), the `split` and the `id_column`."""

    repo_id: str | None = None
    revision: str | None = None
    split: str | None = None
    id_column: str = "id"

    @classmethod
    def describe(cls, dataset: Any, id_column: str) -> DatasetSource:
        """What `datasets` itself records about a dataset object (its name and split; no revision)."""
        info = getattr(dataset, "info", None)
        split = getattr(dataset, "split", None)
        return cls(getattr(info, "dataset_name", None), None, None if split is None else str(split), id_column)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_provenance(task: DiffusionTask) -> dict[str, Any]:
    """`{repo_id, revision, denoiser, fingerprint}` of the task's pipeline (repo/revision None when unknown)."""
    source = getattr(task, "source", None) or {}
    return {
        "repo_id": source.get("repo_id"),
        "revision": source.get("revision"),
        "denoiser": type(task.denoiser).__name__,
        "fingerprint": task.fingerprint(),
    }


def dataset_provenance(dataset: Any, id_column: str, source: DatasetSource | None = None) -> dict[str, Any]:
    """The given source (the CLI knows the repo and commit it loaded), else what the dataset records."""
    if source is None:
        source = DatasetSource.describe(dataset, id_column)
    return {**source.to_dict(), "id_column": id_column}


def describe_mismatch(recorded: dict[str, Any], actual: dict[str, Any]) -> str:
    """A sentence naming the fields of two model provenances that differ (for refusals)."""
    differences = [
        f"{key} {recorded.get(key)!r} vs {actual.get(key)!r}"
        for key in ("repo_id", "revision", "denoiser", "fingerprint")
        if recorded.get(key) is not None and actual.get(key) is not None and recorded.get(key) != actual.get(key)
    ]
    return "; ".join(differences)
