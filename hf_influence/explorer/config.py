"""`ExplorerConfig`: what the Influence Explorer loads and how it answers, as plain data; and reading it
from `HFI_<FIELD>` environment variables, as a Space sets them in its settings."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..attribution import DEFAULT_DAMPING
from ..deprecation import renamed_fields
from ..generation import SAMPLERS
from ..measurements import MEASUREMENTS
from ..validation import check_choice, check_float, check_int

ENVIRONMENT_PREFIX = "HFI_"
ARTIFACTS = ("pipeline", "factors", "index", "dataset")
# HFI_ variables read elsewhere: the CLI's tracebacks, the Space's demo cache.
OTHER_VARIABLES = ("DEBUG", "DEMO_CACHE")


@renamed_fields(num_query_draws="draws_per_query")
@dataclass
class ExplorerConfig:
    """What the explorer loads and how it answers.

    Attributes:
        pipeline: the diffusers pipeline that generates and is attributed: a local folder or Hub id.
        factors: its fitted factors (`InfluenceFactors`): a local folder or Hub id.
        index: its gradient index (`GradientIndex`) over the training set: a local folder or Hub id.
        dataset: the indexed training set: a Hub id, local folder, parquet file or save_to_disk folder.
        split: the dataset split that was indexed.
        image_column: dataset column with the images (None: what train_ddpm recorded beside the
            pipeline, else "image").
        label_column: dataset column shown in the captions (class names for a ClassLabel), if present;
            a class-conditional pipeline's classes.
        caption_column: text column shown in the captions, if present; a text-to-image pipeline's prompts.
        conditioning: None for an unconditional pipeline, "labels" for a class-conditional one (DiT:
            label_column holds each training image's class) or "prompts" for text-to-image (Stable
            Diffusion: caption_column holds each caption).
        id_column: dataset column with the ids the index was built with.
        top_k: proponents and opponents shown by default.
        max_top_k: the largest top_k a request may ask for.
        measurement: default measurement ("loss", "simplified_elbo" or "square_norm").
        damping: default damping λ added to the curvature's eigenvalues.
        draws_per_query: (t, ε) draws of the query's measurement (None: the index's draws per example).
        query_seed: seeds the query draws, so one image always gets the same scores.
        sampler: "ddim" (DDIM from the pipeline's scheduler config, good in few steps) or "pipeline"
            (the pipeline's own scheduler).
        num_inference_steps: default sampling steps.
        guidance_scale: classifier-free guidance scale given to a conditional pipeline (None: the
            pipeline's default).
        max_inference_steps: the most sampling steps a request may ask for.
        max_upload_bytes: uploads larger than this are refused.
        max_upload_side: uploads with a side longer than this (in pixels) are refused.
        display_size: images are shown scaled up (nearest neighbour) to at least this side, in pixels.
        concurrency_limit: requests worked on at once; the others wait in the queue.
        title: the page title.
    """

    pipeline: str
    factors: str
    index: str
    dataset: str
    split: str = "train"
    image_column: str | None = None
    label_column: str = "label"
    caption_column: str = "caption"
    conditioning: str | None = None
    id_column: str = "id"
    top_k: int = 8
    max_top_k: int = 32
    measurement: str = "loss"
    damping: float = DEFAULT_DAMPING
    draws_per_query: int | None = None
    query_seed: int = 0
    sampler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    max_inference_steps: int = 1000
    max_upload_bytes: int = 10_000_000
    max_upload_side: int = 4096
    display_size: int = 128
    concurrency_limit: int = 1
    title: str = "Influence Explorer"

    def __post_init__(self) -> None:
        check_choice("ExplorerConfig.measurement", self.measurement, sorted(MEASUREMENTS))
        check_choice("ExplorerConfig.conditioning", self.conditioning, (None, "labels", "prompts"))
        check_choice("ExplorerConfig.sampler", self.sampler, SAMPLERS)
        for name in ("max_top_k", "max_inference_steps", "max_upload_bytes", "max_upload_side", "display_size"):
            setattr(self, name, check_int(f"ExplorerConfig.{name}", getattr(self, name), minimum=1))
        self.concurrency_limit = check_int("ExplorerConfig.concurrency_limit", self.concurrency_limit, minimum=1)
        self.top_k = check_int("ExplorerConfig.top_k", self.top_k, minimum=1, maximum=self.max_top_k)
        self.num_inference_steps = check_int(
            "ExplorerConfig.num_inference_steps", self.num_inference_steps, minimum=1, maximum=self.max_inference_steps
        )
        self.query_seed = check_int("ExplorerConfig.query_seed", self.query_seed)
        if self.draws_per_query is not None:
            self.draws_per_query = check_int("ExplorerConfig.draws_per_query", self.draws_per_query, minimum=1)
        self.damping = check_float("ExplorerConfig.damping", self.damping, minimum=0)
        if self.guidance_scale is not None:
            self.guidance_scale = check_float("ExplorerConfig.guidance_scale", self.guidance_scale, minimum=0)

    def condition_columns(self) -> dict[str, str]:
        """The `load_pipeline` column argument of the task's conditioning: the label or the caption column."""
        return {
            None: {},
            "labels": {"label_column": self.label_column},
            "prompts": {"caption_column": self.caption_column},
        }[self.conditioning]


def config_from_environment(
    environ: Mapping[str, str] | None = None, prefix: str = ENVIRONMENT_PREFIX
) -> ExplorerConfig | None:
    """An ExplorerConfig from `HFI_<FIELD>` variables (`HFI_PIPELINE`, `HFI_TOP_K`, ...), as a Space sets
    them in its settings; None when none of the four artifacts is given."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(ExplorerConfig)
    names = {config_field.name: config_field.name for config_field in dataclasses.fields(ExplorerConfig)}
    names |= ExplorerConfig.RENAMED_FIELDS  # the old variable names still work (the config warns)
    known = {prefix + variable.upper() for variable in names} | {prefix + name for name in OTHER_VARIABLES}
    unknown = sorted(variable for variable in environ if variable.startswith(prefix) and variable not in known)
    if unknown:
        raise ValueError(
            f"Unknown setting(s) {', '.join(unknown)}: the explorer reads {', '.join(sorted(known))} (a typo?)."
        )
    values: dict[str, Any] = {}
    for variable, name in names.items():
        raw = environ.get(prefix + variable.upper())
        if raw is None or raw == "":
            continue
        kind = next((arg for arg in typing.get_args(hints[name]) if arg is not type(None)), hints[name])
        try:
            values[variable] = kind(raw)
        except ValueError:
            raise ValueError(f"{prefix}{variable.upper()}={raw!r} is not a valid {kind.__name__}.") from None
    missing = [name for name in ARTIFACTS if name not in values]
    if len(missing) == len(ARTIFACTS):
        return None
    if missing:
        raise ValueError(
            f"Set all of {', '.join(prefix + name.upper() for name in ARTIFACTS)}; missing: "
            f"{', '.join(prefix + name.upper() for name in missing)}."
        )
    try:
        return ExplorerConfig(**values)
    except (TypeError, ValueError) as error:  # name the variable, not the field
        message = re.sub(r"ExplorerConfig\.(\w+)", lambda match: prefix + match.group(1).upper(), str(error))
        raise ValueError(message) from None
