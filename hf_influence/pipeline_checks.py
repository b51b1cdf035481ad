"""Which diffusers pipelines a `DiffusionTask` can be built from: a refusal names the component and what it needs.

Only the denoiser is attributed; its inputs must be ones the task builds (`x_t`, the timestep, and class labels
or text states from `conditioning.py`). VAEs and text encoders are read, frozen; components that training never
uses (safety checkers, feature extractors) are ignored.
"""

from __future__ import annotations

from typing import Any

from torch import nn

SUPPORTED_DENOISERS = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "Transformer2DModel",
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "PixArtTransformer2DModel",
    "SanaTransformer2DModel",
)
# Pipeline components the task reads, or may ignore because training never uses them.
KNOWN_COMPONENTS = {
    "unet",
    "transformer",
    "scheduler",
    "vae",
    "vqvae",
    *(f"{kind}{suffix}" for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")),
    "safety_checker",
    "feature_extractor",
    "image_encoder",
}


def pipeline_denoiser(pipeline: Any) -> tuple[str, nn.Module, dict[str, Any]]:
    """The pipeline's denoiser component (`unet` or `transformer`), its name and the pipeline's components,
    after refusing any component this library cannot handle."""
    components = {name: value for name, value in getattr(pipeline, "components", {}).items() if value is not None}
    pipeline_name = type(pipeline).__name__
    name = "unet" if "unet" in components else "transformer"
    denoiser = components.get(name)
    if denoiser is None:
        raise TypeError(
            f"{pipeline_name} has no `unet` or `transformer` component; its components are {sorted(components)}."
        )
    from .families import family_of

    check_denoiser(denoiser, name, family_of(pipeline).extra_conditioning)
    unknown = sorted(set(components) - KNOWN_COMPONENTS)
    if unknown:
        described = ", ".join(f"{item!r} ({type(components[item]).__name__})" for item in unknown)
        raise TypeError(f"{pipeline_name} has components this library does not support: {described}.")
    return name, denoiser, components


def check_denoiser(denoiser: nn.Module, component: str, built: tuple[str, ...] = ()) -> None:
    """Refuse denoisers whose inputs this library does not build, naming the component and what it needs;
    `built` names the extra-conditioning config entries the pipeline's family builds (SDXL's time ids)."""
    name = type(denoiser).__name__
    kinds = {cls.__name__ for cls in type(denoiser).__mro__}
    if not kinds & set(SUPPORTED_DENOISERS):
        raise TypeError(
            f"The pipeline's {component!r} component ({name}) is not a supported denoiser: "
            f"supported are {', '.join(SUPPORTED_DENOISERS)}."
        )
    config = denoiser.config
    extras = {
        key: config.get(key)
        for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type")
        if config.get(key) is not None and key not in built
    }
    if extras:
        described = ", ".join(f"{key}={value!r}" for key, value in extras.items())
        raise TypeError(
            f"The pipeline's {component!r} component ({name}) takes extra conditioning ({described}) that this "
            "library does not build for this pipeline (SDXL's time ids are built for StableDiffusionXLPipeline)."
        )
    is_dit = config.get("norm_type") == "ada_norm_zero" and config.get("num_embeds_ada_norm") is not None
    if "Transformer2DModel" in kinds and "DiTTransformer2DModel" not in kinds and not is_dit:
        raise TypeError(
            f"The pipeline's {component!r} component ({name}, norm_type={config.get('norm_type')!r}) is not a "
            "class-conditional DiT; only DiT-style Transformer2DModels are supported."
        )
