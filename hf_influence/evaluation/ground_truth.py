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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..artifacts import Artifact, ArtifactFiles
from ..deprecation import renamed_argument
from ..engine import DrawPlan, run_draws
from ..files import atomic_write, atomic_write_text
from ..measurements import Measurement, get_measurement
from ..task import DiffusionTask
from ..tensor_files import read_safetensors
from ..training import TrainConfig
from ..validation import check_int, check_type
from .retraining import RetrainedModel, retrain_subsets

TENSORS_NAME = "ground_truth.safetensors"
GROUND_TRUTH_STREAM = "ground-truth"
MEASUREMENT_CACHE = "measurements"  # folder in each retrained model's directory


def measure(
    task: DiffusionTask,
    queries: Any,
    measurement: str | Measurement = "loss",
    draws_per_query: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    query_ids: Sequence[Any] | None = None,
    num_draws: int | None = None,
) -> torch.Tensor:
    """`(Q,)` fp64 measurements of `queries` (generated images of an unconditional pipeline), each averaged
    over `draws_per_query` draws seeded by (seed, query id); query ids default to positions. Eval mode, no
    augmentation. (`num_draws` is the deprecated name of `draws_per_query`.)"""
    check_type("task", task, DiffusionTask, "measure(task, queries, ...)")
    measurement = get_measurement(measurement)
    samples = task.examples(queries)
    ids = list(range(len(samples))) if query_ids is None else list(query_ids)
    if len(ids) != len(samples):
        raise ValueError(f"{len(ids)} query ids were given for {len(samples)} queries.")
    if len(set(ids)) != len(ids):
        raise ValueError("Query ids must be unique: queries with the same id would share their draws.")
    draws_per_query = renamed_argument("num_draws", num_draws, "draws_per_query", draws_per_query)
    draws_per_query = check_int("draws_per_query", draws_per_query, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    plan = DrawPlan(measurement, draws_per_query, seed, GROUND_TRUTH_STREAM, batch_size, timestep=measurement.timestep)
    totals = torch.zeros(len(samples), dtype=torch.float64)

    def accumulate(rows: slice, output: Any, draws: Any) -> None:
        values = plan.values(task, output, ids[rows]).to("cpu", torch.float64)
        totals[rows] += values.view(rows.stop - rows.start, -1).sum(dim=1)

    run_draws(task, samples, ids, plan, accumulate, grad=False)
    return totals / draws_per_query


def _measurement_key(samples: torch.Tensor, key: Any, draws: int, seed: int, ids: list) -> str:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(samples.contiguous().numpy().tobytes())
    digest.update(repr((key, draws, seed, [str(i) for i in ids])).encode())
    return digest.hexdigest()


def load_model_task(path: str | Path) -> DiffusionTask:
    """The DiffusionTask of a pipeline saved by `train_ddpm` (CPU, fp32)."""
    from diffusers import DDPMPipeline

    return DiffusionTask.from_pipeline(DDPMPipeline.from_pretrained(path))


def measure_models(
    models: Sequence[RetrainedModel | str | Path],
    queries: Any,
    measurement: str | Measurement = "loss",
    draws_per_query: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    query_ids: Sequence[Any] | None = None,
    num_draws: int | None = None,
) -> torch.Tensor:
    """`(len(models), Q)` measurements of saved pipelines, with common random numbers (`num_draws`: the deprecated
    name of `draws_per_query`).

    Each model's result is cached in its folder (measurements/<key>.json, keyed by the queries, the
    measurement's `cache_key()` and the draws), so measuring again, or after adding models, costs nothing;
    a measurement without a cache key is measured every time."""
    measurement = get_measurement(measurement)
    draws_per_query = renamed_argument("num_draws", num_draws, "draws_per_query", draws_per_query)
    samples, key, rows = None, None, []
    for model in tqdm(models, desc="Measuring models", unit="model"):
        path = Path(model.path if isinstance(model, RetrainedModel) else model)
        task = load_model_task(path)
        if samples is None:
            samples = task.preprocess(queries)
            ids = list(range(len(samples))) if query_ids is None else list(query_ids)
            if measurement.cache_key() is not None:
                key = _measurement_key(samples, measurement.cache_key(), draws_per_query, seed, ids)
        cached = None if key is None else path / MEASUREMENT_CACHE / f"{key}.json"
        if cached is not None and cached.is_file():
            rows.append(torch.tensor(json.loads(cached.read_text())["values"], dtype=torch.float64))
            continue
        values = measure(task, samples, measurement, draws_per_query, seed, batch_size, ids)
        if cached is not None:
            cached.parent.mkdir(exist_ok=True)
            record = {"measurement": repr(measurement), "draws_per_query": draws_per_query, "values": values.tolist()}
            atomic_write_text(cached, json.dumps(record))
        rows.append(values)
    return torch.stack(rows)


@dataclass(frozen=True)
class GroundTruthProtocol:
    """How an LDS ground truth was made (what its card states, so others can compare numbers).

    Attributes:
        alpha: the fraction of the training set each subset keeps.
        seeds: the training seeds every subset was retrained with.
        measurement: the measurement of the queries on every retrained model ("loss", ...).
        draws_per_query: the common (t, ε) draws each measurement averages.
        draw_seed: seeds those draws (with each query's id).
        subset_seed: seeds the subsets (`random_subsets`), when they were drawn by it.
        measurement_timestep: the fixed timestep of a `LossAtTime` measurement, else None.
        train_config: the `TrainConfig` of the retrained models, as JSON values.
        dataset: the training set, in words or as a Hub id.
        extra: anything else the maker recorded.
    """

    alpha: float
    seeds: tuple[int, ...] = ()
    measurement: str = "loss"
    draws_per_query: int | None = None
    draw_seed: int = 0
    subset_seed: int | None = None
    measurement_timestep: int | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _migrate_v1(config: dict[str, Any]) -> dict[str, Any]:
    """Format version 1 → 2: `num_draws` is named `draws_per_query`, keys outside the protocol move to `extra`,
    and the tensors file gets a record (version 1 recorded none)."""
    config = dict(config)
    if "num_draws" in config:
        config["draws_per_query"] = config.pop("num_draws")
    known = {"alpha", "seeds", "measurement", "draws_per_query", "draw_seed", "subset_seed", "measurement_timestep"}
    known |= {"train_config", "dataset", "format", "format_version", "library_version"}
    config["extra"] = {key: config.pop(key) for key in list(config) if key not in known}
    if not isinstance(config.get("dataset"), (str, type(None))):
        config["extra"]["dataset"] = config.pop("dataset")
    config["files"] = {TENSORS_NAME: {"size": None, "blake2b": None}}
    return config


@dataclass
class GroundTruth(Artifact):
    """The LDS ground truth: which examples each subset kept, and every retrained model's measurements.

    Attributes:
        subsets: (S, N) bool, True where subset k kept training example n (columns in the order of
            the training set, the order of the score matrices' columns).
        measurements: (S, R, Q) fp64, query q measured on the model of subset k and training seed r.
        queries: (Q, C, H, W) the query images in [-1, 1], so scores can be recomputed, or None.
        protocol: how it was made (α, seeds, measurement, draws, training config).
    """

    FORMAT = "hf_influence.ground_truth"
    FORMAT_VERSION = 2
    REPO_TYPE = "dataset"
    DESCRIPTION = "LDS ground truth"
    METADATA = GroundTruthProtocol
    DATA_FILES = (TENSORS_NAME,)
    MIGRATIONS: ClassVar[dict] = {1: _migrate_v1}

    subsets: torch.Tensor
    measurements: torch.Tensor
    queries: torch.Tensor | None
    protocol: GroundTruthProtocol

    def __post_init__(self) -> None:
        if self.subsets.dim() != 2 or self.subsets.dtype != torch.bool:
            raise ValueError(f"subsets must be a (S, N) boolean mask, got {self.subsets.dtype} {self.subsets.shape}.")
        if self.measurements.dim() != 3 or len(self.measurements) != len(self.subsets):
            raise ValueError(
                f"measurements must be (S={len(self.subsets)}, seeds, queries), got {tuple(self.measurements.shape)}."
            )
        if self.queries is not None and len(self.queries) != self.num_queries:
            raise ValueError(f"{len(self.queries)} query images for {self.num_queries} measured queries.")
        if not isinstance(self.protocol, GroundTruthProtocol):
            raise TypeError(f"protocol must be a GroundTruthProtocol, got {type(self.protocol).__name__}.")

    @property
    def metadata(self) -> GroundTruthProtocol:
        return self.protocol

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

    def with_seeds(self, other: GroundTruth) -> GroundTruth:
        """This ground truth with `other`'s training seeds added: the same subsets, queries and protocol
        (other than the seeds), retrained with seeds this one does not have; measurements concatenated."""
        if not torch.equal(self.subsets, other.subsets):
            raise ValueError("The two ground truths retrained different subsets.")
        if self.num_queries != other.num_queries or (
            self.queries is not None and other.queries is not None and not torch.equal(self.queries, other.queries)
        ):
            raise ValueError("The two ground truths measured different queries.")
        shared = set(self.protocol.seeds) & set(other.protocol.seeds)
        if shared:
            raise ValueError(f"Both ground truths were retrained with seeds {sorted(shared)}.")
        if replace(self.protocol, seeds=()) != replace(other.protocol, seeds=()):
            raise ValueError(
                f"The two ground truths were made with different protocols: {self.protocol} and {other.protocol}."
            )
        return GroundTruth(
            self.subsets,
            torch.cat([self.measurements, other.measurements.to(self.measurements.dtype)], dim=1),
            self.queries,
            replace(self.protocol, seeds=(*self.protocol.seeds, *other.protocol.seeds)),
        )

    # ------------------------------------------------------------------ files and the Hub (see Artifact)

    def _write_data(self, directory: Path, staging: bool = False) -> tuple[list[str], GroundTruthProtocol]:
        tensors = {"subsets": self.subsets.to(torch.uint8), "measurements": self.measurements.to(torch.float64)}
        if self.queries is not None:
            tensors["queries"] = self.queries.to(torch.float32).contiguous()
        atomic_write(directory / TENSORS_NAME, lambda temp: save_file(tensors, temp, metadata={"format": self.FORMAT}))
        return [TENSORS_NAME], self.protocol

    @classmethod
    def _read(cls, files: ArtifactFiles, metadata: GroundTruthProtocol) -> GroundTruth:
        tensors = read_safetensors(files.path(TENSORS_NAME))
        return cls(tensors["subsets"].to(torch.bool), tensors["measurements"], tensors.get("queries"), metadata)

    def push_models_to_hub(
        self, repo_id: str, models_dir: str | Path, token: str | bool | None = None, revision: str | None = None
    ) -> Any:
        """Upload the retrained models (`models_dir/subset-KKKK/seed-R/`, as `retrain_subsets` writes them; their
        checkpoints left out) to `models/` of the ground truth's dataset repo, so anyone can re-measure them
        with another measurement. Returns the `CommitInfo`."""
        from huggingface_hub import HfApi

        models_dir = Path(models_dir)
        expected = [f"subset-{k:04d}/seed-{seed}" for k in range(self.num_subsets) for seed in self.protocol.seeds]
        missing = [name for name in expected if not (models_dir / name / "model_index.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{models_dir} lacks the retrained pipelines {missing[:3]} (of {len(missing)}).")
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type=self.REPO_TYPE, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type=self.REPO_TYPE,
            folder_path=str(models_dir),
            path_in_repo="models",
            revision=revision,
            allow_patterns=[f"{name}/*" for name in expected] + [f"{name}/**/*" for name in expected],
            ignore_patterns=["**/checkpoints/**"],
            commit_message="Upload the retrained models with hf_influence",
        )

    def _card(self, metadata: GroundTruthProtocol, repo_id: str | None) -> str:
        repo = repo_id or "REPO_ID"
        seeds = ", ".join(str(seed) for seed in metadata.seeds) or "unrecorded"
        timestep = "" if metadata.measurement_timestep is None else f" at t = {metadata.measurement_timestep}"
        steps = metadata.train_config.get("max_steps")
        return (
            "---\ntags:\n- hf_influence\n- data-attribution\n- linear-datamodelling-score\n---\n\n"
            "# LDS ground truth\n\n"
            f"{self.num_subsets} random training subsets (α = {metadata.alpha}), each retrained with "
            f"{self.num_seeds} seed(s), and the `{metadata.measurement}` measurement of {self.num_queries} "
            f"generated queries on every retrained model ({metadata.draws_per_query} common (t, ε) draws per "
            f"query). Training set: {self.num_examples} examples"
            + (f" ({metadata.dataset})" if metadata.dataset else "")
            + ".\n\n## Protocol\n\n"
            "| | |\n|---|---|\n"
            f"| subsets | {self.num_subsets}, each keeping a fraction α = {metadata.alpha} of the training set "
            f"(`random_subsets`, seed {metadata.subset_seed}) |\n"
            f"| training seeds per subset | {self.num_seeds}: {seeds} |\n"
            f"| retraining | `train_ddpm` with the `train_config` of config.json"
            + (f" ({steps} steps)" if steps else "")
            + " |\n"
            f"| measurement | `{metadata.measurement}`{timestep} of each query, {metadata.draws_per_query} draws "
            f"seeded by ({metadata.draw_seed}, the query's index): the same draws on every model |\n"
            f"| queries | {self.num_queries} images in [-1, 1], stored beside the measurements |\n"
            "| LDS | Spearman over subsets between a method's summed scores of the removed examples and the "
            "seed-averaged measurement, averaged over queries |\n\n"
            "Retrained models, when uploaded (`GroundTruth.push_models_to_hub`), are under "
            "`models/subset-KKKK/seed-R/` as diffusers pipelines.\n\n"
            "## Submit a number\n\n"
            "Score every query against every training example (a `[queries, train examples]` matrix; positive = "
            "removing the example is predicted to increase the measurement), save it with safetensors, and run\n\n"
            f"```bash\nhf-influence lds --ground-truth {repo} --scores scores.safetensors\n```\n\n"
            "or in Python:\n\n"
            "```python\nfrom hf_influence.evaluation import GroundTruth, lds\n\n"
            f"ground_truth = GroundTruth.from_pretrained({repo!r})\n"
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
    draws_per_query: int = 1000,
    draw_seed: int = 0,
    batch_size: int = 256,
    metadata: dict[str, Any] | None = None,
    num_draws: int | None = None,
) -> GroundTruth:
    """Retrain every (subset, seed) model not yet trained in output_dir/models, measure every query on
    every model with common random numbers, and save the GroundTruth to output_dir/ground_truth
    (`metadata`: anything else to record in its protocol; `num_draws`: the deprecated `draws_per_query`)."""
    draws_per_query = renamed_argument("num_draws", num_draws, "draws_per_query", draws_per_query)
    output_dir = Path(output_dir)
    models = retrain_subsets(dataset, config, subsets, seeds, output_dir / "models")
    measurement = get_measurement(measurement)
    values = measure_models(models, queries, measurement, draws_per_query, draw_seed, batch_size)
    samples = load_model_task(models[0].path).preprocess(queries)
    ground_truth = GroundTruth(
        subsets=subsets.clone(),
        measurements=values.view(len(subsets), len(seeds), -1),
        queries=samples,
        protocol=GroundTruthProtocol(
            alpha=subsets[0].float().mean().item(),
            seeds=tuple(seeds),
            measurement=measurement.name,
            draws_per_query=draws_per_query,
            draw_seed=draw_seed,
            measurement_timestep=measurement.timestep,
            train_config=json.loads(json.dumps(asdict(config))),
            extra=dict(metadata or {}),
        ),
    )
    ground_truth.save_pretrained(output_dir / "ground_truth")
    return ground_truth
