"""`InfluenceFactors`: the fitted curvature of a denoiser, saved as config.json + safetensors (+ a model card).

Tensor names follow `design.md`: `"{module}.{kind}"` with the kinds of `LayerFactors` (`activation_covariance`,
`gradient_covariance`, `activation_eigenvectors`, `gradient_eigenvectors`, EK-FAC's corrected `eigenvalues`,
K-FAC's `activation_eigenvalues` / `gradient_eigenvalues`, `bias_eigenvalues`, and the truncated large layers'
residual eigenvalues). Which kinds a layer holds is its strategy's business (`curvature/strategies.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from .artifacts import ArtifactFiles, ModelArtifact
from .cards import factors_card
from .curvature.large_layers import activation_rank
from .curvature.layer_factors import LayerFactors, flatten_layers, unflatten_layers
from .curvature.layers import find_layers, layer_kind
from .curvature.probes import GGN_KINDS, OUTPUT_CURVATURES
from .curvature.statistics import APPROXIMATIONS
from .curvature.strategies import STRATEGIES, CurvatureStrategy, Gradients, get_strategy
from .files import atomic_write, atomic_write_text
from .provenance import DatasetSource, ModelProvenance
from .task import DiffusionTask
from .tensor_files import read_safetensors
from .validation import check_choice, check_int, check_regex, check_str, check_type

WEIGHTS_NAME = "factors.safetensors"  # one file; larger factors are sharded as factors-0000k-of-0000n
WEIGHTS_PATTERN = "factors{suffix}.safetensors"
WEIGHTS_INDEX_NAME = "factors.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
FACTOR_DTYPES = ("float32", "float64")
LARGE_LAYER_SOLVERS = ("eigh", "randomized")
STORAGE_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class FactorConfig:
    """How to fit the curvature. The defaults are the paper's recommended method.

    Attributes:
        strategy: "ekfac" (eigenvalue-corrected, default), "kfac", or "identity" (no curvature: scores are
            gradient dot products; nothing is fitted).
        approx: "expand" (default; weight-sharing positions act as data) or "reduce".
        ggn: "model" (default; MC Fisher of the denoiser output, GGN^model) or "loss" (GGN^loss:
            outer products of per-draw loss gradients, with the true noise as target).
        output_curvature: with ggn="model", how the loss's curvature `2/D I` in the denoiser output
            enters: "mc" (default; one Monte-Carlo probe ξ per draw, as the paper) or "exact" (D
            backward passes per draw, one per output element: only for small models and tests).
        draws_per_example: (t, ε) draws per training example for the covariances; EK-FAC uses as
            many independent draws again for the eigenvalue correction.
        batch_size: draws per forward/backward pass.
        seed: seeds every draw (together with each example's id).
        module_filter: regex searched in the qualified layer names; None takes every Linear/Conv2d.
        dtype: accumulation and storage dtype ("float32" or "float64"); eigh always runs in fp64.
        id_column: the dataset column with stable example ids.
        max_factor_size: layers whose activation factor is larger than this (d_in > max_factor_size) keep
            only its `large_layer_rank` leading eigenvectors, the rest of the spectrum replaced by the mean
            of the discarded eigenvalues (see `curvature/large_layers.py`); None (default) keeps every factor
            exact.
        large_layer_rank: the eigenvectors kept for the activation factor of a layer over max_factor_size.
        large_layer_solver: how those are found: "eigh" (the full fp64 eigendecomposition, then the leading pairs)
            or "randomized" (randomized subspace iteration: never forms the d_in × d_in eigenvector matrix;
            `curvature/eigen.py`).
        module_partitions: fit the layers in this many groups (balanced by factor bytes), one group per pass
            over the data, so the covariances held at once are those of the largest group: peak memory for
            time. The factors are the same for any number of partitions (every draw is seeded by its example).
    """

    strategy: str = "ekfac"
    approx: str = "expand"
    ggn: str = "model"
    output_curvature: str = "mc"
    draws_per_example: int = 1
    batch_size: int = 64
    seed: int = 0
    module_filter: str | None = None
    dtype: str = "float32"
    id_column: str = "id"
    max_factor_size: int | None = None
    large_layer_rank: int = 1024
    large_layer_solver: str = "eigh"
    module_partitions: int = 1

    def __post_init__(self) -> None:
        check_choice("FactorConfig.strategy", self.strategy, sorted(STRATEGIES))
        check_choice("FactorConfig.approx", self.approx, APPROXIMATIONS)
        check_choice("FactorConfig.ggn", self.ggn, GGN_KINDS)
        check_choice("FactorConfig.output_curvature", self.output_curvature, OUTPUT_CURVATURES)
        check_choice("FactorConfig.dtype", self.dtype, FACTOR_DTYPES)
        check_choice("FactorConfig.large_layer_solver", self.large_layer_solver, LARGE_LAYER_SOLVERS)
        for name in ("draws_per_example", "batch_size", "large_layer_rank", "module_partitions"):
            object.__setattr__(self, name, check_int(f"FactorConfig.{name}", getattr(self, name), minimum=1))
        object.__setattr__(self, "seed", check_int("FactorConfig.seed", self.seed))
        if self.max_factor_size is not None:
            object.__setattr__(
                self, "max_factor_size", check_int("FactorConfig.max_factor_size", self.max_factor_size, minimum=1)
            )
        check_regex("FactorConfig.module_filter", self.module_filter)
        check_str("FactorConfig.id_column", self.id_column)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def curvature(self) -> CurvatureStrategy:
        return get_strategy(self.strategy)


@dataclass(frozen=True)
class StoragePolicy:
    """How the saved file holds the factors: with or without the covariances, and the eigenvectors' dtype."""

    covariances: bool = True
    eigenvector_dtype: str = "float32"


@dataclass(frozen=True)
class FactorsMetadata:
    """What config.json records about factors, besides the files.

    Attributes:
        config: the FactorConfig they were fitted with (its fields stand at config.json's top level).
        total_draws: draws per fitting pass over the whole dataset — the normaliser of every factor.
        modules: the fitted layers' qualified names, in fitting order.
        shapes: each layer's weight shape (d_out, d_in).
        model: the pipeline and weights they were fitted on.
        dataset: the training set they were fitted on.
        storage: how they were saved.
    """

    config: FactorConfig = field(metadata={"flatten": True})
    total_draws: int
    modules: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    model: ModelProvenance
    dataset: DatasetSource
    storage: StoragePolicy = field(default_factory=StoragePolicy)


def _migrate_v1(config: dict[str, Any]) -> dict[str, Any]:
    """Format version 1 → 2: `num_draws` is named `total_draws`; `files` maps to sizes and checksums (version 1
    recorded sizes only, and its first saves no files at all); fields added during version 1 get the values
    that saves without them meant."""
    config = dict(config)
    config["total_draws"] = config.pop("num_draws")
    sizes = config.pop("files", {WEIGHTS_NAME: None})
    config["files"] = {name: {"size": size, "blake2b": None} for name, size in sizes.items()}
    config.setdefault("output_curvature", "mc")
    config.setdefault("max_factor_size", None)
    config.setdefault("large_layer_rank", 1024)
    config.setdefault("storage", {"covariances": True, "eigenvector_dtype": config["dtype"]})
    config.setdefault("dataset", {"repo_id": None, "revision": None, "split": None, "id_column": config["id_column"]})
    config["model"] = {"repo_id": None, "revision": None, **config["model"]}
    return config


class InfluenceFactors(ModelArtifact):
    """Per-layer curvature factors of a denoiser, with the metadata needed to use them safely.

    `metadata` is what config.json records (`FactorsMetadata`); `layers` the typed factors of each layer.
    """

    FORMAT = "hf_influence.factors"
    FORMAT_VERSION = 2
    REPO_TYPE = "model"
    DESCRIPTION = "influence factors"
    METADATA = FactorsMetadata
    DATA_FILES = ("factors*.safetensors", WEIGHTS_INDEX_NAME)
    MIGRATIONS: ClassVar[dict] = {1: _migrate_v1}

    def __init__(self, metadata: FactorsMetadata, layers: dict[str, LayerFactors]) -> None:
        missing = [name for name in metadata.modules if name not in layers]
        if missing:
            raise ValueError(f"No factors were given for layers {missing[:5]}.")
        self.metadata = metadata
        self.layers = {name: layers[name] for name in metadata.modules}

    def __repr__(self) -> str:
        return f"InfluenceFactors({self.strategy}, {len(self.modules)} layers, {self.metadata.total_draws} draws)"

    @classmethod
    def identity(
        cls, task: DiffusionTask, module_filter: str | None = None, dataset: DatasetSource | None = None
    ) -> InfluenceFactors:
        """Factors of the identity strategy over the layers `module_filter` selects: with them, influence scores
        are gradient dot products (the large-damping limit of influence). Nothing is fitted."""
        layers = find_layers(task.denoiser, module_filter)
        metadata = FactorsMetadata(
            config=FactorConfig(strategy="identity", module_filter=module_filter),
            total_draws=0,
            modules=tuple(layers),
            shapes={name: tuple(layer_kind(module).weight_shape(module)) for name, module in layers.items()},
            model=task.provenance(),
            dataset=dataset or DatasetSource(),
        )
        return cls(metadata, {name: LayerFactors() for name in layers})

    # ------------------------------------------------------------------ reading

    @property
    def config(self) -> FactorConfig:
        return self.metadata.config

    @property
    def modules(self) -> list[str]:
        return list(self.metadata.modules)

    @property
    def strategy(self) -> str:
        """The strategy's name ("ekfac", "kfac" or "identity")."""
        return self.metadata.config.strategy

    @property
    def curvature(self) -> CurvatureStrategy:
        """The strategy object that preconditions with these factors."""
        return self.metadata.config.curvature

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by its saved name `"{module}.{kind}"` (as stored: half-precision eigenvectors stay so)."""
        return flatten_layers(self.layers)

    def layer(self, module: str) -> LayerFactors:
        """One layer's factors, half-precision storage upcast for fp32 maths."""
        return self.layers[module].for_maths()

    def to(self, device: torch.device | str) -> InfluenceFactors:
        return InfluenceFactors(self.metadata, {name: layer.to(device) for name, layer in self.layers.items()})

    def precondition(self, module: str, weight: torch.Tensor, bias: torch.Tensor | None, damping: float) -> Gradients:
        """`(F̂ + λI)⁻¹` of batched gradients of one layer."""
        return self.curvature.precondition(self.layer(module), weight, bias, damping)

    def to_eigenbasis(self, module: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Gradients:
        return self.curvature.to_eigenbasis(self.layer(module), weight, bias)

    def precondition_in_eigenbasis(
        self, module: str, weight: torch.Tensor, bias: torch.Tensor | None, damping: float
    ) -> Gradients:
        return self.curvature.precondition_in_eigenbasis(self.layer(module), weight, bias, damping)

    # ------------------------------------------------------------------ saving (see Artifact.save_pretrained)

    def _write_data(
        self,
        directory: Path,
        staging: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        keep_covariances: bool = True,
        eigenvector_dtype: str | None = None,
    ) -> tuple[list[str], FactorsMetadata]:
        """The factors (sharded above `max_shard_size`) under the storage policies: `keep_covariances=False` drops
        A and G (scoring needs only eigenvectors and eigenvalues: about half the bytes); `eigenvector_dtype=
        "bfloat16"` or `"float16"` halves the eigenvectors again (they are upcast to fp32 for the maths)."""
        storage = StoragePolicy(keep_covariances, eigenvector_dtype or self.config.dtype)
        check_choice("eigenvector_dtype", storage.eigenvector_dtype, STORAGE_DTYPES)
        tensors = self._stored_tensors(storage)
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size
        )
        names = []
        for filename, tensor_names in split.filename_to_tensors.items():
            shard = {name: tensors[name] for name in tensor_names}
            atomic_write(directory / filename, lambda path, shard=shard: save_file(shard, path, {"format": "pt"}))
            names.append(filename)
        if split.is_sharded:
            weight_map = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            atomic_write_text(directory / WEIGHTS_INDEX_NAME, json.dumps(weight_map, indent=2))
            names.append(WEIGHTS_INDEX_NAME)
        return names, replace(self.metadata, storage=storage)

    def _stored_tensors(self, storage: StoragePolicy) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, value in self.tensors.items():
            if not storage.covariances and name.endswith("_covariance"):
                continue
            if name.endswith("_eigenvectors"):
                value = value.to(getattr(torch, storage.eigenvector_dtype))
            tensors[name] = value.detach().to("cpu").contiguous()
        return tensors

    def _card(self, metadata: FactorsMetadata, repo_id: str | None) -> str:
        return factors_card(metadata, repo_id)

    # ------------------------------------------------------------------ loading (see Artifact.from_pretrained)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        task: DiffusionTask | None = None,
        force: bool = False,
        revision: str | None = None,
        modules: Sequence[str] | None = None,
        mmap: bool = False,
        **hub_options: Any,
    ) -> InfluenceFactors:
        """Load factors from a local folder or a Hub repo (at `revision`), downloading only the shards
        needed; with `task`, check they belong to its denoiser (`force=True` skips the weights check).

        `modules` loads a subset of the layers; `mmap=True` maps the files instead of reading them, so only the
        pages used are read (large factors, local or cached). `hub_options`: token, cache_dir, local_files_only,
        repo_type."""
        return super().from_pretrained(
            path_or_repo_id, revision=revision, task=task, force=force, modules=modules, mmap=mmap, **hub_options
        )

    @classmethod
    def _read(
        cls,
        files: ArtifactFiles,
        metadata: FactorsMetadata,
        task: DiffusionTask | None = None,
        force: bool = False,
        modules: Sequence[str] | None = None,
        mmap: bool = False,
    ) -> InfluenceFactors:
        if modules is not None and (isinstance(modules, str) or not all(isinstance(name, str) for name in modules)):
            raise TypeError(f"modules must be a list of layer names, got {modules!r}.")
        if task is not None:
            check_type("task", task, DiffusionTask, "InfluenceFactors.from_pretrained(path_or_repo_id, task=...)")
        wanted = list(metadata.modules) if modules is None else list(modules)
        unknown = sorted(set(wanted) - set(metadata.modules))
        if unknown:
            raise KeyError(f"The factors have no layers {unknown[:5]}; they cover {len(metadata.modules)} layers.")
        selected = set(wanted)  # tensor names are "{module}.{kind}"; kinds have no dots
        tensors: dict[str, torch.Tensor] = {}
        for filename in cls._files_holding(files, selected):
            tensors.update(read_safetensors(files.path(filename), lambda n: n.rsplit(".", 1)[0] in selected, mmap))
        metadata = replace(metadata, modules=tuple(wanted), shapes={name: metadata.shapes[name] for name in wanted})
        factors = cls(metadata, unflatten_layers(tensors, wanted))
        factors._check_layers()
        if task is not None:
            factors.check_compatible(task, force=force)
        return factors

    @staticmethod
    def _files_holding(files: ArtifactFiles, modules: set[str]) -> list[str]:
        """The safetensors files holding the layers `modules` (all of them unless the factors are sharded)."""
        if WEIGHTS_INDEX_NAME not in files.records:
            return sorted(files.records)
        weight_map = json.loads(files.path(WEIGHTS_INDEX_NAME).read_text())["weight_map"]
        return sorted({weight_map[name] for name in weight_map if name.rsplit(".", 1)[0] in modules})

    def _check_layers(self) -> None:
        config = self.config
        for name, shape in self.metadata.shapes.items():
            rank = activation_rank(shape[1], config.max_factor_size, config.large_layer_rank)
            self.curvature.check(name, self.layers[name], shape, rank)
