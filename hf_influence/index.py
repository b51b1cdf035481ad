"""`GradientIndex`: every training example's (compressed) gradient, computed once, stored in shards.

The paper's "continual deployment" setting: the index holds raw training-loss gradients (not
preconditioned), so one index serves any damping and refitted factors; queries are preconditioned.
Shards `index-0000k-of-0000n.safetensors` hold a contiguous block of examples and their `ids`; each
is written atomically, and an interrupted build resumes after the last finished shard.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file
from tqdm.auto import tqdm

from . import __version__
from .cards import index_card
from .compression import COMPRESSIONS, Stored, make_compressor
from .curvature.layers import find_layers, layer_kind
from .data import dataset_length, iter_example_batches
from .distributed import Ranks
from .files import atomic_write, atomic_write_text, read_config
from .gradients import GradientPlan, per_example_gradients
from .hub import open_repo, push_folder
from .provenance import DatasetSource, dataset_provenance, describe_mismatch, model_provenance

if TYPE_CHECKING:
    from .task import DiffusionTask

FORMAT = "hf_influence.index"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
BUILD_STATE_NAME = "build_state.json"


@dataclass
class IndexConfig:
    """How to build a gradient index.

    Attributes:
        num_draws: (t, ε) draws per training example (K); the paper uses 250.
        batch_size: draws per forward/backward pass.
        seed: seeds the draws (with each example's id) and the projections.
        compression: "none" (exact), "svd" (rank `rank` per layer) or "projection" (Kronecker
            Gaussian projection to `projection_dim` per side of each layer).
        rank: the rank kept per layer and example by compression="svd".
        projection_dim: the dimension each side of a layer is projected to by compression="projection".
        quantize_bits: 8 to quantise whatever is stored to 8 bits per value; None keeps fp32.
        shard_size: examples per shard (the unit of resumption and of streaming at query time).
        max_shard_bytes: an upper bound on a shard file's size (fewer examples per shard when the
            compressed gradients are large); None bounds shards by `shard_size` only.
        module_filter: regex on layer names; must select the layers the factors were fitted on.
        id_column: the dataset column with stable integer ids (row positions when missing).
    """

    num_draws: int = 250
    batch_size: int = 64
    seed: int = 0
    compression: str = "none"
    rank: int = 8
    projection_dim: int = 16
    quantize_bits: int | None = None
    shard_size: int = 1024
    max_shard_bytes: int | None = None
    module_filter: str | None = None
    id_column: str = "id"

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"IndexConfig.compression must be one of {COMPRESSIONS}, got {self.compression!r}.")
        if min(self.num_draws, self.batch_size, self.shard_size, self.rank, self.projection_dim) < 1:
            raise ValueError("num_draws, batch_size, shard_size, rank and projection_dim must be at least 1.")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {self.max_shard_bytes}.")


class GradientIndex:
    """A finished index in a local folder: config.json plus shards, read one shard at a time."""

    def __init__(self, directory: str | os.PathLike, config: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.config = config
        self._verified: set[Path] = set()
        shapes = {name: tuple(shape) for name, shape in config["shapes"].items()}
        self.compressor, _ = make_compressor(
            config["compression"],
            shapes,
            config["seed"],
            config["rank"],
            config["projection_dim"],
            config["quantize_bits"],
        )

    def __len__(self) -> int:
        return self.config["num_examples"]

    @property
    def modules(self) -> list[str]:
        return list(self.config["modules"])

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        repo_type: str = "dataset",
    ) -> GradientIndex:
        """Open an index in a local folder or a Hub repo (a dataset repo by default) at `revision`.

        From the Hub, config.json and the shards it lists are downloaded (nothing else), and every
        shard's size is checked against the config, so a truncated download is refused.
        """
        repo = open_repo(path_or_repo_id, repo_type, revision, token, cache_dir, local_files_only)
        directory = repo.fetch(CONFIG_NAME).parent
        config = read_config(directory, FORMAT, FORMAT_VERSION, "GradientIndex")
        for shard in config["shards"]:
            repo.fetch(shard["file"], shard["size"])
        return cls(directory, config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Copy the index to another folder (each file atomically); returns the file names."""
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        files = [CONFIG_NAME, "README.md", *(shard["file"] for shard in self.config["shards"])]
        if target.resolve() == self.directory.resolve():
            return files
        for shard in self.config["shards"]:
            source = self.directory / shard["file"]
            atomic_write(target / shard["file"], lambda temp, source=source: shutil.copyfile(source, temp))
        card = index_card(self.config)
        atomic_write_text(target / "README.md", card)
        text = json.dumps(self.config, indent=2)
        atomic_write_text(target / CONFIG_NAME, text)
        return files

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload gradient index with hf_influence",
        create_pr: bool = False,
        repo_type: str = "dataset",
    ) -> Any:
        """Upload config.json, the shards and a dataset card to `repo_id` (a dataset repo by default,
        created if needed) in one commit; shards of an earlier push that this one replaces are deleted."""
        with tempfile.TemporaryDirectory() as folder:
            for shard in self.config["shards"]:  # link, not copy: shards can be large
                os.symlink((self.directory / shard["file"]).resolve(), Path(folder) / shard["file"])
            card = index_card(self.config, repo_id)
            Path(folder, "README.md").write_text(card)
            Path(folder, CONFIG_NAME).write_text(json.dumps(self.config, indent=2))
            files = [CONFIG_NAME, "README.md", *(shard["file"] for shard in self.config["shards"])]
            return push_folder(
                folder,
                repo_id,
                repo_type,
                files,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
                stale_patterns=["index-*.safetensors"],
            )

    def check_compatible(self, task: DiffusionTask, force: bool = False) -> None:
        """Refuse an index built on another model (`force=True` skips the check)."""
        recorded, actual = self.config["model"], model_provenance(task)
        if recorded["fingerprint"] != actual["fingerprint"] and not force:
            raise ValueError(
                f"This index was built on another model ({describe_mismatch(recorded, actual)}): the denoiser's "
                "weights differ. Rebuild the index for this model, or pass force=True if you know the difference "
                "does not matter."
            )

    def iter_shards(self) -> Iterator[tuple[torch.Tensor, dict[str, Stored]]]:
        """(ids, {module: stored tensors}) per shard, one shard in memory at a time.

        A shard's checksum is verified the first time this index reads it; later reads are
        memory-mapped, so repeated queries cost no hashing.
        """
        for shard in self.config["shards"]:
            path = self.directory / shard["file"]
            if path not in self._verified:
                digest = hashlib.blake2b(digest_size=16)
                with open(path, "rb") as handle:
                    while block := handle.read(1 << 24):
                        digest.update(block)
                if digest.hexdigest() != shard["blake2b"]:
                    raise ValueError(
                        f"Index shard {path} does not match its checksum: it is corrupt. "
                        "Rebuild or re-download the index."
                    )
                self._verified.add(path)
            try:
                with safe_open(path, framework="pt") as handle:
                    tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            except SafetensorError as error:
                raise ValueError(f"Index shard {path} cannot be read ({error}): it is corrupt.") from error
            yield tensors.pop("ids"), _split_modules(tensors, self.modules)

    def scores(self, queries: dict[str, Stored]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inner products `(Q, N)` of query-side forms (see `compression.py`) with every indexed
        example, streamed shard by shard, and the examples' ids `(N,)`."""
        columns, ids = [], []
        for shard_ids, stored in self.iter_shards():
            columns.append(sum(self.compressor.scores(name, queries[name], stored[name]) for name in queries))
            ids.append(shard_ids)
        return torch.cat(columns, dim=1).to(torch.float32), torch.cat(ids)

    def ids(self) -> torch.Tensor:
        return torch.cat([ids for ids, _ in self.iter_shards()])

    def check_dataset(self, dataset: Iterable[dict[str, Any]]) -> None:
        """Refuse a dataset whose ids are not the index's (another dataset, split or order)."""
        id_column = self.config["id_column"]
        rows = dataset.select_columns([id_column]) if hasattr(dataset, "select_columns") else dataset
        dataset_ids = [row.get(id_column, position) for position, row in enumerate(rows)]
        index_ids = self.ids().tolist()
        if dataset_ids != index_ids:
            missing = sorted(set(index_ids) - set(dataset_ids))[:5]
            raise ValueError(
                f"The dataset's ids do not match the index's ({len(dataset_ids)} rows vs {len(index_ids)} indexed"
                + (f"; e.g. ids {missing} are not in the dataset" if missing else "; same ids, different order")
                + "). Use the dataset the index was built from."
            )


def _split_modules(tensors: dict[str, torch.Tensor], modules: list[str]) -> dict[str, Stored]:
    """Shard tensor names are `{module}.{key}`; module names contain dots, so match known modules."""
    by_module: dict[str, Stored] = {module: {} for module in modules}
    for module in sorted(modules, key=len, reverse=True):
        prefix = f"{module}."
        for name in [name for name in tensors if name.startswith(prefix)]:
            by_module[module][name[len(prefix) :]] = tensors.pop(name)
    return by_module


def build_index(
    task: DiffusionTask,
    dataset: Iterable[dict[str, Any]],
    config: IndexConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    accelerator: Any = None,
    dataset_source: DatasetSource | None = None,
) -> GradientIndex:
    """Compute every training example's loss gradient (K draws, the task's augmentation), compress
    it and write shards to `output_dir` (a temporary folder when None). Re-running with the same
    `output_dir` after an interruption resumes after the last finished shard.

    With an `accelerate.Accelerator` of several processes (and a shared `output_dir`), each rank
    indexes its part of the data and the main process merges the parts in example-id order.
    `dataset_source` records where the data came from (repo id, commit, split) in the index's config.
    """
    config = config or IndexConfig()
    ranks = Ranks(accelerator)
    if output_dir is None and ranks.world > 1:
        raise ValueError("Building an index with several processes needs an output_dir that every process shares.")
    directory = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_influence_index_"))
    directory.mkdir(parents=True, exist_ok=True)
    layers = find_layers(task.denoiser, config.module_filter)
    shapes = {name: tuple(layer_kind(module).weight_shape(module)) for name, module in layers.items()}
    compressor, projections = make_compressor(
        config.compression, shapes, config.seed, config.rank, config.projection_dim, config.quantize_bits
    )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        **asdict(config),
        "modules": list(layers),
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "examples_per_shard": _examples_per_shard(config, compressor, shapes),
        "model": model_provenance(task),
        "dataset": dataset_provenance(dataset, config.id_column, dataset_source),
    }
    if ranks.is_main:
        _prepare_build_state(directory, metadata, ranks.world)
    ranks.barrier()
    prefix = "partial-" if ranks.world == 1 else f"partial-rank{ranks.rank:03d}-"
    shards = _partial_shards(directory, prefix)
    part = ranks.split(dataset)
    done = sum(shard["num_examples"] for shard in shards)
    remaining = part.skip(done) if done and hasattr(part, "skip") else itertools.islice(part, done, None)

    progress = tqdm(
        total=dataset_length(part),
        initial=done,
        desc="Indexing training gradients",
        unit="example",
        disable=not ranks.is_main,
    )
    examples_per_pass = max(1, config.batch_size // config.num_draws)
    plan = GradientPlan.training(config.num_draws, config.seed, config.batch_size)
    batches = iter_example_batches(
        remaining, task, metadata["examples_per_shard"], config.id_column, start=done, rank_part=ranks.world > 1
    )
    for batch in batches:
        tensors: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(batch.ids), examples_per_pass):
            part_rows = slice(start, start + examples_per_pass)
            grads = per_example_gradients(
                task, layers, batch.samples[part_rows], batch.ids[part_rows], plan, projections=projections
            )
            for name, (weight, bias) in grads.items():
                for key, value in compressor.encode(name, weight.cpu(), None if bias is None else bias.cpu()).items():
                    tensors.setdefault(f"{name}.{key}", []).append(value)
            progress.update(len(batch.ids[part_rows]))
        shards.append(_write_shard(directory / f"{prefix}{len(shards):05d}.safetensors", batch.ids, tensors, metadata))
    progress.close()
    ranks.barrier()
    if ranks.is_main:
        if ranks.world == 1:
            _finish(directory, shards, metadata)
        else:
            _merge_rank_parts(directory, ranks.world, metadata)
    ranks.barrier()
    return GradientIndex.from_pretrained(directory)


