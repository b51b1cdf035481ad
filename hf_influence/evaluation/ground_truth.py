"""Measurements of retrained models with common random numbers, and the saved LDS ground truth.

Every retrained model is measured on the same `(t, ε)` draws: query `q`'s draws come from a
generator seeded by (seed, "ground-truth", query id) alone, never from a shared RNG state, so the
value does not depend on the order of the queries, the batch size, or which models were measured
before. Differences between models are then differences between the models, not between draws
(`method.md` §8.1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import draw_chunks
from ..files import atomic_write, atomic_write_text, read_config
from ..measurements import Measurement, get_measurement
from ..task import DiffusionTask
from ..training import TrainConfig
from .retraining import RetrainedModel, retrain_subsets

FORMAT = "hf_influence.ground_truth"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
TENSORS_NAME = "ground_truth.safetensors"
CARD_NAME = "README.md"
GROUND_TRUTH_STREAM = "ground-truth"
MEASUREMENT_CACHE = "measurements"  # folder in each retrained model's directory


def measure(
    task: DiffusionTask,
    queries: Any,
    measurement: str | Measurement = "loss",
    num_draws: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    query_ids: Sequence[Any] | None = None,
) -> torch.Tensor:
    """`(Q,)` fp64 measurements of `queries` (generated images of an unconditional pipeline), each averaged
    over `num_draws` draws seeded by (seed, query id); query ids default to positions. Eval mode, no
    augmentation."""
    measurement = get_measurement(measurement)
    samples = task.examples(queries)
    ids = list(range(len(samples))) if query_ids is None else list(query_ids)
    if len(ids) != len(samples):
        raise ValueError(f"{len(ids)} query ids were given for {len(samples)} queries.")
    if len(set(ids)) != len(ids):
        raise ValueError("Query ids must be unique: queries with the same id would share their draws.")
    if num_draws < 1 or batch_size < 1:
        raise ValueError("num_draws and batch_size must be at least 1.")
    totals = torch.zeros(len(samples), dtype=torch.float64)
    with task.eval_mode(), torch.no_grad():
        for examples, rows in draw_chunks(len(samples), num_draws, batch_size):
            output, _ = task.run(
                samples[examples],
                ids[examples],
                num_draws,
                rows,
                seed,
                GROUND_TRUTH_STREAM,
                False,
                measurement.timestep,
            )
            values = measurement(task, output).to("cpu", torch.float64)
            totals[examples] += values.view(examples.stop - examples.start, -1).sum(dim=1)
    return totals / num_draws


def _measurement_key(samples: torch.Tensor, measurement: Measurement, num_draws: int, seed: int, ids: list) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(samples.contiguous().numpy().tobytes())
    digest.update(repr((repr(measurement), measurement.timestep, num_draws, seed, [str(i) for i in ids])).encode())
    return digest.hexdigest()


def load_model_task(path: str | Path) -> DiffusionTask:
    """The DiffusionTask of a pipeline saved by `train_ddpm` (CPU, fp32)."""
    from diffusers import DDPMPipeline

    return DiffusionTask.from_pipeline(DDPMPipeline.from_pretrained(path))


def measure_models(
    models: Sequence[RetrainedModel | str | Path],
    queries: Any,
    measurement: str | Measurement = "loss",
    num_draws: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    query_ids: Sequence[Any] | None = None,
) -> torch.Tensor:
    """`(len(models), Q)` measurements of saved pipelines, with common random numbers.

    Each model's result is cached in its folder (measurements/<key>.json, keyed by the queries, the
    measurement and the draws), so measuring again, or after adding models, costs nothing."""
    measurement = get_measurement(measurement)
    samples = None
    rows = []
    for model in tqdm(models, desc="Measuring models", unit="model"):
        path = Path(model.path if isinstance(model, RetrainedModel) else model)
        task = load_model_task(path)
        if samples is None:
            samples = task.preprocess(queries)
            ids = list(range(len(samples))) if query_ids is None else list(query_ids)
            key = _measurement_key(samples, measurement, num_draws, seed, ids)
        cached = path / MEASUREMENT_CACHE / f"{key}.json"
        if cached.is_file():
            rows.append(torch.tensor(json.loads(cached.read_text())["values"], dtype=torch.float64))
            continue
        values = measure(task, samples, measurement, num_draws, seed, batch_size, ids)
        cached.parent.mkdir(exist_ok=True)
        record = json.dumps({"measurement": repr(measurement), "num_draws": num_draws, "values": values.tolist()})
        atomic_write_text(cached, record)
        rows.append(values)
    return torch.stack(rows)


@dataclass
class GroundTruth:
    """The LDS ground truth: which examples each subset kept, and every retrained model's measurements.

    Attributes:
        subsets: (S, N) bool, True where subset k kept training example n (columns in the order of
            the training set, the order of the score matrices' columns).
        measurements: (S, R, Q) fp64, query q measured on the model of subset k and training seed r.
        queries: (Q, C, H, W) the query images in [-1, 1], so scores can be recomputed, or None.
        config: JSON metadata: α, subset and training seeds, measurement, draws, training config, ids.
    """

    subsets: torch.Tensor
    measurements: torch.Tensor
    queries: torch.Tensor | None
    config: dict[str, Any]

    def __post_init__(self) -> None:
        if self.subsets.dim() != 2 or self.subsets.dtype != torch.bool:
            raise ValueError(f"subsets must be a (S, N) boolean mask, got {self.subsets.dtype} {self.subsets.shape}.")
        if self.measurements.dim() != 3 or len(self.measurements) != len(self.subsets):
            raise ValueError(
                f"measurements must be (S={len(self.subsets)}, seeds, queries), got {tuple(self.measurements.shape)}."
            )
        if self.queries is not None and len(self.queries) != self.num_queries:
            raise ValueError(f"{len(self.queries)} query images for {self.num_queries} measured queries.")

    @property
    def num_subsets(self) -> int:
        return self.subsets.shape[0]

    @property
    def num_examples(self) -> int:
        return self.subsets.shape[1]

    @property
    def num_seeds(self) -> int:
        return self.measurements.shape[1]

    @property
    def num_queries(self) -> int:
        return self.measurements.shape[2]

    def mean_measurements(self) -> torch.Tensor:
        """(S, Q): each subset's measurement averaged over training seeds."""
        return self.measurements.mean(dim=1)

    # ------------------------------------------------------------------ files and the Hub

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json, ground_truth.safetensors and a dataset card (each atomically)."""
        from .. import __version__

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"subsets": self.subsets.to(torch.uint8), "measurements": self.measurements.to(torch.float64)}
        if self.queries is not None:
            tensors["queries"] = self.queries.to(torch.float32).contiguous()
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__, **self.config}
        atomic_write(directory / TENSORS_NAME, lambda temp: save_file(tensors, temp, metadata={"format": FORMAT}))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))
        atomic_write_text(directory / CARD_NAME, self._card())

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | Path, revision: str | None = None, token: str | bool | None = None
    ) -> GroundTruth:
        """Load a saved folder, or a Hub dataset repo pushed with `push_to_hub`."""
        directory = Path(path_or_repo_id)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(
                snapshot_download(
                    str(path_or_repo_id),
                    repo_type="dataset",
                    revision=revision,
                    token=token,
                    allow_patterns=[CONFIG_NAME, TENSORS_NAME],
                    library_name="hf_influence",
                )
            )
        config = read_config(directory, FORMAT, FORMAT_VERSION, "LDS ground truth")
        if not (directory / TENSORS_NAME).is_file():
            raise FileNotFoundError(f"{directory} has no {TENSORS_NAME}: the ground-truth folder is incomplete.")
        tensors = load_file(str(directory / TENSORS_NAME))
        meta = {key: value for key, value in config.items() if key not in ("format", "format_version")}
        return cls(
            subsets=tensors["subsets"].to(torch.bool),
            measurements=tensors["measurements"],
            queries=tensors.get("queries"),
            config=meta,
        )

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload LDS ground truth",
    ) -> Any:
        """Push the saved files to a Hub dataset repo (created if needed); returns the commit info."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, repo_type="dataset", commit_message=commit_message
            )

    def _card(self) -> str:
        return (
            "---\ntags:\n- hf_influence\n- data-attribution\n- linear-datamodelling-score\n---\n\n"
            "# LDS ground truth\n\n"
            f"{self.num_subsets} random training subsets (α = {self.config.get('alpha')}), each retrained with "
            f"{self.num_seeds} seed(s), and the `{self.config.get('measurement')}` measurement of {self.num_queries} "
            f"generated queries on every retrained model ({self.config.get('num_draws')} common (t, ε) draws per "
            f"query). Training set: {self.num_examples} examples.\n\n"
            "Evaluate a `[queries, train examples]` score matrix (positive = removing the example is predicted "
            "to increase the measurement):\n\n"
            "```python\nfrom hf_influence.evaluation import GroundTruth, lds\n\n"
            "ground_truth = GroundTruth.from_pretrained(REPO_ID)\n"
            "result = lds(scores, ground_truth)   # result.mean, result.stderr, result.per_query\n```\n"
        )


