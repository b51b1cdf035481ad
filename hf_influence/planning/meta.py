"""The denoiser on the meta device: shapes without data, so planning needs no weights, no download beyond a
config.json and no memory.

`denoiser_on_meta` accepts everything `plan` does (a preset, a config dict, a folder or Hub id, a pipeline, a
model) and returns a diffusers model whose parameters are all on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Preset:
    """A shipped denoiser config (hf_influence/plan_configs/, written from the public model repos' config.json),
    optionally with a LoRA adapter of rank `lora_rank` on `lora_targets` (diffusers' training scripts' defaults)."""

    config_file: str
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


PRESETS = {
    "sd15": Preset("sd15_unet.json"),
    "sdxl": Preset("sdxl_unet.json"),
    "sdxl-lora": Preset("sdxl_unet.json", lora_rank=4),
    "sd3-medium": Preset("sd3_medium_transformer.json"),
    "sd35-medium-lora": Preset("sd35_medium_transformer.json", lora_rank=4),
    "sd35-large-lora": Preset("sd35_large_transformer.json", lora_rank=4),
    "flux1-dev-lora": Preset("flux1_dev_transformer.json", lora_rank=4),
    "pixart-sigma": Preset("pixart_sigma_transformer.json"),
}
_CONFIG_FILES = ("unet/config.json", "transformer/config.json", "config.json")


def preset_config(name: str) -> dict[str, Any]:
    """The diffusers config of a shipped preset's denoiser (see `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    text = resources.files("hf_influence").joinpath("plan_configs", PRESETS[name].config_file).read_text()
    return json.loads(text)


def _preset_on_meta(name: str) -> nn.Module:
    """A preset's denoiser on the meta device, with its LoRA adapter when it has one."""
    model = _from_config(preset_config(name))
    preset = PRESETS[name]
    if preset.lora_rank is not None:
        from peft import LoraConfig

        config = LoraConfig(r=preset.lora_rank, lora_alpha=preset.lora_rank, target_modules=list(preset.lora_targets))
        with torch.device("meta"):
            model.add_adapter(config)
    return model


def denoiser_on_meta(source: Any) -> nn.Module:
    """A denoiser with the shapes of `source` and no data: `source` is a preset name, a diffusers config
    dict, a pipeline folder, a Hub id (its config.json alone is downloaded), a pipeline, or a model (used as
    is if already on the meta device, else rebuilt there from its config with its PEFT adapters)."""
    if isinstance(source, nn.Module):
        if all(p.device.type == "meta" for p in source.parameters()):
            return source
        return _rebuild_on_meta(source)
    components = getattr(source, "components", None)
    if isinstance(components, dict):
        denoiser = components.get("unet") or components.get("transformer")
        if denoiser is None:
            raise TypeError(f"{type(source).__name__} has no `unet` or `transformer` component.")
        return denoiser_on_meta(denoiser)
    if isinstance(source, str) and source in PRESETS:
        return _preset_on_meta(source)
    if isinstance(source, (str, Path)):
        source = _read_denoiser_config(str(source))
    if isinstance(source, dict):
        return _from_config(source)
    raise TypeError(
        f"Cannot plan for a {type(source).__name__}: pass a preset name {sorted(PRESETS)}, a diffusers config "
        "dict, a pipeline folder or Hub id, a pipeline or a denoiser module."
    )


def _from_config(config: dict[str, Any]) -> nn.Module:
    """The diffusers model class named by the config's `_class_name`, built on the meta device."""
    import diffusers

    class_name = config.get("_class_name")
    model_class = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if model_class is None or not hasattr(model_class, "from_config"):
        raise ValueError(f"The config names no diffusers model class (_class_name={class_name!r}).")
    with torch.device("meta"):
        return model_class.from_config(config)


def _rebuild_on_meta(model: nn.Module) -> nn.Module:
    """A meta copy of a real model, with its PEFT adapters, so that a user's model is never run or moved."""
    if not hasattr(model, "config") or not hasattr(type(model), "from_config"):
        raise TypeError(
            f"{type(model).__name__} is not a diffusers model: build it on the meta device "
            "(`with torch.device('meta'): ...`) and pass that."
        )
    meta = _from_config({**dict(model.config), "_class_name": type(model).__name__})
    for adapter_name, adapter_config in getattr(model, "peft_config", {}).items():
        with torch.device("meta"):
            meta.add_adapter(adapter_config, adapter_name=adapter_name)
    return meta


def _read_denoiser_config(location: str) -> dict[str, Any]:
    """The denoiser's config.json from a pipeline or model folder, or from the Hub (that file alone)."""
    folder = Path(location)
    if folder.is_dir():
        for candidate in _CONFIG_FILES:
            if (folder / candidate).is_file():
                return json.loads((folder / candidate).read_text())
        raise FileNotFoundError(f"{folder} holds no {' or '.join(_CONFIG_FILES)}.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for candidate in _CONFIG_FILES:
        try:
            return json.loads(Path(hf_hub_download(location, candidate)).read_text())
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"The Hub repo {location!r} holds no {' or '.join(_CONFIG_FILES)}.")
