"""`build_index`: every training example's gradient, computed once, compressed and written in shards.

Shards are written atomically as `partial-0000k.safetensors` (`partial-rankRRR-0000k` per process of an
`accelerate` job), beside a `RunRecord` of the build's settings; an interrupted build resumes after the last
finished shard, and a build with other settings is refused. At the end the parts are merged in id order and
renamed `index-0000k-of-0000n.safetensors`, and config.json is written last.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..artifacts import ArtifactFiles, FileRecord, check_output_folder
from ..compression import Compressor, bytes_per_example, dequantized, fit_to_budget, make_compressor
from ..curvature.layers import find_layers, layer_kind
from ..data import check_dataset
from ..distributed import Ranks
from ..eigenbasis_compression import (
    BASIS_FILE,
    EigenbasisCompressor,
    WhitenedBasis,
    basis_tensors,
    choose_ranks,
    compressor_from_tensors,
    whitened_bases,
)
from ..engine import DrawPlan, dataset_batches
from ..estimators import Estimator
from ..factors import InfluenceFactors
from ..files import atomic_write
from ..gradients import per_example_gradients
from ..hub import open_repo
from ..provenance import DatasetSource, dataset_provenance
from ..resume import RunRecord
from ..row_digests import combine, describe, row_digest
from ..task import DiffusionTask
from ..tensor_files import read_safetensors
from ..validation import check_type
from .config import IndexConfig, IndexMetadata, ShardRecord
from .reader import GradientIndex
from .sketch import SKETCH_KEY, SearchSketch

BUILD_STATE_NAME = "build_state.json"


def build_index(
    task: Any,
    dataset: Iterable[dict[str, Any]],
    config: IndexConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    accelerator: Any = None,
    dataset_source: DatasetSource | None = None,
    overwrite: bool = False,
    factors: InfluenceFactors | None = None,
) -> GradientIndex:
    """Compute every training example's loss gradient (K draws, the task's augmentation), compress
    it and write shards to `output_dir` (a temporary folder when None). Re-running with the same
    `output_dir` after an interruption resumes after the last finished shard; a folder holding anything else
    (a finished index, other files) is refused unless `overwrite=True`.

    With an `accelerate.Accelerator` of several processes (and a shared `output_dir`), each rank
    indexes its part of the data and the main process merges the parts in example-id order.
    `dataset_source` records where the data came from (repo id, commit, split) in the index's config.
    `factors` (K-FAC or EK-FAC, of this model) enable compression="eigenbasis", which a byte budget then chooses;
    the index keeps what it needs of them (`eigenbasis_compression.py`) and scores without them.
    """
    config = config or IndexConfig()
    call = "build_index(task, dataset, config, output_dir)"
    check_type("task", task, DiffusionTask, call)
    check_dataset(dataset)
    check_type("config", config, IndexConfig, call)
    if factors is not None:
        check_type("factors", factors, InfluenceFactors, call)
    ranks = Ranks(accelerator)
    if output_dir is None and ranks.world > 1:
        raise ValueError("Building an index with several processes needs an output_dir that every process shares.")
    directory = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_influence_index_"))
    layers = find_layers(task.denoiser, config.module_filter)
    shapes = {name: tuple(layer_kind(module).weight_shape(module)) for name, module in layers.items()}
    biases = {name: module.bias is not None for name, module in layers.items()}
    config = fit_to_budget(config, shapes, biases, factors is not None)  # what a byte budget chooses, recorded
    bases = _whitened_bases(config, factors, layers)
    metadata = IndexMetadata(
        config=config,
        modules=tuple(layers),
        shapes=shapes,
        examples_per_shard=_examples_per_shard(config, shapes, biases, bases),
        model=task.provenance(),
        dataset=dataset_provenance(dataset, config.id_column, dataset_source),
        digest_columns=tuple(task.columns),
    )
    if ranks.is_main:
        # An eigenbasis build resumes only with the factors its basis file came from.
        used = {} if bases is None else {"factors": _factors_identity(factors)}
        _prepare_build(directory, metadata, ranks.world, overwrite, used)
        if bases is not None and not (directory / BASIS_FILE).is_file():  # chosen once, kept on resume
            _write_eigenbasis(directory / BASIS_FILE, task, dataset, layers, bases, config)
    ranks.barrier()
    compressor = make_compressor(config, shapes, _read_eigenbasis(directory, metadata) if bases is not None else None)
    metadata = replace(metadata, bytes_per_example=bytes_per_example(compressor, shapes, biases) + config.sketch_bytes)
    prefix = "partial-" if ranks.world == 1 else f"partial-rank{ranks.rank:03d}-"
    shards = _partial_shards(directory, prefix)
    _index_part(task, ranks, ranks.split(dataset), layers, compressor, metadata, directory / prefix, shards)
    ranks.barrier()
    if ranks.is_main:
        if ranks.world > 1:
            shards = _merge_rank_parts(directory, ranks.world, metadata)
        _finish(directory, shards, metadata)
    ranks.barrier()
    return GradientIndex.from_pretrained(directory)


def _index_part(
    task: Any,
    ranks: Ranks,
    part: Iterable[dict[str, Any]],
    layers: dict[str, Any],
    compressor: Compressor,
    metadata: IndexMetadata,
    prefix: Path,
    shards: list[ShardRecord],
) -> None:
    """Index this rank's part of the data after the `shards` it already wrote, one shard per batch."""
    config = metadata.config
    done = sum(shard.num_examples for shard in shards)
    if done:
        _check_indexed_rows(part, shards, prefix.parent, metadata)
    remaining = part.skip(done) if done and hasattr(part, "skip") else itertools.islice(part, done, None)
    plan = DrawPlan.training(
        config.draws_per_example, config.seed, config.batch_size, estimator=Estimator.named(config.estimator)
    )
    batches = dataset_batches(
        remaining, task, metadata.examples_per_shard, config.id_column, start=done, rank_part=ranks.world > 1
    )
    sketch = None if config.search_dim is None else SearchSketch(config.search_dim, config.seed)
    space = {name: compressor.space_shape(name, *shape) for name, shape in metadata.shapes.items()}
    total = len(part) if hasattr(part, "__len__") else None
    with tqdm(
        total=total, initial=done, desc="Indexing training gradients", unit="example", disable=not ranks.is_main
    ) as progress:
        for batch in batches:
            tensors: dict[str, list[torch.Tensor]] = {}
            for start in range(0, len(batch.ids), plan.examples_per_pass):
                rows = slice(start, start + plan.examples_per_pass)
                grads = per_example_gradients(
                    task, layers, batch.examples[rows], batch.ids[rows], plan, transform=compressor.transform
                )
                sketched = 0
                for name, (weight, bias) in grads.items():
                    stored = compressor.encode(name, weight.cpu(), None if bias is None else bias.cpu())
                    for key, value in stored.items():
                        tensors.setdefault(f"{name}.{key}", []).append(value)
                    if sketch is not None:  # of the entry as stored, which the exact rescoring reads
                        sketched = sketched + sketch.layer(name, dequantized(stored), space[name])
                if sketch is not None:
                    tensors.setdefault(SKETCH_KEY, []).append(sketched.to(torch.bfloat16))
                progress.update(len(batch.ids[rows]))
            path = Path(f"{prefix}{len(shards):05d}.safetensors")
            shards.append(_write_shard(path, batch.ids, batch.digests, tensors, config))


