"""Generation: queries sampled by the pipeline's own `__call__`, and another sampler without touching
the caller's pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

import hf_influence as hfi
from hf_influence.generation import generate_images, with_sampler
from hf_influence.queries import QueryConditions


def test_another_sampler_shares_the_components_and_leaves_the_callers_pipeline_alone():
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    scheduler = pipeline.scheduler
    ddim = with_sampler(pipeline, "ddim")
    assert pipeline.scheduler is scheduler
    assert isinstance(ddim.scheduler, DDIMScheduler) and ddim.scheduler.config.num_train_timesteps == 100
    assert ddim.unet is pipeline.unet and type(ddim) is DDPMPipeline
    assert with_sampler(pipeline, "pipeline") is pipeline
    with pytest.raises(ValueError, match="sampler must be one of"):
        with_sampler(pipeline, "euler")


def test_generated_images_are_the_pipelines_own_samples():
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    conditions = QueryConditions.for_task(hfi.DiffusionTask.from_pipeline(pipeline), 2)
    images = generate_images(pipeline, conditions, seed=3, num_inference_steps=2)
    generator = torch.Generator().manual_seed(3)
    expected = pipeline(batch_size=2, generator=generator, num_inference_steps=2, output_type="pil").images
    assert len(images) == 2
    for image, reference in zip(images, expected, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(reference))
