"""Pipeline families: what differs between diffusers' pipelines in how their denoiser is called and trained.

Most of a pipeline is shared machinery — the noise schedule (`noise_schedules.py`), the VAE (`latents.py`), the
captions as the pipeline's own `__call__` encodes them (`conditioning.Captions`). What is left is small, and is a
family's: the shape of the denoiser's sample, how latents are packed for it and its prediction unpacked, how its
timestep is passed, the timestep density it was trained with, the options of the recorded `__call__`, and extra
per-row conditions (SDXL's micro-conditioning). A new family is a subclass with those few methods and an entry
in `FAMILIES` (see `docs/adding_a_pipeline.md`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..timestep_densities import TimestepDensity


class Family:
    """The default: the denoiser takes the sample as it is (`config.in_channels × sample_size²`), the schedule's
    timestep, and trains with uniform timesteps."""

    name = "diffusers"
    pipelines: tuple[str, ...] = ()
    extra_conditioning: tuple[str, ...] = ()  # denoiser config entries (e.g. addition_embed_type) it builds

    def sample_shape(
        self, pipeline: Any, denoiser: nn.Module, resolution: int | None, downsampling: int
    ) -> tuple[int, int, int]:
        """`(C, H, W)` of the denoiser's clean sample (latents for a latent pipeline) before any packing, for
        training images of side `resolution` (default: the denoiser's `sample_size`) and a VAE that downsamples
        `downsampling` times (1 in pixel space)."""
        config = denoiser.config
        size = config.sample_size if resolution is None else _latent_side(resolution, downsampling)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(config.in_channels), int(height), int(width)

    def pack(self, sample: torch.Tensor) -> torch.Tensor:
        """The denoiser's input from noisy samples `(S, C, H, W)`."""
        return sample

    def unpack(self, prediction: torch.Tensor, sample_shape: tuple[int, int, int]) -> torch.Tensor:
        """The prediction `(S, C, H, W)` from the denoiser's output."""
        return prediction

    def model_timestep(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The `timestep` argument from the schedule's model timesteps (`NoiseSchedule.model_timesteps`)."""
        return timesteps

    def density(self, pipeline: Any, schedule: Any, sample_shape: tuple[int, int, int]) -> TimestepDensity:
        """The timestep density the family trains with."""
        return TimestepDensity("uniform")

    def call_options(self, pipeline: Any, image_shape: tuple[int, int, int], options: dict[str, Any]) -> dict:
        """Keyword arguments of the pipeline's `__call__` when its denoiser's inputs are recorded: the image
        size, no classifier-free guidance (one row per prompt), no resolution binning."""
        accepted = inspect.signature(pipeline.__call__).parameters
        call = {"height": image_shape[1], "width": image_shape[2], "guidance_scale": 1.0}
        if "use_resolution_binning" in accepted:
            call["use_resolution_binning"] = False
        return {name: value for name, value in call.items() if name in accepted}

    def captions(
        self, column: str, pipeline: Any, denoiser: nn.Module, image_shape: tuple[int, int, int], options: dict
    ) -> Any:
        """The `Conditioning` of a text-to-image pipeline of this family."""
        from ..conditioning import Captions

        _no_options(self, options)
        return Captions(column, pipeline, denoiser, self.call_options(pipeline, image_shape, options))


class StableDiffusion3(Family):
    """SD3 / SD3.5: trained with logit-normal timesteps (diffusers' SD3 scripts, `weighting_scheme="logit_normal"`)."""

    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)

    def density(self, pipeline: Any, schedule: Any, sample_shape: tuple[int, int, int]) -> TimestepDensity:
        return TimestepDensity("logit_normal")


class Flux(Family):
    """Flux.1: latents packed in 2 × 2 patches (`(S, HW/4, 4C)`, as `FluxPipeline._pack_latents`), the timestep as
    `σ` (the pipeline passes `t / 1000`), sigmas shifted by the pipeline's resolution-dependent dynamic shift, and
    a guidance embedding for dev-style models (`options["guidance_scale"]`, default the pipeline's)."""

    name = "flux"
    pipelines = ("FluxPipeline",)

    def sample_shape(
        self, pipeline: Any, denoiser: nn.Module, resolution: int | None, downsampling: int
    ) -> tuple[int, int, int]:
        channels = int(pipeline.vae.config.latent_channels)
        size = pipeline.default_sample_size if resolution is None else _latent_side(resolution, downsampling)
        if size % 2:
            raise ValueError(f"Flux packs latents in 2 × 2 patches: the latent side {size} must be even.")
        return channels, int(size), int(size)

    def pack(self, sample: torch.Tensor) -> torch.Tensor:
        rows, channels, height, width = sample.shape
        patches = sample.view(rows, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(rows, (height // 2) * (width // 2), channels * 4)

    def unpack(self, prediction: torch.Tensor, sample_shape: tuple[int, int, int]) -> torch.Tensor:
        channels, height, width = sample_shape
        rows = len(prediction)
        patches = prediction.view(rows, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(rows, channels, height, width)

    def model_timestep(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps / 1000

    def density(self, pipeline: Any, schedule: Any, sample_shape: tuple[int, int, int]) -> TimestepDensity:
        """σ shifted as the pipeline shifts it at this resolution: `μ = exp(m)`, `m` linear in the token count
        between the scheduler's (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
        config = pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return TimestepDensity("uniform")  # the training sigmas already hold the static shift
        tokens = sample_shape[1] * sample_shape[2] // 4
        low, high = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        slope = (config.get("max_shift", 1.15) - config.get("base_shift", 0.5)) / (high - low)
        mu = config.get("base_shift", 0.5) + slope * (tokens - low)
        return TimestepDensity("shifted", shift=math.exp(mu))

    def call_options(self, pipeline: Any, image_shape: tuple[int, int, int], options: dict[str, Any]) -> dict:
        call = super().call_options(pipeline, image_shape, options)
        default = inspect.signature(pipeline.__call__).parameters["guidance_scale"].default
        call["guidance_scale"] = options.get("guidance_scale", default)
        return call

    def captions(
        self, column: str, pipeline: Any, denoiser: nn.Module, image_shape: tuple[int, int, int], options: dict
    ) -> Any:
        from ..conditioning import Captions

        _no_options(self, options, allowed=("guidance_scale",))
        return Captions(column, pipeline, denoiser, self.call_options(pipeline, image_shape, options))


class StableDiffusionXL(Family):
    """SDXL: two text encoders, pooled `text_embeds` and micro-conditioning `time_ids` (original size, crop's top
    left, target size) — from `options["original_size_column"]` / `["crop_column"]` when the dataset has them,
    else `(H, W)`, `(0, 0)`, `(H, W)` (the image at the training resolution, uncropped: what diffusers' SDXL
    scripts compute for images of that size); the unconditional input is all zeros when the pipeline has
    `force_zeros_for_empty_prompt` (as it samples)."""

    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    extra_conditioning = ("addition_embed_type",)

    def captions(
        self, column: str, pipeline: Any, denoiser: nn.Module, image_shape: tuple[int, int, int], options: dict
    ) -> Any:
        from ..conditioning import SDXLCaptions

        _no_options(self, options, allowed=("original_size_column", "crop_column"))
        return SDXLCaptions(
            column,
            pipeline,
            denoiser,
            self.call_options(pipeline, image_shape, options),
            original_size_column=options.get("original_size_column"),
            crop_column=options.get("crop_column"),
        )


DEFAULT = Family()
FAMILIES: dict[str, Family] = {
    pipeline: family for family in (StableDiffusion3(), Flux(), StableDiffusionXL()) for pipeline in family.pipelines
}
# Text-to-image pipelines whose captions need nothing beyond the recorded call (`Family.captions`).
TEXT_PIPELINES = ("StableDiffusionPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline", "SanaPipeline")


def family_of(pipeline: Any) -> Family:
    """The family of a pipeline (by its class or the diffusers class it subclasses), else the default."""
    for cls in type(pipeline).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return DEFAULT


def is_text_pipeline(pipeline: Any) -> bool:
    names = {cls.__name__ for cls in type(pipeline).__mro__}
    return bool(names & (set(FAMILIES) | set(TEXT_PIPELINES)))


def _latent_side(resolution: int, downsampling: int) -> int:
    if resolution % downsampling:
        raise ValueError(f"resolution={resolution} must be a multiple of the VAE's downsampling {downsampling}.")
    return resolution // downsampling


def _no_options(family: Family, options: dict[str, Any], allowed: Sequence[str] = ()) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"The {family.name} family takes no conditioning options {unknown}; it takes: {accepted}.")
