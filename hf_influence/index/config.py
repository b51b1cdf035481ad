"""What a gradient index is built with (`IndexConfig`) and what its config.json records (`IndexMetadata`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..compression import COMPRESSIONS, SKETCH_NEEDS_WHITENING
from ..deprecation import renamed_fields
from ..estimators import DEFAULT_ESTIMATOR, Estimator
from ..provenance import DatasetSource, ModelProvenance
from ..validation import check_choice, check_int, check_regex, check_str

QUANTIZE_BITS = (8,)


@renamed_fields(num_draws="draws_per_example")
@dataclass(frozen=True)
class IndexConfig:
    """How to build a gradient index.

    Attributes:
        draws_per_example: (t, ε) draws averaged into each training example's gradient (K); the paper uses 250.
        batch_size: draws per forward/backward pass.
        seed: seeds the draws (with each example's id) and the projections.
        compression: "none" (exact), "svd" (rank `rank` per layer), "projection" (Kronecker Gaussian
            projection to `projection_dim` per side of each layer) or "eigenbasis" (SVD of each gradient whitened
            in the factors' eigenbasis: `build_index(..., factors=...)`; per-layer ranks under a budget).
        rank: the rank kept per layer and example by compression="svd" (and "eigenbasis" without a budget).
        projection_dim: the dimension each side of a layer is projected to by compression="projection".
        quantize_bits: 8 to quantise whatever is stored to 8 bits per value; None keeps fp32.
        shard_size: examples per shard (the unit of resumption and of streaming at query time).
        max_shard_bytes: an upper bound on a shard file's size (fewer examples per shard when the
            compressed gradients are large); None bounds shards by `shard_size` only.
        module_filter: regex on layer names; must select the layers the factors were fitted on.
        id_column: the dataset column with stable integer ids (row positions when missing).
        max_bytes_per_example: a byte budget for one example's stored gradients: the build chooses the
            compression that meets it (the exact gradients when they fit; else, given factors, 8-bit "eigenbasis"
            with per-layer ranks chosen from a sample of gradients, the best on the LDS benchmark; without
            factors, 8-bit SVD at the largest rank that fits), records it in `compression` / `rank` /
            `quantize_bits`, and the index's `bytes_per_example`; None uses those as given.
        estimator: how each example's draws are chosen (`estimators.py`): "common" random numbers (the
            default: the same draws for every example and query, the best of the options on the LDS benchmark
            at every draw count), "plain" Monte Carlo, or options joined by "+" ("stratified", "antithetic",
            "common"); queries against the index use the same.
        search_dim: values of each example's search sketch (`sketch.py`, bf16: 2 bytes each, inside the budget):
            a search then scores every example by its sketch and rescores the best candidates exactly (about a
            second over a million 16 KB examples, against minutes); None stores no sketch (every search exhaustive).
    """

    draws_per_example: int = 250
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
    estimator: str = DEFAULT_ESTIMATOR
    max_bytes_per_example: int | None = None
    search_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("draws_per_example", "batch_size", "shard_size", "rank", "projection_dim"):
            object.__setattr__(self, name, check_int(f"IndexConfig.{name}", getattr(self, name), minimum=1))
        object.__setattr__(self, "seed", check_int("IndexConfig.seed", self.seed))
        check_choice("IndexConfig.compression", self.compression, COMPRESSIONS)
        if self.quantize_bits is not None:
            check_choice("IndexConfig.quantize_bits", self.quantize_bits, QUANTIZE_BITS)
        if self.max_shard_bytes is not None:
            object.__setattr__(
                self, "max_shard_bytes", check_int("IndexConfig.max_shard_bytes", self.max_shard_bytes, minimum=1)
            )
        if self.max_bytes_per_example is not None:
            budget = check_int("IndexConfig.max_bytes_per_example", self.max_bytes_per_example, minimum=1)
            object.__setattr__(self, "max_bytes_per_example", budget)
            if self.compression == "projection":
                raise ValueError(
                    "IndexConfig.max_bytes_per_example chooses the compression (exact, eigenbasis or SVD): leave "
                    "compression='projection' out, or drop the budget."
                )
        if self.search_dim is not None:
            object.__setattr__(self, "search_dim", check_int("IndexConfig.search_dim", self.search_dim, minimum=1))
            if self.max_bytes_per_example is not None and self.sketch_bytes >= self.max_bytes_per_example:
                raise ValueError(
                    f"IndexConfig.search_dim={self.search_dim} takes {self.sketch_bytes} bytes per example, the whole "
                    f"max_bytes_per_example={self.max_bytes_per_example}: lower it or raise the budget."
                )
            if self.max_bytes_per_example is None and self.compression != "eigenbasis":
                raise ValueError(
                    f"IndexConfig.search_dim needs compression='eigenbasis' (or a max_bytes_per_example budget, which "
                    f"chooses it given the factors), not {self.compression!r}: {SKETCH_NEEDS_WHITENING}"
                )
        check_regex("IndexConfig.module_filter", self.module_filter)
        check_str("IndexConfig.id_column", self.id_column)
        Estimator.named(self.estimator)

    @property
    def sketch_bytes(self) -> int:
        """Bytes of one example's search sketch (0 without one)."""
        return 2 * (self.search_dim or 0)

    @property
    def gradient_budget(self) -> int | None:
        """The byte budget left for one example's compressed gradients once its sketch is stored."""
        return None if self.max_bytes_per_example is None else self.max_bytes_per_example - self.sketch_bytes