def _whitened_bases(
    config: IndexConfig, factors: InfluenceFactors | None, layers: dict[str, Any]
) -> dict[str, WhitenedBasis] | None:
    """compression="eigenbasis": every indexed layer's basis from `factors` (None for other compressions)."""
    if config.compression != "eigenbasis":
        return None
    if factors is None:
        raise ValueError(
            "compression='eigenbasis' needs the fitted factors: build_index(..., factors=factors) "
            "(hf-influence build-index --factors DIR)."
        )
    missing = [name for name in layers if name not in factors.modules]
    if missing:
        raise ValueError(
            f"The factors have no layer {missing[0]!r} of the {len(layers)} indexed: pass the factors fitted on this "
            "model with the same module_filter."
        )
    return whitened_bases(factors, layers)


def _factors_identity(factors: InfluenceFactors) -> dict[str, Any]:
    """What makes factors these factors (not how they were stored)."""
    return {name: getattr(factors.metadata, name) for name in ("config", "total_draws", "model", "dataset")}


def _write_eigenbasis(
    path: Path, task: Any, dataset: Any, layers: dict[str, Any], bases: dict[str, WhitenedBasis], config: IndexConfig
) -> None:
    tensors = basis_tensors(choose_ranks(task, dataset, layers, bases, config))
    atomic_write(path, lambda temp: save_file(tensors, temp))


