"""Conditioning: what a dataset column (class labels, captions) gives the denoiser besides `x_t` and `t`.

Each kind turns one column's values for a batch of examples into the denoiser's keyword inputs, one row per
example, once per batch: text encoders are frozen (no gradient, not attributed). `null()` is the
"unconditional" input that classifier-free-guidance training drops a draw's conditioning to: the empty
caption, or the class-embedding table's extra null class.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Inputs = dict[str, torch.Tensor]  # the denoiser's keyword inputs, one row per example


class Conditioning:
    """Base class: reads `column` and gives the denoiser keyword inputs."""

    column: str
    kind: str  # "labels" or "prompts": the keyword the query-side functions take

    def encode(self, values: Sequence[Any]) -> Inputs:
        raise NotImplementedError

    def null(self) -> Inputs:
        """The unconditional input, as rows of one."""
        raise NotImplementedError


class ClassLabels(Conditioning):
    """Class labels passed as `class_labels=` (DiT, class-conditional `UNet2DModel`).

    Args:
        column: the dataset column with the labels: class ids (ints, e.g. a `ClassLabel` feature) or class
            names, mapped through `names` (a DiT pipeline's `labels`, built from its `id2label`).
        num_classes: the denoiser's number of classes.
        names: class name → class id.
        null_class: the id the denoiser reserves for "no class" (DiT: `num_classes` when trained with label
            dropout), or None when it has none.
        device: where the labels go.
    """

    kind = "labels"

    def __init__(
        self,
        column: str,
        num_classes: int,
        names: dict[str, int] | None = None,
        null_class: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.column = column
        self.num_classes = num_classes
        self.names = dict(names or {})
        self.null_class = null_class
        self.device = device

    def class_id(self, value: Any) -> int:
        if isinstance(value, str):
            if value not in self.names:
                known = sorted(self.names)[:10]
                raise ValueError(
                    f"Unknown class name {value!r} in column {self.column!r}: the pipeline's id2label "
                    + (f"knows e.g. {known}." if known else "is empty; use class ids instead.")
                )
            return self.names[value]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"Class labels must be ints or class names; column {self.column!r} has {value!r}.")
        if not 0 <= int(value) < self.num_classes:
            raise ValueError(
                f"Class label must be a whole number between 0 and {self.num_classes - 1}, got {value!r} (the "
                f"denoiser has {self.num_classes} classes)."
            )
        return int(value)

    def encode(self, values: Sequence[Any]) -> Inputs:
        return {"class_labels": torch.tensor([self.class_id(value) for value in values], device=self.device)}

    def null(self) -> Inputs:
        if self.null_class is None:
            raise ValueError(
                "condition_dropout needs a null class, but the denoiser's class embedding has none "
                "(it was not trained with label dropout)."
            )
        return {"class_labels": torch.tensor([self.null_class], device=self.device)}


class Captions(Conditioning):
    """Captions encoded by the pipeline's own prompt encoder, exactly as at generation.

    Args:
        column: the dataset column with one caption (a string) per image.
        encode_prompts: captions → the denoiser's text inputs (`encoder_hidden_states`, and
            `pooled_projections` for SD3), run without gradient.
    """

    kind = "prompts"

    def __init__(self, column: str, encode_prompts: Callable[[list[str]], Inputs]) -> None:
        self.column = column
        self.encode_prompts = encode_prompts
        self._null: Inputs | None = None

    def encode(self, values: Sequence[Any]) -> Inputs:
        for value in values:
            if not isinstance(value, str):
                raise TypeError(f"Captions must be strings; column {self.column!r} has {value!r}.")
        with torch.no_grad():
            return self.encode_prompts(list(values))

    def null(self) -> Inputs:
        if self._null is None:
            self._null = self.encode([""])
        return self._null


# ---------------------------------------------------------------------------- from a pipeline


def _stable_diffusion_prompts(pipeline: Any) -> Callable[[list[str]], Inputs]:
    """SD 1.x/2.x: the CLIP text encoder's last hidden states (`encode_prompt`, no guidance)."""

    def encode(captions: list[str]) -> Inputs:
        embeddings, _ = pipeline.encode_prompt(captions, pipeline.unet.device, 1, False)
        return {"encoder_hidden_states": embeddings}

    return encode


