"""`InfluenceExplorer`, the engine of the Influence Explorer (no Gradio in it): one request generates an
image with the pipeline's own sampling (or takes an uploaded one) and attributes it with
`Attributor.attribute`, so the app shows exactly what the Python API returns; `Explanation` is that
answer, ready to show.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..attribution import AttributionResult, Attributor
from ..datasets_io import load_training_dataset
from ..display import upscale
from ..factors import InfluenceFactors
from ..generation import generate_images, with_sampler
from ..index import GradientIndex
from ..measurements import MEASUREMENTS
from ..pipelines import load_pipeline
from ..queries import QueryConditions
from ..task import DiffusionTask
from ..validation import check_damping, check_integer
from .config import ExplorerConfig
from .uploads import load_upload_image

MAX_SEED = 2**32 - 1
HISTOGRAM_BINS = 40


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

    The caller's pipeline is left as it is: sampling runs on `sampling_pipeline`, which shares its
    components (with a DDIM scheduler for `config.sampler == "ddim"`). Thread-safe: one request at a
    time holds the model (the attributor caches query gradients).
    """

    def __init__(
        self,
        pipeline: Any,
        attributor: Attributor,
        dataset: Any,
        config: ExplorerConfig,
    ) -> None:
        self.pipeline = pipeline
        self.sampling_pipeline = with_sampler(pipeline, config.sampler)
        self.attributor = attributor
        self.task: DiffusionTask = attributor.task
        self.dataset = dataset
        self.config = config
        self._lock = threading.Lock()
        columns = getattr(dataset, "column_names", None) or []
        features = getattr(dataset, "features", None) or {}
        self.label_column = config.label_column if config.label_column in columns else None
        self.caption_column = config.caption_column if config.caption_column in columns else None
        self.label_names: list[str] | None = getattr(features.get(self.label_column), "names", None)

    @classmethod
    def from_config(cls, config: ExplorerConfig) -> InfluenceExplorer:
        """Load the pipeline, factors, index and dataset named by `config` (local paths or Hub ids) and
        check that they belong together (same model, the indexed dataset)."""
        pipeline, task = load_pipeline(config.pipeline, image_column=config.image_column, **config.condition_columns())
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

    def conditions(self, label: Any, prompt: str | None) -> QueryConditions:
        """A request's condition: the form's class label and prompt (an empty prompt box is no prompt)."""
        prompts = [prompt] if prompt and prompt.strip() else None
        labels = None if label is None else [label]
        return QueryConditions.for_task(self.task, 1, labels=labels, prompts=prompts, options={})  # a form's wording

    # ------------------------------------------------------------------ the two requests

    def generate(
        self, seed: Any, num_inference_steps: Any, label: int | None = None, prompt: str | None = None
    ) -> PIL.Image.Image:
        """Sample one image with the pipeline from `seed` (an integer in [0, 2**32 - 1])."""
        seed = check_integer("Seed", seed, 0, MAX_SEED)
        steps = check_integer("Number of steps", num_inference_steps, 1, self.config.max_inference_steps)
        conditions = self.conditions(label, prompt)
        with self._lock:
            (image,) = generate_images(self.sampling_pipeline, conditions, seed, steps, self.config.guidance_scale)
        return image

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
        conditions = self.conditions(label, prompt)
        start = time.perf_counter()
        with self._lock:
            result = self.attributor.attribute(
                [image],
                measurement=measurement,
                top_k=top_k,
                damping=damping,
                draws_per_query=config.draws_per_query,
                seed=config.query_seed,
                **conditions.attribute_kwargs(),
            )
        galleries, records = self._galleries(result)
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

    # ------------------------------------------------------------------ records

    def _galleries(self, result: AttributionResult) -> tuple[dict[str, list], dict[str, list]]:
        """The proponents' and opponents' (image, caption) galleries and their records, from the dataset rows."""
        galleries, records = {}, {}
        for which in ("proponents", "opponents"):
            rows = result.rows(self.dataset, 0, which, self.config.id_column)
            ids = (result.proponent_ids if which == "proponents" else result.opponent_ids)[0].tolist()
            scores = (result.proponent_scores if which == "proponents" else result.opponent_scores)[0].tolist()
            records[which] = [self._record(row, i, s) for row, i, s in zip(rows, ids, scores, strict=True)]
            galleries[which] = [
                (upscale(row[self.task.image_column], self.config.display_size), self._caption(record))
                for row, record in zip(rows, records[which], strict=True)
            ]
        return galleries, records

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


def score_histogram(scores: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict[str, list[float]]:
    """Bin centres and counts of one query's scores over the whole indexed training set."""
    values = scores.detach().double().cpu()
    low, high = values.min().item(), values.max().item()
    if high == low:
        high = low + 1.0
    counts = torch.histc(values, bins=bins, min=low, max=high)
    width = (high - low) / bins
    return {"score": [low + (i + 0.5) * width for i in range(bins)], "examples": counts.tolist()}