def build_ground_truth(
    dataset: Any,
    queries: Any,
    config: TrainConfig,
    subsets: torch.Tensor,
    seeds: Sequence[int],
    output_dir: str | Path,
    measurement: str | Measurement = "loss",
    num_draws: int = 1000,
    draw_seed: int = 0,
    batch_size: int = 256,
    metadata: dict[str, Any] | None = None,
) -> GroundTruth:
    """Retrain every (subset, seed) model not yet trained in output_dir/models, measure every query on
    every model with common random numbers, and save the GroundTruth to output_dir/ground_truth."""
    output_dir = Path(output_dir)
    models = retrain_subsets(dataset, config, subsets, seeds, output_dir / "models")
    measurement = get_measurement(measurement)
    values = measure_models(models, queries, measurement, num_draws, draw_seed, batch_size)
    samples = load_model_task(models[0].path).preprocess(queries)
    ground_truth = GroundTruth(
        subsets=subsets.clone(),
        measurements=values.view(len(subsets), len(seeds), -1),
        queries=samples,
        config={
            "alpha": subsets[0].float().mean().item(),
            "seeds": list(seeds),
            "measurement": measurement.name,
            "measurement_timestep": measurement.timestep,
            "num_draws": num_draws,
            "draw_seed": draw_seed,
            "train_config": asdict(config),
            **(metadata or {}),
        },
    )
    ground_truth.save_pretrained(output_dir / "ground_truth")
    return ground_truth
