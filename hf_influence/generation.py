"""Generating query images with a pipeline's own `__call__`, and choosing the sampler it runs with.

The images a person is shown come from the pipeline's own sampling, seeded, with the same conditions
as the query that is then attributed (`QueryConditions`). Another sampler (DDIM, good in few steps) is a
new pipeline object sharing the components: the caller's pipeline, whose scheduler the task may share,
is never changed.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch

from .queries import QueryConditions

# "ddim": a DDIMScheduler from the pipeline's scheduler config; "pipeline": the pipeline's own scheduler.
SAMPLERS = ("ddim", "pipeline")


def with_sampler(pipeline: Any, sampler: str) -> Any:
    """`pipeline` sampling with `sampler` (one of SAMPLERS): the pipeline itself for "pipeline", else a
    new pipeline of the same class that shares every component except the scheduler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
    if sampler == "pipeline":
        return pipeline
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    return type(pipeline)(**{**pipeline.components, "scheduler": scheduler})


def generate_images(
    pipeline: Any,
    conditions: QueryConditions,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float | None = None,
) -> list[PIL.Image.Image]:
    """`conditions.count` images sampled by the pipeline's `__call__` from a CPU generator seeded by `seed`
    (the same images on any device), one per query condition."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    output = pipeline(
        generator=generator,
        num_inference_steps=num_inference_steps,
        output_type="pil",
        **conditions.pipeline_kwargs(guidance_scale),
    )
    return output.images