@dataclass(frozen=True)
class ShardRecord:
    """One shard file and the number of examples it holds (its size and checksum are in the index's `files`)."""

    file: str
    num_examples: int


@dataclass(frozen=True)
class IndexMetadata:
    """What config.json records about a gradient index, besides the files.

    Attributes:
        config: the IndexConfig it was built with (its fields stand at config.json's top level).
        modules: the indexed layers' qualified names.
        shapes: each layer's weight shape (d_out, d_in).
        examples_per_shard: examples per shard (the last may hold fewer).
        model: the pipeline and weights the gradients were taken on.
        dataset: the training set they were taken on.
        num_examples: the indexed examples.
        shards: the shards in id order.
        digest_columns: the dataset columns each example's row digest covers (`row_digests.py`); empty for indices
            of format version 1, which stored no digests.
        bytes_per_example: what one example's stored gradients and search sketch take (the shards' tensors, ids
            and header apart);
            None for indices built before it was recorded.
    """

    config: IndexConfig = field(metadata={"flatten": True})
    modules: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    examples_per_shard: int
    model: ModelProvenance
    dataset: DatasetSource
    num_examples: int = 0
    shards: tuple[ShardRecord, ...] = ()
    digest_columns: tuple[str, ...] = ()
    bytes_per_example: int | None = None


def migrate_v1(config: dict[str, Any]) -> dict[str, Any]:
    """Format version 1 → 2: `num_draws` is named `draws_per_example`; shard sizes and checksums move to `files`;
    fields added during version 1 get the values that indices without them meant."""
    config = dict(config)
    config["draws_per_example"] = config.pop("num_draws")
    shards = config.pop("shards")
    config["shards"] = [{"file": shard["file"], "num_examples": shard["num_examples"]} for shard in shards]
    config["files"] = {shard["file"]: {"size": shard["size"], "blake2b": shard["blake2b"]} for shard in shards}
    config.setdefault("examples_per_shard", config["shard_size"])
    config.setdefault("max_shard_bytes", None)
    config.setdefault("estimator", "plain")  # the only estimator then (the default is now "common")
    config.setdefault("dataset", {"repo_id": None, "revision": None, "split": None, "id_column": config["id_column"]})
    config["model"] = {"repo_id": None, "revision": None, **config["model"]}
    return config
