"""Meta inputs for one forward pass of a denoiser, per diffusers class.

Each class's forward takes other keyword arguments (text states, SDXL's added conditions, SD3's pooled
projections, class labels), so the planner keeps one small function per class in `INPUTS_BY_CLASS`. To plan a
new denoiser class, register one more:

    @register_inputs("MyTransformer2DModel")
    def _my_transformer(config, batch, size):
        return {"hidden_states": ..., "timestep": ...}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# (model.config, batch, sample size) -> forward keyword arguments; called under torch.device("meta").
InputsFunction = Callable[[Any, int, tuple[int, ...]], dict[str, Any]]

INPUTS_BY_CLASS: dict[str, InputsFunction] = {}
# Text tokens each class attends to: CLIP; CLIP + T5 (SD3); T5 (Flux, PixArt); Gemma (Sana): the pipelines' defaults.
TEXT_TOKENS = {
    "UNet2DConditionModel": 77,
    "SD3Transformer2DModel": 333,
    "FluxTransformer2DModel": 512,
    "PixArtTransformer2DModel": 300,
    "SanaTransformer2DModel": 300,
}
FLUX_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024-pixel images


def meta_inputs(model: nn.Module, batch: int, resolution: int | None) -> dict[str, Any]:
    """Meta inputs for one forward pass of a diffusers denoiser: the noisy sample, the timestep and the
    conditioning its class needs (text states, SDXL's added conditions, SD3's pooled projections)."""
    name = type(model).__name__
    if name not in INPUTS_BY_CLASS:
        raise NotImplementedError(f"No example inputs are known for {name}: pass inputs=... to plan().")
    size = resolution or model.config.get("sample_size", FLUX_SAMPLE_SIZE)
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.device("meta"):
        return INPUTS_BY_CLASS[name](model.config, batch, size)


def register_inputs(class_name: str) -> Callable[[InputsFunction], InputsFunction]:
    """Register the decorated function as the inputs of `class_name` (the diffusers class's `__name__`)."""

    def register(function: InputsFunction) -> InputsFunction:
        INPUTS_BY_CLASS[class_name] = function
        return function

    return register


def _noisy_sample(config: Any, batch: int, size: tuple[int, ...], key: str = "sample") -> dict[str, Any]:
    """What every denoiser takes: the noisy sample (under `key`, requiring a gradient) and the timestep."""
    return {
        key: torch.zeros(batch, config.in_channels, *size, requires_grad=True),
        "timestep": torch.zeros(batch, dtype=torch.long),
    }


@register_inputs("UNet2DModel")
def _unet(config: Any, batch: int, size: tuple[int, ...]) -> dict[str, Any]:
    return _noisy_sample(config, batch, size)


@register_inputs("UNet2DConditionModel")
def _unet_condition(config: Any, batch: int, size: tuple[int, ...]) -> dict[str, Any]:
    """SD-1.5 / SDXL: CLIP text states; SDXL's pooled text and six time ids; class labels if embedded."""
    inputs = _noisy_sample(config, batch, size)
    tokens = TEXT_TOKENS["UNet2DConditionModel"]
    inputs["encoder_hidden_states"] = torch.zeros(batch, tokens, config.cross_attention_dim)
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, text), "time_ids": torch.zeros(batch, 6)}
    if config.class_embed_type is not None or config.num_class_embeds is not None:
        inputs["class_labels"] = torch.zeros(batch, dtype=torch.long)
    return inputs


@register_inputs("SD3Transformer2DModel")
def _sd3_transformer(config: Any, batch: int, size: tuple[int, ...]) -> dict[str, Any]:
    """SD3: joint text states (CLIP + T5 tokens) and pooled projections."""
    inputs = _noisy_sample(config, batch, size, key="hidden_states")
    tokens = TEXT_TOKENS["SD3Transformer2DModel"]
    inputs["encoder_hidden_states"] = torch.zeros(batch, tokens, config.joint_attention_dim)
    inputs["pooled_projections"] = torch.zeros(batch, config.pooled_projection_dim)
    return inputs


@register_inputs("DiTTransformer2DModel")
def _dit_transformer(config: Any, batch: int, size: tuple[int, ...]) -> dict[str, Any]:
    """DiT: class-conditional."""
    inputs = _noisy_sample(config, batch, size, key="hidden_states")
    inputs["class_labels"] = torch.zeros(batch, dtype=torch.long)
    return inputs


@register_inputs("FluxTransformer2DModel")
def _flux_transformer(config: Any, batch: int, size: tuple[int, ...]) -> dict[str, Any]:
    """Flux: 2 × 2-packed latent tokens, T5 states, pooled CLIP, position ids and (dev) a guidance value."""
    tokens = (size[0] // 2) * (size[1] // 2)
    text = TEXT_TOKENS["FluxTransformer2DModel"]
    inputs = {
        "hidden_states": torch.zeros(batch, tokens, config.in_channels, requires_grad=True),
        "timestep": torch.zeros(batch),
        "encoder_hidden_states": torch.zeros(batch, text, config.joint_attention_dim),
        "pooled_projections": torch.zeros(batch, config.pooled_projection_dim),
        "txt_ids": torch.zeros(text, 3),
        "img_ids": torch.zeros(tokens, 3),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.zeros(batch)
    return inputs


@register_inputs("PixArtTransformer2DModel")
def _pixart_transformer(config: Any, batch: int, size: tuple[int, ...]) -> dict[str, Any]:
    """PixArt-α/Σ: T5 states; the resolution and aspect ratio for models with additional conditions."""
    inputs = _noisy_sample(config, batch, size, key="hidden_states")
    inputs["encoder_hidden_states"] = torch.zeros(
        batch, TEXT_TOKENS["PixArtTransformer2DModel"], config.caption_channels
    )
    additional = config.use_additional_conditions
    if additional is None:
        additional = config.sample_size == 128
    inputs["added_cond_kwargs"] = (
        {"resolution": torch.zeros(batch, 2), "aspect_ratio": torch.zeros(batch, 1)}
        if additional
        else {"resolution": None, "aspect_ratio": None}
    )
    return inputs


@register_inputs("SanaTransformer2DModel")
def _sana_transformer(config: Any, batch: int, size: tuple[int, ...]) -> dict[str, Any]:
    """Sana: Gemma states."""
    inputs = _noisy_sample(config, batch, size, key="hidden_states")
    inputs["encoder_hidden_states"] = torch.zeros(batch, TEXT_TOKENS["SanaTransformer2DModel"], config.caption_channels)
    return inputs
