"""Fit checkpoints: each process's running sums (safetensors) and its position in the fit (a `RunRecord`).

A fit is two passes (covariances, then EK-FAC's correction); a checkpoint says which pass, how many of this
process's examples and draws it has done, holds that pass's running sums, and — in the correction pass — the
finished factors of the first. Resuming from it gives the uninterrupted result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .files import atomic_write
from .resume import RunRecord
from .tensor_files import read_safetensors
from .validation import check_int


@dataclass(frozen=True)
class PassTotals:
    """What a pass over the data read: draws, examples and the digest of their rows (`row_digests.py`)."""

    draws: int = 0
    examples: int = 0
    digest: int = 0


@dataclass
class PassState:
    """Where a fit stands: the pass, what this rank has read in it (`done`), the pass's running `sums`, and (for
    the correction pass) the totals of the covariance pass over all ranks (`fit`) and its `finished` factors."""

    stage: str
    done: PassTotals = field(default_factory=PassTotals)
    fit: PassTotals = field(default_factory=PassTotals)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    finished: dict[str, torch.Tensor] = field(default_factory=dict)


class FitCheckpoint:
    """One rank's checkpoint of a fit in `directory`, every `every` batches.

    `identity` is what must be the same to resume: the FactorConfig, the model's fingerprint, the dataset's
    identity and the number of processes."""

    def __init__(self, directory: Path, rank: int, identity: dict[str, Any], every: int) -> None:
        self.directory = directory
        self.every = check_int("checkpoint_every", every, minimum=1)
        self.prefix = f"rank-{rank:03d}"
        self.record = RunRecord(directory / f"{self.prefix}.json", identity, "a checkpoint of a fit")

    def load(self, resume: bool) -> PassState | None:
        """The saved state, or None when there is none; refuses a checkpoint of another fit, or any checkpoint
        without `resume`."""
        if not self.record.exists():
            return None
        if not resume:
            raise FileExistsError(
                f"{self.directory} holds a checkpoint of an earlier fit: pass resume=True (--resume) to continue it, "
                "or choose another checkpoint_dir."
            )
        progress = self.record.check()
        try:
            position = {"stage": progress["stage"], **{key: PassTotals(**progress[key]) for key in ("done", "fit")}}
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"The checkpoint in {self.directory} was written by another version of hf_influence ({error}); "
                "delete it to fit again."
            ) from None
        tensors = read_safetensors(self.directory / progress["tensors"])
        parts = {
            part: {key.partition("/")[2]: value for key, value in tensors.items() if key.startswith(f"{part}/")}
            for part in ("sums", "finished")
        }
        return PassState(**position, **parts)

    def save(self, state: PassState) -> None:
        """Write the tensors to a new file, then the position naming it, then drop the older file: a crash at
        any point leaves a position and the tensors it names."""
        previous = self.record.check()["tensors"] if self.record.exists() else None
        name = f"{self.prefix}-{state.stage}-{state.done.examples:012d}.safetensors"
        content = {
            f"{part}/{key}": value.detach().cpu().contiguous()
            for part in ("sums", "finished")
            for key, value in getattr(state, part).items()
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.directory / name, lambda temp: save_file(content, temp))
        self.record.write({"stage": state.stage, "done": state.done, "fit": state.fit, "tensors": name})
        if previous is not None and previous != name:
            (self.directory / previous).unlink(missing_ok=True)