def _examples_per_shard(config: IndexConfig, compressor: Any, shapes: dict[str, tuple[int, int]]) -> int:
    """`shard_size`, lowered so that a shard's tensors fit in `max_shard_bytes` (measured by encoding
    one example's gradients: every compressor stores the same bytes for any example)."""
    if config.max_shard_bytes is None:
        return config.shard_size
    # Bytes per example (its id, then its tensors), and the header: a JSON entry of about 64 characters
    # (dtype, shape, offsets) plus the name, per tensor.
    per_example, header = 8, 128
    for name, (d_out, d_in) in shapes.items():
        stored = compressor.encode(name, torch.ones(1, d_out, d_in), torch.ones(1, d_out))
        per_example += sum(value.numel() * value.element_size() for value in stored.values())
        header += sum(64 + len(f"{name}.{key}") for key in stored)
    if per_example + header > config.max_shard_bytes:
        raise ValueError(
            f"One example's compressed gradients take {per_example + header} bytes with the file header, more "
            f"than max_shard_bytes={config.max_shard_bytes}; raise it or compress more."
        )
    return min(config.shard_size, (config.max_shard_bytes - header) // per_example)


def _prepare_build_state(directory: Path, metadata: dict[str, Any], world: int) -> None:
    """Record the build's settings, or check that an interrupted build used the same ones."""
    if (directory / CONFIG_NAME).is_file():
        raise FileExistsError(f"{directory} already holds a finished index; choose another output_dir.")
    state = {"metadata": metadata, "num_processes": world}
    state_path = directory / BUILD_STATE_NAME
    if not state_path.is_file():
        atomic_write_text(state_path, json.dumps(state))
    elif json.loads(state_path.read_text()) != state:
        raise ValueError(
            f"{directory} holds a partial index built with other settings, model, dataset or number of "
            "processes; resume with the same ones or choose another output_dir."
        )


def _partial_shards(directory: Path, prefix: str) -> list[dict[str, Any]]:
    """This rank's shards already written by an interrupted build, in order."""
    shards = []
    for number in itertools.count():
        path = directory / f"{prefix}{number:05d}.safetensors"
        if not path.is_file():
            return shards
        shards.append(_shard_record(path))
    return shards


def _write_shard(
    path: Path, ids: list[Any], tensors: dict[str, list[torch.Tensor]], metadata: dict[str, Any]
) -> dict[str, Any]:
    if not all(isinstance(example_id, int) for example_id in ids):
        raise TypeError(f"Index ids must be integers; column {metadata['id_column']!r} holds e.g. {ids[0]!r}.")
    content = {name: torch.cat(parts).contiguous() for name, parts in tensors.items()}
    content["ids"] = torch.tensor(ids, dtype=torch.int64)
    atomic_write(path, lambda temp: save_file(content, temp))
    return _shard_record(path)


def _merge_rank_parts(directory: Path, world: int, metadata: dict[str, Any]) -> None:
    """Rewrite the ranks' partial shards as one index in example-id order, a shard at a time."""
    parts = [record for rank in range(world) for record in _partial_shards(directory, f"partial-rank{rank:03d}-")]
    if not parts:
        raise ValueError("The dataset is empty: there are no training examples to index.")
    part_ids = []
    for record in parts:
        with safe_open(directory / record["file"], framework="pt") as handle:
            part_ids.append(handle.get_tensor("ids"))
    sources = torch.cat([torch.full((len(ids),), number) for number, ids in enumerate(part_ids)])
    rows = torch.cat([torch.arange(len(ids)) for ids in part_ids])
    order = torch.cat(part_ids).argsort(stable=True)
    shard_size = metadata["examples_per_shard"]
    shards, loaded = [], {}
    for number, start in enumerate(range(0, len(order), shard_size)):
        selected = order[start : start + shard_size]
        content: dict[str, torch.Tensor] = {}
        for source in sources[selected].unique().tolist():
            if source not in loaded:
                loaded = {source: load((directory / parts[source]["file"]).read_bytes())}  # one part in memory
            mask = sources[selected] == source
            for name, value in loaded[source].items():
                content.setdefault(name, torch.empty((len(selected), *value.shape[1:]), dtype=value.dtype))
                content[name][mask] = value[rows[selected][mask]]
        path = directory / f"partial-{number:05d}.safetensors"
        atomic_write(path, lambda temp, content=content: save_file(content, temp))
        shards.append(_shard_record(path))
    for record in parts:
        (directory / record["file"]).unlink()
    _finish(directory, shards, metadata)


def _shard_record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    try:
        num_examples = len(load(data)["ids"])
    except SafetensorError as error:
        raise ValueError(f"Partial shard {path} is corrupt ({error}); delete it to rebuild it.") from error
    return {
        "file": path.name,
        "num_examples": num_examples,
        "size": len(data),
        "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest(),
    }


def _finish(directory: Path, shards: list[dict[str, Any]], metadata: dict[str, Any]) -> GradientIndex:
    """Rename partial shards to their final `-of-n` names and write config.json and the card last."""
    if not shards:
        raise ValueError("The dataset is empty: there are no training examples to index.")
    for number, shard in enumerate(shards):
        final = f"index-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / shard["file"], directory / final)
        shard["file"] = final
    config = {**metadata, "num_examples": sum(shard["num_examples"] for shard in shards), "shards": shards}
    atomic_write_text(directory / "README.md", index_card(config))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))
    (directory / BUILD_STATE_NAME).unlink()
    return GradientIndex(directory, config)
