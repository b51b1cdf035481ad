"""`load_pipeline`: a saved pipeline and its task, reading the data as `train_ddpm` recorded it."""

from __future__ import annotations

import json

from conftest import tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler

from hf_influence.pipelines import load_pipeline
from hf_influence.provenance import ModelSource


def test_the_task_reads_the_data_as_training_did(tmp_path):
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    _, task = load_pipeline(tmp_path)
    assert (task.image_column, task.random_flip) == ("image", False)  # nothing recorded: the defaults

    (tmp_path / "training_config.json").write_text(json.dumps({"image_column": "picture", "random_flip": True}))
    pipeline, task = load_pipeline(tmp_path, device="cpu")
    assert (task.image_column, task.random_flip) == ("picture", True)
    assert task.denoiser is pipeline.unet and task.scheduler is pipeline.scheduler
    assert task.source == ModelSource(repo_id=str(tmp_path), revision=None)

    _, task = load_pipeline(tmp_path, image_column="img", random_flip=False)  # what is given wins
    assert (task.image_column, task.random_flip) == ("img", False)