def _read_eigenbasis(directory: Path, metadata: IndexMetadata) -> EigenbasisCompressor:
    return compressor_from_tensors(read_safetensors(directory / BASIS_FILE), list(metadata.modules))


def _examples_per_shard(
    config: IndexConfig,
    shapes: dict[str, tuple[int, int]],
    biases: dict[str, bool],
    bases: dict[str, WhitenedBasis] | None,
) -> int:
    """`shard_size`, lowered so that a shard's tensors fit in `max_shard_bytes` (every example's entry has the
    compressor's `layout`; for "eigenbasis", whose ranks are chosen later, the budget and rank-1 tensor names
    bound it)."""
    if config.max_shard_bytes is None:
        return config.shard_size
    if bases is None:
        compressor = make_compressor(config, shapes)
        per_example = 8 + config.sketch_bytes + bytes_per_example(compressor, shapes, biases)
    else:
        uniform = config.rank if config.max_bytes_per_example is None else 1
        compressor = make_compressor(config, shapes, EigenbasisCompressor(bases, dict.fromkeys(bases, uniform)))
        per_example = (
            8 + config.sketch_bytes + (config.gradient_budget or bytes_per_example(compressor, shapes, biases))
        )
    # Bytes per example (its id, then its tensors), and the header: a JSON entry of about 64 characters
    # (dtype, shape, offsets) plus the name, per tensor.
    header = (
        128
        + (64 if config.search_dim else 0)
        + sum(
            64 + len(f"{name}.{key}")
            for name, (d_out, d_in) in shapes.items()
            for key in compressor.layout(name, d_out, d_in, biases[name])
        )
    )
    if per_example + header > config.max_shard_bytes:
        raise ValueError(
            f"One example's compressed gradients take {per_example + header} bytes with the file header, more "
            f"than max_shard_bytes={config.max_shard_bytes}; raise it or compress more."
        )
    return min(config.shard_size, (config.max_shard_bytes - header) // per_example)


def _prepare_build(
    directory: Path, metadata: IndexMetadata, world: int, overwrite: bool, inputs: dict[str, Any]
) -> None:
    """Record the build's settings (and `inputs`, what else it depends on), or check that an interrupted build
    used the same ones; refuse a folder holding anything else (a finished index included) unless `overwrite`."""
    identity = {"metadata": metadata, "num_processes": world, **inputs}
    record = RunRecord(directory / BUILD_STATE_NAME, identity, "a partial index")
    if record.exists():
        record.check()
        return
    finished = check_output_folder(directory, GradientIndex.FORMAT, GradientIndex.DESCRIPTION, overwrite)
    if finished and not overwrite:  # the files an earlier, finished build of an index recorded there
        raise FileExistsError(
            f"{directory} already holds a finished index; choose another output_dir, or pass overwrite=True "
            "(--overwrite) to build a new one there."
        )
    directory.mkdir(parents=True, exist_ok=True)
    record.write({})


def _partial_shards(directory: Path, prefix: str) -> list[ShardRecord]:
    """This rank's shards already written by an interrupted build, in order."""
    shards = []
    for number in itertools.count():
        path = directory / f"{prefix}{number:05d}.safetensors"
        if not path.is_file():
            return shards
        shards.append(_shard_record(path))


def _write_shard(
    path: Path, ids: list[Any], digests: list[int], tensors: dict[str, list[torch.Tensor]], config: IndexConfig
) -> ShardRecord:
    if not all(isinstance(example_id, (int, np.integer)) and not isinstance(example_id, bool) for example_id in ids):
        raise TypeError(f"Index ids must be integers; column {config.id_column!r} holds e.g. {ids[0]!r}.")
    content = {name: torch.cat(parts).contiguous() for name, parts in tensors.items()}
    content["ids"] = torch.tensor([int(example_id) for example_id in ids], dtype=torch.int64)
    content["digests"] = torch.tensor(digests, dtype=torch.int64)
    atomic_write(path, lambda temp: save_file(content, temp))
    return _shard_record(path)


def _check_indexed_rows(
    part: Iterable[dict[str, Any]], shards: list[ShardRecord], directory: Path, metadata: IndexMetadata
) -> None:
    """Refuse to resume on other data: the rows already indexed must have the digests their shards recorded."""
    recorded = torch.cat(
        [read_safetensors(directory / shard.file, lambda name: name == "digests")["digests"] for shard in shards]
    )
    rows = itertools.islice(part, len(recorded))
    id_column = metadata.config.id_column
    digests = [
        row_digest(row, row.get(id_column, position), metadata.digest_columns) for position, row in enumerate(rows)
    ]
    if digests != recorded.tolist():
        raise ValueError(
            f"{directory} holds a partial index of other data: the first {len(recorded)} rows read now are not those "
            "it indexed. Resume with the same dataset, or choose another output_dir."
        )


def _shard_record(path: Path) -> ShardRecord:
    try:
        num_examples = len(read_safetensors(path, lambda name: name == "ids")["ids"])
    except (ValueError, KeyError) as error:
        raise ValueError(f"Partial shard {path} is corrupt ({error}); delete it to rebuild it.") from error
    return ShardRecord(path.name, num_examples)


def _merge_rank_parts(directory: Path, world: int, metadata: IndexMetadata) -> list[ShardRecord]:
    """Rewrite the ranks' partial shards as one sequence in example-id order, a shard at a time."""
    parts = [record for rank in range(world) for record in _partial_shards(directory, f"partial-rank{rank:03d}-")]
    if not parts:
        raise ValueError("The dataset is empty: there are no training examples to index.")
    part_ids = [read_safetensors(directory / part.file, lambda name: name == "ids")["ids"] for part in parts]
    all_ids = torch.cat(part_ids)
    unique, counts = all_ids.unique(return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"The dataset's ids are not unique: e.g. id {unique[counts > 1][0].item()} is indexed twice.")
    sources = torch.cat([torch.full((len(ids),), number) for number, ids in enumerate(part_ids)])
    rows = torch.cat([torch.arange(len(ids)) for ids in part_ids])
    order = all_ids.argsort(stable=True)
    shards, loaded = [], {}
    for number, start in enumerate(range(0, len(order), metadata.examples_per_shard)):
        selected = order[start : start + metadata.examples_per_shard]
        content: dict[str, torch.Tensor] = {}
        for source in sources[selected].unique().tolist():
            if source not in loaded:
                loaded = {source: read_safetensors(directory / parts[source].file)}  # one part in memory
            mask = sources[selected] == source
            for name, value in loaded[source].items():
                content.setdefault(name, torch.empty((len(selected), *value.shape[1:]), dtype=value.dtype))
                content[name][mask] = value[rows[selected][mask]]
        path = directory / f"partial-{number:05d}.safetensors"
        atomic_write(path, lambda temp, content=content: save_file(content, temp))
        shards.append(_shard_record(path))
    for part in parts:
        (directory / part.file).unlink()
    return shards


def _finish(directory: Path, shards: list[ShardRecord], metadata: IndexMetadata) -> None:
    """Rename partial shards to their final `-of-n` names and write the card and config.json last."""
    if not shards:
        raise ValueError("The dataset is empty: there are no training examples to index.")
    final = []
    for number, shard in enumerate(shards):
        name = f"index-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(directory / shard.file, directory / name)
        final.append(ShardRecord(name, shard.num_examples))
    digests = [read_safetensors(directory / shard.file, lambda name: name == "digests")["digests"] for shard in final]
    count = sum(shard.num_examples for shard in final)
    dataset = replace(metadata.dataset, digest=describe(count, combine(torch.cat(digests).tolist())))
    metadata = replace(metadata, num_examples=count, shards=tuple(final), dataset=dataset)
    files = {shard.file: FileRecord.of(directory / shard.file) for shard in final}
    if metadata.config.compression == "eigenbasis":
        files[BASIS_FILE] = FileRecord.of(directory / BASIS_FILE)
    index = GradientIndex(ArtifactFiles(open_repo(directory, GradientIndex.REPO_TYPE), files), metadata)
    index._write_description(directory, metadata, files)
    (directory / BUILD_STATE_NAME).unlink(missing_ok=True)
