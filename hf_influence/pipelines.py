"""Loading a diffusers pipeline together with its `DiffusionTask`, reading the data as training did.

A pipeline is a local folder or a Hub id (at a revision, resolved to the commit it was read at: the
factors' and the index's provenance). The task must see the training images as training saw them, or
the curvature and the gradients are those of another loss: the image column and whether images were
flipped at random come from the call when given, else from the `training_config.json` that
`train_ddpm` writes beside the pipeline, else the defaults ("image", no flips). The CLI, the Space
and the demo all load pipelines through `load_pipeline`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .hub import download_pipeline
from .task import DiffusionTask
from .training import TRAINING_CONFIG_NAME


def load_pipeline(
    pipeline: str | os.PathLike,
    revision: str | None = None,
    device: str | torch.device | None = None,
    image_column: str | None = None,
    random_flip: bool | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
    condition_dropout: float = 0.0,
    pipeline_kwargs: dict[str, Any] | None = None,
    resolution: int | None = None,
    timestep_density: str | None = None,
    loss_weighting: str = "none",
    conditioning_options: dict[str, Any] | None = None,
) -> tuple[Any, DiffusionTask]:
    """The pipeline (a folder or Hub id, at `revision`, moved to `device` when given) and its task.

    `image_column` and `random_flip` default to what training recorded (see the module); `label_column`
    (class-conditional pipelines), `caption_column` (text-to-image) and `condition_dropout` go to
    `DiffusionTask.from_pipeline`, with `resolution`, `timestep_density` (None: the family's training density),
    `loss_weighting` and the family's `conditioning_options`; `pipeline_kwargs` to
    `DiffusionPipeline.from_pretrained` (e.g. `text_encoder_3=None, tokenizer_3=None` to leave SD3's T5 out).
    """
    from diffusers import DiffusionPipeline

    folder, source = download_pipeline(pipeline, revision)
    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(f"{pipeline} is not a diffusers pipeline: it has no model_index.json.")
    loaded = DiffusionPipeline.from_pretrained(folder, **(pipeline_kwargs or {}))
    if device is not None:
        loaded = loaded.to(device)
    recorded = training_settings(folder)
    task = DiffusionTask.from_pipeline(
        loaded,
        image_column=recorded.get("image_column", "image") if image_column is None else image_column,
        random_flip=recorded.get("random_flip", False) if random_flip is None else random_flip,
        label_column=label_column,
        caption_column=caption_column,
        condition_dropout=condition_dropout,
        source=source,
        resolution=resolution,
        timestep_density=timestep_density,
        loss_weighting=loss_weighting,
        conditioning_options=conditioning_options,
    )
    return loaded, task


def training_settings(pipeline_folder: str | os.PathLike) -> dict[str, Any]:
    """The `TrainConfig` that `train_ddpm` recorded beside a saved pipeline, as a dict; empty for a
    pipeline trained some other way."""
    recorded = Path(pipeline_folder) / TRAINING_CONFIG_NAME
    return json.loads(recorded.read_text()) if recorded.is_file() else {}
