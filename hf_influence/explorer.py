"""The Influence Explorer: a Gradio app that generates an image with a diffusers pipeline (or takes an
uploaded one) and shows the training examples that made it: the top proponents and opponents with
their scores and dataset rows, and the distribution of the scores over the whole training set.

`InfluenceExplorer` is the engine (no Gradio in it): generation is the pipeline's own sampling and
scores are `Attributor.attribute`'s, so the app shows exactly what the Python API returns.
`build_app` lays it out as `gr.Blocks` and `serve` launches it with the queue on; both the Space
(`spaces/influence-explorer/app.py`) and `hf-influence demo` call them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch

from .attribution import DEFAULT_DAMPING, AttributionResult, Attributor
from .factors import InfluenceFactors
from .index import GradientIndex
from .measurements import MEASUREMENTS
from .task import DiffusionTask

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
SAMPLERS = ("ddim", "pipeline")
# Formats PIL can identify that make sense for a picture; anything else is refused by name.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
UPLOAD_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I")
HISTOGRAM_BINS = 40
# Fonts installed with every OS: the page must not fetch web fonts (a Space or an offline machine).
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif")
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")


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
        num_query_draws: (t, ε) draws of the query's measurement (None: the index's K).
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
    num_query_draws: int | None = None
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
        if self.measurement not in MEASUREMENTS:
            raise ValueError(
                f"ExplorerConfig.measurement must be one of {sorted(MEASUREMENTS)}, got {self.measurement!r}."
            )
        if self.conditioning not in (None, "labels", "prompts"):
            raise ValueError(
                f"ExplorerConfig.conditioning must be None, 'labels' or 'prompts', got {self.conditioning!r}."
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"ExplorerConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if not 1 <= self.top_k <= self.max_top_k:
            raise ValueError(f"top_k must be between 1 and max_top_k={self.max_top_k}, got {self.top_k}.")
        if not 1 <= self.num_inference_steps <= self.max_inference_steps:
            raise ValueError(
                f"num_inference_steps must be between 1 and max_inference_steps={self.max_inference_steps}, "
                f"got {self.num_inference_steps}."
            )
        if self.damping < 0 or min(self.max_upload_bytes, self.max_upload_side, self.concurrency_limit) < 1:
            raise ValueError("damping cannot be negative; upload limits and concurrency_limit must be positive.")


ENVIRONMENT_PREFIX = "HFI_"
ARTIFACTS = ("pipeline", "factors", "index", "dataset")


def config_from_environment(
    environ: Mapping[str, str] | None = None, prefix: str = ENVIRONMENT_PREFIX
) -> ExplorerConfig | None:
    """An ExplorerConfig from `HFI_<FIELD>` variables (`HFI_PIPELINE`, `HFI_TOP_K`, ...), as a Space sets
    them in its settings; None when none of the four artifacts is given."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(ExplorerConfig)
    values: dict[str, Any] = {}
    for name in (config_field.name for config_field in dataclasses.fields(ExplorerConfig)):
        raw = environ.get(prefix + name.upper())
        if raw is None or raw == "":
            continue
        kind = next((arg for arg in typing.get_args(hints[name]) if arg is not type(None)), hints[name])
        try:
            values[name] = kind(raw)
        except ValueError:
            raise ValueError(f"{prefix}{name.upper()}={raw!r} is not a valid {kind.__name__}.") from None
    missing = [name for name in ARTIFACTS if name not in values]
    if len(missing) == len(ARTIFACTS):
        return None
    if missing:
        raise ValueError(
            f"Set all of {', '.join(prefix + name.upper() for name in ARTIFACTS)}; missing: "
            f"{', '.join(prefix + name.upper() for name in missing)}."
        )
    return ExplorerConfig(**values)


@dataclass
class Explanation:
    """One query's attribution, ready to show: galleries of (image, "id · label · score") pairs."""

    query: PIL.Image.Image  # the image that was attributed, at the model's resolution
    result: AttributionResult
    proponents: list[tuple[PIL.Image.Image, str]]
    opponents: list[tuple[PIL.Image.Image, str]]
    records: dict[str, list[dict[str, Any]]]  # {"proponents"/"opponents": [{id, score, label?, caption?}]}
    histogram: dict[str, list[float]]  # bin centres and counts of all the query's scores
    seconds: float  # time spent in attribution (query gradient, preconditioning, scan, rows)


