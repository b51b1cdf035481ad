"""Conditioning: what a dataset column (class labels, captions) gives the denoiser besides `x_t` and `t`.

Each kind turns one column's values for a batch of examples into the denoiser's keyword inputs, one row per
example, once per batch: text encoders are frozen (no gradient, not attributed). `null()` is the
"unconditional" input that classifier-free-guidance training drops a draw's conditioning to: the empty
caption, or the class-embedding table's extra null class.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

Inputs = dict[str, torch.Tensor]  # the denoiser's keyword inputs, one row per example


class Conditioning:
    """Base class: reads `column` (and any further `columns`) and gives the denoiser keyword inputs."""

    column: str
    kind: str  # "labels" or "prompts": the keyword the query-side functions take

    @property
    def columns(self) -> tuple[str, ...]:
        """Every dataset column a training row's condition is read from (the first is `column`)."""
        return (self.column,)

    def values(self, rows: Sequence[dict[str, Any]]) -> list[Any]:
        """Each training row's condition, as `encode` takes it."""
        return [row[self.column] for row in rows]

    def encode(self, values: Sequence[Any]) -> Inputs:
        raise NotImplementedError

    def null(self) -> Inputs:
        """The unconditional input, as rows of one."""
        raise NotImplementedError

    def call_inputs(self, inputs: Inputs) -> dict[str, Any]:
        """The keyword arguments of the denoiser's call from per-draw `inputs` (as `encode` gave them, rows
        repeated per draw)."""
        return dict(inputs)


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
    """Captions given to the denoiser exactly as the pipeline's own `__call__` gives them (`families.recording`):
    every text encoder, pooled embedding, attention mask and extra input the pipeline builds, for any
    text-to-image family.

    The denoiser's keyword arguments of a call recorded with two prompts say which inputs belong to each prompt
    (a first dimension of 2: the per-example inputs, returned by `encode`) and which are the same for every call
    (position ids, `return_dict`: kept as `static`). Nested arguments (SDXL's `added_cond_kwargs`) are flattened
    as `"outer/inner"` and nested again for the call.

    Args:
        column: the dataset column with one caption (a string) per image.
        pipeline: the text-to-image pipeline (a copy with its own scheduler records the calls).
        denoiser: its denoiser component.
        call_options: further keyword arguments of the pipeline's `__call__` for the recording (image size,
            guidance, ...), from the pipeline's family.
    """

    kind = "prompts"

    def __init__(self, column: str, pipeline: Any, denoiser: nn.Module, call_options: dict[str, Any]) -> None:
        from .families.recording import recording_copy

        self.column = column
        self.denoiser = denoiser
        self.recorder = recording_copy(pipeline)
        self.call_options = dict(call_options)
        self._null: Inputs | None = None
        layout = self._record(["a", "b"])
        self.batched = sorted(name for name, value in layout.items() if _batched(value, 2))
        self.static = {name: value for name, value in layout.items() if name not in self.batched}

    def encode(self, values: Sequence[Any]) -> Inputs:
        for value in values:
            if not isinstance(value, str):
                raise TypeError(f"Captions must be strings; column {self.column!r} has {value!r}.")
        recorded = self._record(list(values))
        return {name: recorded[name] for name in self.batched}

    def null(self) -> Inputs:
        if self._null is None:
            self._null = self.encode([""])
        return self._null

    def call_inputs(self, inputs: Inputs) -> dict[str, Any]:
        return _nested({**self.static, **inputs})

    def _record(self, prompts: list[str]) -> dict[str, Any]:
        """The flattened keyword arguments the pipeline gives its denoiser for `prompts`, without `x_t` and `t`."""
        from .families.recording import record_denoiser_call

        with torch.no_grad():
            call = record_denoiser_call(self.recorder, self.denoiser, prompt=prompts, **self.call_options)
        kwargs = dict(call.kwargs)
        for name in ("sample", "hidden_states", "timestep"):
            kwargs.pop(name, None)
        return _flattened(kwargs)