def _stable_diffusion_3_prompts(pipeline: Any) -> Callable[[list[str]], Inputs]:
    """SD3: both CLIP encoders' states and the T5 states joined, and the pooled CLIP embeddings (`encode_prompt`)."""

    def encode(captions: list[str]) -> Inputs:
        embeddings, _, pooled, _ = pipeline.encode_prompt(
            prompt=captions,
            prompt_2=None,
            prompt_3=None,
            device=pipeline.transformer.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeddings, "pooled_projections": pooled}

    return encode


PROMPT_ENCODERS = {
    "StableDiffusionPipeline": _stable_diffusion_prompts,
    "StableDiffusion3Pipeline": _stable_diffusion_3_prompts,
}
TEXT_DENOISERS = ("UNet2DConditionModel", "SD3Transformer2DModel")
CLASS_DENOISERS = ("DiTTransformer2DModel", "Transformer2DModel")


def _label_embedding(denoiser: nn.Module) -> nn.Module | None:
    """The denoiser's diffusers `LabelEmbedding` (class table with an optional null class), if any."""
    from diffusers.models.embeddings import LabelEmbedding

    return next((module for module in denoiser.modules() if isinstance(module, LabelEmbedding)), None)


def _class_labels(pipeline: Any, denoiser: nn.Module, column: str) -> ClassLabels:
    kind = type(denoiser).__name__
    embedding = _label_embedding(denoiser)
    device = next(denoiser.parameters()).device
    names = dict(getattr(pipeline, "labels", None) or {})
    if embedding is not None:  # DiT: the null class is the extra row of a table trained with label dropout
        null_class = embedding.num_classes if embedding.dropout_prob > 0 else None
        return ClassLabels(column, embedding.num_classes, names, null_class, device)
    num_class_embeds = denoiser.config.get("num_class_embeds") if kind == "UNet2DModel" else None
    if num_class_embeds is not None and denoiser.config.get("class_embed_type") is None:
        return ClassLabels(column, int(num_class_embeds), names, None, device)
    raise ValueError(
        f"label_column={column!r} was given, but the denoiser {kind} takes no class labels "
        "(class-conditional denoisers: DiT, UNet2DModel with num_class_embeds)."
    )


def pipeline_conditioning(
    pipeline: Any, denoiser: nn.Module, label_column: str | None, caption_column: str | None
) -> Conditioning | None:
    """The conditioning a pipeline's denoiser takes, read from `label_column` or `caption_column`.

    Raises a clear error when a conditional denoiser gets no column, an unconditional one gets one, or the
    pipeline's text encoding is not one this library knows.
    """
    kind = type(denoiser).__name__
    pipeline_name = type(pipeline).__name__
    if label_column is not None and caption_column is not None:
        raise ValueError("Give label_column or caption_column, not both: no supported denoiser takes both.")
    if kind in TEXT_DENOISERS:
        if caption_column is None:
            raise ValueError(
                f"{pipeline_name} is text-conditional ({kind}): pass caption_column=... (the dataset column with "
                "each image's caption)."
            )
        if pipeline_name not in PROMPT_ENCODERS:
            encoder = getattr(pipeline, "text_encoder", None)
            raise TypeError(
                f"The text conditioning of {pipeline_name} (component 'text_encoder': {type(encoder).__name__}) is "
                f"not supported: captions can be encoded for {sorted(PROMPT_ENCODERS)}."
            )
        return Captions(caption_column, PROMPT_ENCODERS[pipeline_name](pipeline))
    if caption_column is not None:
        raise ValueError(f"caption_column={caption_column!r} was given, but the denoiser {kind} takes no text.")
    if kind in CLASS_DENOISERS:
        if label_column is None:
            raise ValueError(
                f"{pipeline_name} is class-conditional ({kind}): pass label_column=... (the dataset column with "
                "each image's class)."
            )
        return _class_labels(pipeline, denoiser, label_column)
    if label_column is not None:
        return _class_labels(pipeline, denoiser, label_column)
    if kind == "UNet2DModel" and denoiser.config.get("num_class_embeds") is not None:
        raise ValueError(f"The {kind} is class-conditional (num_class_embeds): pass label_column=....")
    return None
