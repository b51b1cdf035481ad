"""Retraining on subsets of the training set with `train_ddpm` (`method.md` §8.1, §8.2).

Each model lives in its own folder with a `retraining.json` saying which rows it was trained on; a
folder that already holds the saved pipeline is skipped, and an interrupted one resumes from its
last checkpoint, so a long evaluation can be stopped and continued, or split over processes
(`shard=(rank, world)`), each taking every `world`-th model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..files import atomic_write_text
from ..training import TrainConfig, train_ddpm

RETRAINING_FILE = "retraining.json"
PIPELINE_FILE = "model_index.json"  # written by DDPMPipeline.save_pretrained, last thing train_ddpm does


@dataclass(frozen=True)
class RetrainedModel:
    """A model trained on the rows `kept` (positions in the full training set) with training seed `seed`.

    `subset` is the LDS subset's index (None for other retrainings, e.g. without the top-k examples)."""

    path: Path
    kept: tuple[int, ...]
    seed: int
    subset: int | None = None

    def record(self) -> dict[str, Any]:
        return {"kept": list(self.kept), "seed": self.seed, "subset": self.subset}

    def is_trained(self) -> bool:
        """Whether the folder holds this model, finished; refuses a folder of another model."""
        recorded = self.path / RETRAINING_FILE
        if not recorded.is_file():
            return False
        if json.loads(recorded.read_text()) != self.record():
            raise FileExistsError(
                f"{self.path} holds a model trained on other rows or with another seed than asked: "
                "use another output_dir, or delete the folder to retrain it."
            )
        return (self.path / PIPELINE_FILE).is_file()


def _check_shard(shard: tuple[int, int]) -> None:
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}.")


def train_model(dataset: Any, config: TrainConfig, model: RetrainedModel) -> None:
    """Train `model` unless its folder already holds it; resume from its checkpoints if it was interrupted."""
    if model.is_trained():
        return
    path = model.path
    path.mkdir(parents=True, exist_ok=True)
    record = json.dumps(model.record())
    atomic_write_text(path / RETRAINING_FILE, record)
    resume = any((path / "checkpoints").glob("checkpoint-*"))
    kept = dataset.select(list(model.kept))
    train_ddpm(kept, replace(config, seed=model.seed), path, resume=resume, overwrite=True)  # its own folder
    shutil.rmtree(path / "checkpoints", ignore_errors=True)  # the saved pipeline is all later steps need


def train_models(
    dataset: Any, config: TrainConfig, models: Sequence[RetrainedModel], shard: tuple[int, int] = (0, 1)
) -> None:
    """Train this shard's unfinished `models` (every `world`-th one, starting at `rank`)."""
    _check_shard(shard)
    if not hasattr(dataset, "select"):
        raise TypeError(f"Retraining needs a map-style datasets.Dataset (with .select), got {type(dataset).__name__}.")
    rank, world = shard
    mine = [model for model in models[rank::world] if not model.is_trained()]
    for model in tqdm(mine, desc="Retraining", unit="model"):
        train_model(dataset, config, model)


def retrain_subsets(
    dataset: Any,
    config: TrainConfig,
    subsets: torch.Tensor,
    seeds: Sequence[int],
    output_dir: str | Path,
    shard: tuple[int, int] = (0, 1),
) -> list[RetrainedModel]:
    """Train one model per LDS subset (rows of the boolean `subsets` mask) and training seed into
    output_dir/subset-{k:04d}/seed-{s}; returns every model, trained or not by this shard.

    Every subset shares the seeds (the same initialisations), as in the paper's protocol.
    """
    if subsets.dim() != 2 or subsets.dtype != torch.bool or subsets.shape[1] != len(dataset):
        raise ValueError(
            f"subsets must be a (count, {len(dataset)}) boolean mask over the dataset's rows, "
            f"got {subsets.dtype} of shape {tuple(subsets.shape)}."
        )
    if not seeds:
        raise ValueError("At least one training seed is needed.")
    output_dir = Path(output_dir)
    models = [
        RetrainedModel(
            output_dir / f"subset-{subset:04d}" / f"seed-{seed}",
            tuple(torch.nonzero(mask).flatten().tolist()),
            seed,
            subset,
        )
        for subset, mask in enumerate(subsets)
        for seed in seeds
    ]
    train_models(dataset, config, models, shard)
    return models


def retrain_without(
    dataset: Any, config: TrainConfig, removed: Sequence[int], output_dir: str | Path, seed: int = 0
) -> RetrainedModel:
    """Train a model on every row except the positions `removed` (skipped if already trained)."""
    removed_set = set(int(position) for position in removed)
    if any(not 0 <= position < len(dataset) for position in removed_set):
        raise IndexError(f"removed holds positions outside the dataset's {len(dataset)} rows.")
    kept = tuple(position for position in range(len(dataset)) if position not in removed_set)
    model = RetrainedModel(Path(output_dir), kept, seed)
    train_models(dataset, config, [model])
    return model
