"""`GradientIndex`: a finished index, read one shard at a time (from a local folder or a Hub repo).

The paper's "continual deployment" setting: the index holds raw training-loss gradients (not preconditioned),
so one index serves any damping and refitted factors; queries are preconditioned. (compression="eigenbasis"
stores them whitened in the factors' eigenbasis, saved beside the shards as `compression.safetensors`: still any
damping.) Shards
`index-0000k-of-0000n.safetensors` hold a contiguous block of examples and their `ids`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..artifacts import ArtifactFiles, ModelArtifact
from ..cards import index_card
from ..compression import Compressor, Stored, make_compressor
from ..eigenbasis_compression import BASIS_FILE, compressor_from_tensors
from ..files import atomic_write
from ..row_digests import check_rows
from ..tensor_files import read_safetensors
from .config import IndexMetadata, migrate_v1
from .sketch import SKETCH_KEY, SearchSketch

SHARD_PATTERN = "index-*.safetensors"


class GradientIndex(ModelArtifact):
    """Every training example's compressed gradient, with the metadata to use them safely."""

    FORMAT = "hf_influence.index"
    FORMAT_VERSION = 2
    REPO_TYPE = "dataset"
    DESCRIPTION = "gradient index"
    METADATA = IndexMetadata
    DATA_FILES = (SHARD_PATTERN, BASIS_FILE)
    MIGRATIONS: ClassVar[dict] = {1: migrate_v1}

    def __init__(self, files: ArtifactFiles, metadata: IndexMetadata) -> None:
        self.files = files
        self.metadata = metadata
        self._digests: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._sketch_column: torch.Tensor | None = None
        config = metadata.config
        self.sketch = None if config.search_dim is None else SearchSketch(config.search_dim, config.seed)
        shapes = {name: tuple(shape) for name, shape in metadata.shapes.items()}
        eigenbasis = None
        if metadata.config.compression == "eigenbasis":
            eigenbasis = compressor_from_tensors(read_safetensors(files.path(BASIS_FILE)), self.modules)
        self.compressor: Compressor = make_compressor(metadata.config, shapes, eigenbasis)
        # Each layer's shape where its stored and query-side forms are compared (what the search sketch projects).
        self.space_shapes = {name: self.compressor.space_shape(name, *shape) for name, shape in shapes.items()}

    def __len__(self) -> int:
        return self.metadata.num_examples

    def __repr__(self) -> str:
        return f"GradientIndex({len(self)} examples, {self.metadata.config.compression}, {self.files.repo.describe()})"

    @property
    def config(self) -> Any:
        """The IndexConfig it was built with."""
        return self.metadata.config

    @property
    def modules(self) -> list[str]:
        return list(self.metadata.modules)

    @property
    def directory(self) -> Path:
        return self.files.directory

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def _read(cls, files: ArtifactFiles, metadata: IndexMetadata) -> GradientIndex:
        """From the Hub, every shard is downloaded now and its size checked, so a truncated download is refused
        at once; each shard's checksum is verified the first time it is read."""
        for shard in metadata.shards:
            files.path(shard.file, verify=False)
        return cls(files, metadata)

    def _write_data(self, directory: Path, staging: bool = False) -> tuple[list[str], IndexMetadata]:
        """Copy the shards (link them into a staging folder for upload: they can be large)."""
        names = [shard.file for shard in self.metadata.shards]
        if self.config.compression == "eigenbasis":
            names.append(BASIS_FILE)
        if directory.resolve() != self.directory.resolve():
            for name in names:
                source = self.files.path(name, verify=False).resolve()
                if staging:
                    os.symlink(source, directory / name)
                else:
                    atomic_write(directory / name, lambda temp, source=source: shutil.copyfile(source, temp))
        return names, self.metadata

    def _card(self, metadata: IndexMetadata, repo_id: str | None) -> str:
        return index_card(metadata, repo_id)

    # ------------------------------------------------------------------ reading

    def iter_shards(self) -> Iterator[tuple[torch.Tensor, dict[str, Stored]]]:
        """(ids, {module: stored tensors}) per shard, one shard in memory at a time; a shard's checksum is verified
        the first time this index reads it, so repeated queries cost no hashing."""
        for shard in self.metadata.shards:
            path = self.files.path(shard.file)
            try:
                tensors = read_safetensors(path)
            except ValueError as error:
                raise ValueError(f"Index shard {path} cannot be read: it is corrupt. ({error})") from error
            tensors.pop("digests", None)
            tensors.pop(SKETCH_KEY, None)
            yield tensors.pop("ids"), _split_modules(tensors, self.modules)

    def scores(self, queries: dict[str, Stored]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inner products `(Q, N)` of query-side forms (see `compression.py`) with every indexed
        example, streamed shard by shard, and the examples' ids `(N,)`."""
        columns, ids = [], []
        for shard_ids, stored in self.iter_shards():
            columns.append(sum(self.compressor.scores(name, queries[name], stored[name]) for name in queries))
            ids.append(shard_ids)
        return torch.cat(columns, dim=1).to(torch.float32), torch.cat(ids)

    def search(self, queries: dict[str, Stored], candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores `(Q, N)` as `scores` gives them, but exact only where `exact` `(N,)` is set: every example is
        scored by its search sketch (`sketch.py`), and each query's `candidates` best and worst by that estimate
        are rescored exactly from their entries (read from the memory-mapped shards). Returns (scores, ids,
        exact); an index without a sketch, or with no more than 2 × `candidates` examples, scores all exactly."""
        if self.sketch is None or 2 * candidates >= len(self):
            scores, ids = self.scores(queries)
            return scores, ids, torch.ones(len(ids), dtype=torch.bool)
        estimates = (self.sketch.of(queries, self.space_shapes).to(torch.bfloat16) @ self.sketch_column().T).float()
        chosen = torch.cat([estimates.topk(candidates, dim=1).indices, (-estimates).topk(candidates, dim=1).indices])
        positions = chosen.unique()  # sorted, each read once for every query
        exact = torch.zeros(len(self), dtype=torch.bool)
        exact[positions] = True
        estimates[:, positions] = self._exact_scores(queries, positions)
        return estimates, self.ids(), exact

    def _exact_scores(self, queries: dict[str, Stored], positions: torch.Tensor) -> torch.Tensor:
        """`(Q, len(positions))` exact scores of the examples at sorted `positions`, reading only their rows (gathered
        from every shard first, then scored once per layer)."""
        rows: dict[str, list[torch.Tensor]] = {}
        start = 0
        for shard in self.metadata.shards:
            local = positions[(positions >= start) & (positions < start + shard.num_examples)] - start
            start += shard.num_examples
            if not len(local):
                continue
            path = self.files.path(shard.file)
            tensors = read_safetensors(path, lambda name: name not in ("ids", "digests", SKETCH_KEY), mmap=True)
            for name, tensor in tensors.items():
                rows.setdefault(name, []).append(tensor[local])
        stored = _split_modules({name: torch.cat(parts) for name, parts in rows.items()}, self.modules)
        return sum(self.compressor.scores(name, queries[name], stored[name]) for name in queries).to(torch.float32)

    def sketch_column(self) -> torch.Tensor:
        """`(N, search_dim)` bf16: every example's search sketch, read once and kept."""
        if self._sketch_column is None:
            self._sketch_column = self._column(SKETCH_KEY)
        return self._sketch_column

    def ids(self) -> torch.Tensor:
        """`(N,)` the indexed examples' ids, read once and kept."""
        if self._ids is None:
            self._ids = self._column("ids")
        return self._ids

    def row_digests(self) -> torch.Tensor | None:
        """Each example's row digest (`row_digests.py`), in the order of `ids()`; None for a format-1 index."""
        if not self.metadata.digest_columns:
            return None
        if self._digests is None:
            self._digests = self._column("digests")
        return self._digests

    def _column(self, name: str) -> torch.Tensor:
        """One per-example tensor of every shard (ids, digests), without reading the gradients."""
        paths = [self.files.path(shard.file) for shard in self.metadata.shards]
        return torch.cat([read_safetensors(path, lambda tensor: tensor == name)[name] for path in paths])

    def check_dataset(self, dataset: Iterable[dict[str, Any]]) -> None:
        """Refuse a dataset that is not the one indexed: other ids (another dataset, split or order), or rows with
        the same ids but other contents (their digests differ)."""
        id_column = self.config.id_column
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
        digests = self.row_digests()
        if digests is not None:
            check_rows(list(dataset), index_ids, digests.tolist(), self.metadata.digest_columns)


def _split_modules(tensors: dict[str, torch.Tensor], modules: list[str]) -> dict[str, Stored]:
    """Shard tensor names are `{module}.{key}`; module names contain dots, so match known modules."""
    by_module: dict[str, Stored] = {module: {} for module in modules}
    for module in sorted(modules, key=len, reverse=True):
        prefix = f"{module}."
        for name in [name for name in tensors if name.startswith(prefix)]:
            by_module[module][name[len(prefix) :]] = tensors.pop(name)
    return by_module
