"""Resumable runs: one way for a long job (a fit, an index build, a retraining) to record what it computes and
how far it got, so that a rerun after a crash continues it — and a rerun with other settings is refused.

A `RunRecord` is a JSON file beside the run's output holding the run's `identity` (its settings, the model's
fingerprint, the dataset's identity, the number of processes) and its `progress`. It is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import atomic_write_text
from .serialization import to_json


class RunRecord:
    """The record of one resumable run at `path`, for a run whose settings are `identity` (JSON values)."""

    def __init__(self, path: Path, identity: dict[str, Any], what: str) -> None:
        self.path = path
        self.identity = to_json(identity)
        self.what = what

    def exists(self) -> bool:
        return self.path.is_file()

    def check(self) -> dict[str, Any]:
        """The recorded progress, after checking the recorded run is this one (else a refusal naming what differs)."""
        try:
            saved = json.loads(self.path.read_text())
            recorded, progress = saved["identity"], saved["progress"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{self.path.parent} holds {self.what} made with other settings, or its record {self.path.name} is "
                f"damaged ({type(error).__name__}: {error}); choose another folder, or delete it to start over."
            ) from None
        if recorded != self.identity:
            keys = sorted(key for key in {*recorded, *self.identity} if recorded.get(key) != self.identity.get(key))
            raise ValueError(
                f"{self.path.parent} holds {self.what} made with other settings ({', '.join(keys)} differ): resume it "
                "with the same ones, or choose another folder."
            )
        return progress

    def write(self, progress: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"identity": self.identity, "progress": to_json(progress)}, indent=2))