class InfluenceExplorer:
    """Generates images with a pipeline and attributes them to its training set through an index.

    Thread-safe: one request at a time holds the model (the attributor caches query gradients).
    """

    def __init__(
        self,
        pipeline: Any,
        attributor: Attributor,
        dataset: Any,
        config: ExplorerConfig,
    ) -> None:
        self.pipeline = pipeline
        self.attributor = attributor
        self.task: DiffusionTask = attributor.task
        self.dataset = dataset
        self.config = config
        self._lock = threading.Lock()
        if config.sampler == "ddim":
            from diffusers import DDIMScheduler

            pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        columns = getattr(dataset, "column_names", None) or []
        features = getattr(dataset, "features", None) or {}
        self.label_column = config.label_column if config.label_column in columns else None
        self.caption_column = config.caption_column if config.caption_column in columns else None
        self.label_names: list[str] | None = getattr(features.get(self.label_column), "names", None)

    @classmethod
    def from_config(cls, config: ExplorerConfig) -> InfluenceExplorer:
        """Load the pipeline, factors, index and dataset named by `config` (local paths or Hub ids) and
        check that they belong together (same model, the indexed dataset)."""
        from diffusers import DiffusionPipeline

        from .datasets_io import load_training_dataset
        from .hub import download_pipeline
        from .training import recorded_training_setting

        folder, source = download_pipeline(config.pipeline)
        pipeline = DiffusionPipeline.from_pretrained(folder)
        condition_columns = {
            None: {},
            "labels": {"label_column": config.label_column},
            "prompts": {"caption_column": config.caption_column},
        }[config.conditioning]
        image_column = recorded_training_setting(folder, "image_column", config.image_column, "image")
        task = DiffusionTask.from_pipeline(pipeline, image_column=image_column, **condition_columns)
        task.source = source
        factors = InfluenceFactors.from_pretrained(config.factors, task=task)
        index = GradientIndex.from_pretrained(config.index)
        dataset = load_training_dataset(config.dataset, config.split)
        index.check_dataset(dataset)
        return cls(pipeline, Attributor(task, factors, index, damping=config.damping), dataset, config)

    # ------------------------------------------------------------------ conditioning

    @property
    def conditioning(self) -> str | None:
        """ "labels" (class-conditional), "prompts" (text-to-image) or None (unconditional): the task's."""
        return None if self.task.conditioning is None else self.task.conditioning.kind

    def class_choices(self) -> list[tuple[str, int]]:
        """(name, class id) of each class of a class-conditional model: the pipeline's names (a DiT's
        id2label), else the dataset's ClassLabel names, else the ids; empty for other models."""
        if self.conditioning != "labels":
            return []
        names = getattr(self.task.conditioning, "names", None)
        if names:
            return sorted(names.items(), key=lambda item: item[1])
        if self.label_names:
            return [(name, position) for position, name in enumerate(self.label_names)]
        return [(str(label), label) for label in range(self.task.conditioning.num_classes)]

    def _condition_arguments(self, label: Any, prompt: str | None) -> tuple[dict, dict]:
        """(pipeline keyword arguments, `Attributor.attribute` keyword arguments) for a request's condition."""
        if self.conditioning is None:
            return {"batch_size": 1}, {}
        guidance = {} if self.config.guidance_scale is None else {"guidance_scale": self.config.guidance_scale}
        if self.conditioning == "labels":
            if label is None:
                raise ValueError("This model is class-conditional: choose a class label.")
            label = check_integer("Class label", label, 0, self.task.conditioning.num_classes - 1)
            return {"class_labels": [label], **guidance}, {"labels": [label]}
        if not prompt or not prompt.strip():
            raise ValueError("This model is text-conditional: write a prompt.")
        return {"prompt": [prompt], **guidance}, {"prompts": [prompt]}

    # ------------------------------------------------------------------ the two requests

    def generate(
        self, seed: Any, num_inference_steps: Any, label: int | None = None, prompt: str | None = None
    ) -> PIL.Image.Image:
        """Sample one image with the pipeline from `seed` (an integer in [0, 2**32 - 1])."""
        seed = check_integer("Seed", seed, 0, MAX_SEED)
        steps = check_integer("Number of steps", num_inference_steps, 1, self.config.max_inference_steps)
        pipeline_kwargs, _ = self._condition_arguments(label, prompt)
        with self._lock:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            output = self.pipeline(generator=generator, num_inference_steps=steps, output_type="pil", **pipeline_kwargs)
        return output.images[0]

    def explain(
        self,
        image: PIL.Image.Image,
        measurement: str | None = None,
        damping: Any = None,
        top_k: Any = None,
        label: int | None = None,
        prompt: str | None = None,
    ) -> Explanation:
        """Attribute `image` (at the model's resolution) to the indexed training set."""
        config = self.config
        measurement = measurement or config.measurement
        if measurement not in MEASUREMENTS:
            raise ValueError(f"Unknown measurement {measurement!r}; choose one of {sorted(MEASUREMENTS)}.")
        damping = config.damping if damping is None else check_damping(damping)
        top_k = config.top_k if top_k is None else check_integer("top-k", top_k, 1, config.max_top_k)
        _, attribute_kwargs = self._condition_arguments(label, prompt)
        start = time.perf_counter()
        with self._lock:
            result = self.attributor.attribute(
                [image],
                measurement=measurement,
                top_k=top_k,
                damping=damping,
                num_draws=config.num_query_draws,
                seed=config.query_seed,
                **attribute_kwargs,
            )
        galleries, records = {}, {}
        for which in ("proponents", "opponents"):
            rows = result.rows(self.dataset, 0, which, config.id_column)
            ids = (result.proponent_ids if which == "proponents" else result.opponent_ids)[0].tolist()
            scores = (result.proponent_scores if which == "proponents" else result.opponent_scores)[0].tolist()
            records[which] = [self._record(row, i, s) for row, i, s in zip(rows, ids, scores, strict=True)]
            galleries[which] = [
                (self.display(row[self.task.image_column]), self._caption(record))
                for row, record in zip(rows, records[which], strict=True)
            ]
        return Explanation(
            query=image,
            result=result,
            proponents=galleries["proponents"],
            opponents=galleries["opponents"],
            records=records,
            histogram=score_histogram(result.scores[0]),
            seconds=time.perf_counter() - start,
        )

    def load_upload(self, path: str | Path | None) -> PIL.Image.Image:
        """An uploaded file as an image for the model (see `load_upload_image`)."""
        return load_upload_image(
            path, self.task.resolution, self.task.channels, self.config.max_upload_bytes, self.config.max_upload_side
        )

    # ------------------------------------------------------------------ display

    def display(self, image: Any) -> PIL.Image.Image:
        """`image` scaled up by a whole factor (nearest neighbour), so that single pixels stay visible."""
        if not isinstance(image, PIL.Image.Image):
            image = PIL.Image.fromarray(np.asarray(image))
        factor = max(1, math.ceil(self.config.display_size / max(image.size)))
        return image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST)

    def _record(self, row: dict[str, Any], example_id: int, score: float) -> dict[str, Any]:
        record: dict[str, Any] = {"id": example_id, "score": score}
        if self.label_column is not None:
            label = row[self.label_column]
            record["label"] = self.label_names[label] if self.label_names and isinstance(label, int) else label
        if self.caption_column is not None:
            record["caption"] = row[self.caption_column]
        return record

    @staticmethod
    def _caption(record: dict[str, Any]) -> str:
        """ "id · label · score" (and the text caption, where the dataset has one)."""
        parts = [f"#{record['id']}"]
        parts += [str(record[key]) for key in ("label", "caption") if key in record]
        return " · ".join([*parts, f"{record['score']:+.3g}"])