class SDXLCaptions(Captions):
    """SDXL's captions, with per-row micro-conditioning when the dataset has the columns: `time_ids` =
    (original height, width, crop top, left, target height, width). The unconditional input of caption dropout is
    zeros when the pipeline has `force_zeros_for_empty_prompt` (as it samples), and keeps each row's time ids."""

    TIME_IDS = "added_cond_kwargs/time_ids"
    ZEROED = ("encoder_hidden_states", "added_cond_kwargs/text_embeds")

    def __init__(
        self,
        column: str,
        pipeline: Any,
        denoiser: nn.Module,
        call_options: dict[str, Any],
        original_size_column: str | None = None,
        crop_column: str | None = None,
    ) -> None:
        super().__init__(column, pipeline, denoiser, call_options)
        self.original_size_column, self.crop_column = original_size_column, crop_column
        self.target_size = (call_options["height"], call_options["width"])
        self.force_zeros = bool(pipeline.config.get("force_zeros_for_empty_prompt", False))

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(name for name in (self.column, self.original_size_column, self.crop_column) if name)

    def values(self, rows: Sequence[dict[str, Any]]) -> list[Any]:
        if len(self.columns) == 1:
            return super().values(rows)
        return [tuple(row[name] for name in self.columns) for row in rows]

    def encode(self, values: Sequence[Any]) -> Inputs:
        captions = [value[0] if isinstance(value, tuple) else value for value in values]
        inputs = super().encode(captions)
        if any(isinstance(value, tuple) for value in values):
            inputs[self.TIME_IDS] = torch.stack([self._time_ids(value) for value in values]).to(inputs[self.TIME_IDS])
        return inputs

    def null(self) -> Inputs:
        recorded = super().null()
        if not self.force_zeros:
            return {name: value for name, value in recorded.items() if name != self.TIME_IDS}
        return {name: torch.zeros_like(recorded[name]) for name in self.ZEROED}

    def _time_ids(self, value: Any) -> torch.Tensor:
        """(original H, W, crop top, left, target H, W) of one row; the defaults where a column is not given."""
        given = dict(zip(self.columns[1:], value[1:], strict=True)) if isinstance(value, tuple) else {}
        original, crop = given.get(self.original_size_column, self.target_size), given.get(self.crop_column, (0, 0))
        parts = [*_pair(original, self.original_size_column), *_pair(crop, self.crop_column), *self.target_size]
        return torch.tensor(parts, dtype=torch.float32)


def _pair(value: Any, column: str | None) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ValueError(f"Column {column!r} must hold (height, width) or (top, left) pairs, got {value!r}.")
    return int(value[0]), int(value[1])


def _batched(value: Any, count: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count


def _flattened(kwargs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in kwargs.items():
        if isinstance(value, dict) and value and all(isinstance(key, str) for key in value):
            flat |= _flattened(value, f"{prefix}{name}/")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *outer, inner = name.split("/")
        target = nested
        for part in outer:
            target = target.setdefault(part, {})
        target[inner] = value
    return nested


# ---------------------------------------------------------------------------- from a pipeline


TEXT_DENOISERS = (
    "UNet2DConditionModel",
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "PixArtTransformer2DModel",
    "SanaTransformer2DModel",
)
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
    pipeline: Any,
    denoiser: nn.Module,
    label_column: str | None,
    caption_column: str | None,
    image_shape: tuple[int, int, int],
    options: dict[str, Any] | None = None,
) -> Conditioning | None:
    """The conditioning a pipeline's denoiser takes, read from `label_column` or `caption_column`; `options` are
    the family's conditioning options (`families.family`), `image_shape` the training images' `(C, H, W)`.

    Raises a clear error when a conditional denoiser gets no column, an unconditional one gets one, or the
    pipeline's text encoding is not one this library knows.
    """
    from .families import family_of, is_text_pipeline

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
        if not is_text_pipeline(pipeline):
            encoder = getattr(pipeline, "text_encoder", None)
            raise TypeError(
                f"The text conditioning of {pipeline_name} (component 'text_encoder': {type(encoder).__name__}) is "
                "not supported: it needs a family in hf_influence/families (docs/adding_a_pipeline.md)."
            )
        return family_of(pipeline).captions(caption_column, pipeline, denoiser, image_shape, dict(options or {}))
    if options:
        raise ValueError(f"Conditioning options {sorted(options)} were given, but {pipeline_name} takes no captions.")
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