# ---------------------------------------------------------------------------- validation


def check_integer(name: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high], or a ValueError that names the field and the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number between {low} and {high}, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    return int(number)


def check_damping(value: Any) -> float:
    try:
        damping = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Damping must be a number ≥ 0, got {value!r}.") from None
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"Damping must be a finite number ≥ 0, got {value!r}.")
    return damping


def load_upload_image(
    path: str | Path | None, resolution: tuple[int, int], channels: int, max_bytes: int, max_side: int
) -> PIL.Image.Image:
    """Open an uploaded file as a picture for the model, or raise a ValueError that says what is wrong.

    The file must be a picture PIL can read (PNG, JPEG, WebP, BMP, GIF, TIFF), at most `max_bytes`
    and `max_side` pixels a side (checked from the header, before decoding anything). It is then
    converted to the model's channels (as diffusers' training scripts convert images), centre-cropped
    to the model's aspect ratio and resized to its resolution: what is attributed is what is shown.
    """
    if path is None:
        raise ValueError("Upload an image first.")
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"The file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB.")
    try:
        image = PIL.Image.open(path)
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError) as error:
        raise ValueError(
            f"{path.name} is not a readable image ({type(error).__name__}); upload a PNG, JPEG or WebP picture."
        ) from None
    if image.format not in UPLOAD_FORMATS:
        raise ValueError(f"Images in {image.format} format are not accepted; use one of {', '.join(UPLOAD_FORMATS)}.")
    if max(image.size) > max_side or min(image.size) < 1:
        raise ValueError(
            f"The image is {image.width}×{image.height} pixels; the largest side accepted is {max_side} pixels."
        )
    if image.mode not in UPLOAD_MODES:
        raise ValueError(f"Images in pixel mode {image.mode!r} are not accepted; use greyscale or RGB(A) images.")
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise ValueError(f"{path.name} is damaged and cannot be decoded ({error}).") from None
    if image.mode in ("I;16", "I"):  # 16-bit greyscale → 8-bit
        image = PIL.Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    image = image.convert("RGBA" if image.mode in ("P", "PA", "LA") else image.mode).convert(
        "L" if channels == 1 else "RGB"
    )
    height, width = resolution
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    return image.resize((width, height), PIL.Image.BOX if scale > 1 else PIL.Image.BICUBIC)


def score_histogram(scores: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict[str, list[float]]:
    """Bin centres and counts of one query's scores over the whole indexed training set."""
    values = scores.detach().double().cpu()
    low, high = values.min().item(), values.max().item()
    if high == low:
        high = low + 1.0
    counts = torch.histc(values, bins=bins, min=low, max=high)
    width = (high - low) / bins
    return {"score": [low + (i + 0.5) * width for i in range(bins)], "examples": counts.tolist()}


# ---------------------------------------------------------------------------- the Gradio app


def build_app(explorer: InfluenceExplorer) -> gr.Blocks:
    """The Gradio Blocks of the explorer: a Generate tab, an upload tab, shared settings and the view.

    API endpoints (for `gradio_client`): `/generate` (seed, steps, label, prompt, measurement,
    damping, top_k) and `/attribute` (file, label, prompt, measurement, damping, top_k); both return
    the query image, the proponents' and opponents' galleries, the score histogram, a summary and
    the records as JSON.
    """
    import gradio as gr
    import pandas as pd

    config = explorer.config
    task = explorer.task
    conditioning = explorer.conditioning
    with gr.Blocks(title=config.title, analytics_enabled=False) as app:
        gr.Markdown(
            f"# {config.title}\n"
            "Which training examples made this image? Scores are influence functions with EK-FAC curvature "
            "(Mlodozeniec et al., ICLR 2025): **proponents** are the examples whose removal is predicted to "
            "raise the measurement the most (for the loss: to make the image less likely), **opponents** the "
            f"reverse. The model is a {task.channels}-channel {task.resolution[0]}×{task.resolution[1]} "
            f"`{type(explorer.pipeline).__name__}`; {len(explorer.attributor.index)} training examples are indexed."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                with gr.Tabs():
                    with gr.Tab("Generate"):
                        seed = gr.Number(label=f"Seed (0 to {MAX_SEED})", value=0, elem_id="seed")
                        steps = gr.Slider(
                            1,
                            config.max_inference_steps,
                            value=config.num_inference_steps,
                            step=1,
                            label=f"Sampling steps ({config.sampler})",
                        )
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Tab("Attribute your image"):
                        upload = gr.File(label="Image (PNG, JPEG, WebP…)", file_types=["image"], elem_id="upload")
                        attribute_button = gr.Button("Attribute", variant="primary", elem_id="attribute")
                # Shown for conditional pipelines only: the class or prompt to generate and attribute with.
                choices = explorer.class_choices()
                label = gr.Dropdown(
                    choices=choices,
                    value=choices[0][1] if choices else None,
                    label="Class label",
                    visible=conditioning == "labels",
                    elem_id="class-label",
                )
                prompt = gr.Textbox(label="Prompt", visible=conditioning == "prompts", elem_id="prompt")
                with gr.Accordion("Attribution settings", open=False):
                    measurement = gr.Radio(
                        sorted(MEASUREMENTS),
                        value=config.measurement,
                        label="Measurement",
                        info="loss: the training loss of the image; simplified_elbo: its ELBO bound; "
                        "square_norm: D-TRAK's squared output norm",
                    )
                    damping = gr.Number(value=config.damping, label="Damping λ", info="added to the eigenvalues")
                    top_k = gr.Slider(1, config.max_top_k, value=config.top_k, step=1, label="Examples shown (k)")
            with gr.Column(scale=2):
                with gr.Row():
                    query = gr.Image(label="Query", type="pil", format="png", height=260, interactive=False)
                    histogram = gr.BarPlot(
                        x="score",
                        y="examples",
                        label="Scores over the training set",
                        height=260,
                        x_title="influence score",
                        y_title="training examples",
                    )
                summary = gr.Markdown(label="Summary", elem_id="summary")
                proponents = gr.Gallery(
                    label="Top proponents (id · label · score)",
                    columns=4,
                    height="auto",
                    format="png",
                    object_fit="contain",
                    elem_id="proponents",
                )
                opponents = gr.Gallery(
                    label="Top opponents (id · label · score)",
                    columns=4,
                    height="auto",
                    format="png",
                    object_fit="contain",
                    elem_id="opponents",
                )
                with gr.Accordion("Scores and rows (JSON)", open=False):
                    details = gr.JSON(label="Attribution")
        settings = [measurement, damping, top_k]
        outputs = [query, proponents, opponents, histogram, summary, details]

        def show(explanation: Explanation, source: str) -> tuple:
            k = len(explanation.proponents)
            details_value = {
                "source": source,
                "num_examples": int(explanation.result.scores.shape[1]),
                "seconds": explanation.seconds,
                **explanation.records,
            }
            text = (
                f"**{source}** · {details_value['num_examples']} training examples scored in "
                f"{explanation.seconds:.2f} s · top {k} shown."
            )
            return (
                explorer.display(explanation.query),
                explanation.proponents,
                explanation.opponents,
                pd.DataFrame(explanation.histogram),
                text,
                details_value,
            )

        def on_generate(seed, steps, label, prompt, measurement, damping, top_k, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
            with user_errors():
                progress(0.0, desc="Sampling")
                image = explorer.generate(seed, steps, label, prompt)
                progress(0.5, desc="Attributing")
                explanation = explorer.explain(image, measurement, damping, top_k, label, prompt)
                return show(explanation, f"Generated, seed {int(seed)}, {int(steps)} steps")

        def on_attribute(file, label, prompt, measurement, damping, top_k, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
            with user_errors():
                progress(0.0, desc="Reading the image")
                image = explorer.load_upload(file)
                progress(0.2, desc="Attributing")
                explanation = explorer.explain(image, measurement, damping, top_k, label, prompt)
                return show(explanation, f"Uploaded {Path(file).name}")

        gr.on(
            [generate_button.click],
            on_generate,
            [seed, steps, label, prompt, *settings],
            outputs,
            api_name="generate",
            concurrency_id="model",
        )
        gr.on(
            [attribute_button.click],
            on_attribute,
            [upload, label, prompt, *settings],
            outputs,
            api_name="attribute",
            concurrency_id="model",
        )
    return app


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn any failure inside a request into a `gr.Error` with a readable message: the page shows it
    instead of a stack trace and the server goes on serving. Unexpected errors are logged in full."""
    import gradio as gr

    try:
        yield
    except gr.Error:
        raise
    except KeyError as error:
        raise gr.Error(str(error.args[0]) if error.args else repr(error)) from error
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from error
    except Exception as error:
        logger.exception("The request failed")
        raise gr.Error(
            f"Something went wrong ({type(error).__name__}: {error}). Try again or change the settings."
        ) from error


def theme() -> Any:
    """Gradio's default theme on system fonts, so the page fetches nothing from outside."""
    import gradio as gr

    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def serve(
    app: gr.Blocks,
    config: ExplorerConfig,
    server_name: str | None = None,
    server_port: int | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
) -> Any:
    """Launch `app` with the queue on (`config.concurrency_limit` requests at once) and uploads capped
    at `config.max_upload_bytes`. Returns what `Blocks.launch` returns (the app, its local URL, ...)."""
    app.queue(default_concurrency_limit=config.concurrency_limit)
    return app.launch(
        server_name=server_name,
        server_port=server_port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        max_file_size=config.max_upload_bytes,
        theme=theme(),
        footer_links=["api"],
    )
