"""`InfluenceFactors`: the fitted (E)K-FAC curvature of a denoiser, saved as config.json + safetensors.

Tensor names follow `design.md`: `"{module}.{kind}"` with kinds `activation_covariance`,
`gradient_covariance`, `activation_eigenvectors`, `gradient_eigenvectors`, `eigenvalues`
(EK-FAC, d_out × d_in) and `bias_eigenvalues`; K-FAC stores `activation_eigenvalues` and
`gradient_eigenvalues` instead of the corrected ones.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .cards import factors_card
from .curvature.inverse import Layer
from .curvature.large_layers import activation_rank
from .files import atomic_write, atomic_write_text, read_config
from .hub import open_repo, push_folder
from .provenance import describe_mismatch, model_provenance

if TYPE_CHECKING:
    from .task import DiffusionTask

FORMAT = "hf_influence.factors"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "factors.safetensors"  # one file; larger factors are sharded as factors-0000k-of-0000n
WEIGHTS_PATTERN = "factors{suffix}.safetensors"
WEIGHTS_INDEX_NAME = "factors.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
STORAGE_DTYPES = ("float32", "float64", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass
class FactorConfig:
    """How to fit the curvature. The defaults are the paper's recommended method.

    Attributes:
        strategy: "ekfac" (eigenvalue-corrected, default) or "kfac".
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

    def __post_init__(self) -> None:
        choices = {
            "strategy": ("ekfac", "kfac"),
            "approx": ("expand", "reduce"),
            "ggn": ("model", "loss"),
            "output_curvature": ("mc", "exact"),
            "dtype": ("float32", "float64"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"FactorConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.draws_per_example < 1 or self.batch_size < 1:
            raise ValueError("draws_per_example and batch_size must be at least 1.")
        if self.large_layer_rank < 1 or (self.max_factor_size is not None and self.max_factor_size < 1):
            raise ValueError("large_layer_rank and max_factor_size must be at least 1.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class InfluenceFactors:
    """Per-layer curvature factors with the metadata needed to use them safely.

    `config` is what config.json holds: the FactorConfig fields, `num_draws` (draws per pass, the
    normaliser), `modules` (names in order), their `shapes`, and the model's `fingerprint`.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def modules(self) -> list[str]:
        return list(self.config["modules"])

    @property
    def strategy(self) -> str:
        return self.config["strategy"]

    def layer(self, module: str) -> Layer:
        """The tensors of one module, keyed by kind; half-precision storage is upcast for fp32 maths."""
        prefix = f"{module}."
        return {
            name[len(prefix) :]: value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
            for name, value in self.tensors.items()
            if name.startswith(prefix)
        }

    def layers(self) -> Iterator[tuple[str, Layer]]:
        for module in self.modules:
            yield module, self.layer(module)

    def to(self, device: torch.device | str) -> InfluenceFactors:
        return InfluenceFactors(self.config, {name: value.to(device) for name, value in self.tensors.items()})

    # ------------------------------------------------------------------ checks

    def check_compatible(self, task: DiffusionTask, force: bool = False) -> None:
        """Refuse factors fitted on another model: layer names and shapes, then the weights' fingerprint."""
        from .curvature.layers import find_layers, layer_kind

        layers = find_layers(task.denoiser, None)
        problems = []
        for module, shape in self.config["shapes"].items():
            if module not in layers:
                problems.append(f"layer {module!r} does not exist in the denoiser")
            elif list(layer_kind(layers[module]).weight_shape(layers[module])) != list(shape):
                actual = layer_kind(layers[module]).weight_shape(layers[module])
                problems.append(f"layer {module!r} has weight shape {tuple(actual)}, the factors {tuple(shape)}")
        if problems:
            raise ValueError("These factors do not fit the denoiser: " + "; ".join(problems[:5]) + ".")
        recorded, actual = self.config.get("model", {}), model_provenance(task)
        if recorded.get("fingerprint") != actual["fingerprint"] and not force:
            raise ValueError(
                f"These factors were fitted on another model ({describe_mismatch(recorded, actual)}): the "
                "denoiser's weights differ. Refit the factors for this model, or pass force=True if you know the "
                "difference does not matter."
            )

    # ------------------------------------------------------------------ serialisation

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        keep_covariances: bool = True,
        eigenvector_dtype: str | None = None,
        repo_id: str | None = None,
    ) -> list[str]:
        """Write the factors (sharded when above `max_shard_size`), config.json and a model card, each file
        atomically; returns the written file names.

        Storage policies: `keep_covariances=False` drops A and G (scoring needs only eigenvectors and
        eigenvalues: about half the bytes); `eigenvector_dtype="bfloat16"` or `"float16"` halves the
        eigenvectors again (they are upcast to fp32 for the maths when used).
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self._stored_tensors(keep_covariances, eigenvector_dtype)
        split = split_torch_state_dict_into_shards(
            tensors, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size
        )
        files = {}
        for filename, names in split.filename_to_tensors.items():
            shard = {name: tensors[name] for name in names}
            atomic_write(directory / filename, lambda path, shard=shard: save_file(shard, path, {"format": "pt"}))
            files[filename] = (directory / filename).stat().st_size
        if split.is_sharded:
            weight_map = json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2)
            atomic_write_text(directory / WEIGHTS_INDEX_NAME, weight_map)
            files[WEIGHTS_INDEX_NAME] = (directory / WEIGHTS_INDEX_NAME).stat().st_size
        storage = {"covariances": keep_covariances, "eigenvector_dtype": eigenvector_dtype or self.config["dtype"]}
        config = {**self.config, "storage": storage, "files": files}
        atomic_write_text(directory / "README.md", factors_card(config, repo_id))
        text = json.dumps(config, indent=2, sort_keys=True)
        atomic_write_text(directory / CONFIG_NAME, text)
        for stale in {*directory.glob("factors*.safetensors"), directory / WEIGHTS_INDEX_NAME}:
            if stale.name not in files:
                stale.unlink(missing_ok=True)  # left by an earlier save with another number of shards
        return [CONFIG_NAME, "README.md", *files]

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload influence factors with hf_influence",
        create_pr: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        keep_covariances: bool = True,
        eigenvector_dtype: str | None = None,
    ) -> Any:
        """Save to a temporary folder and upload it as one commit to the model repo `repo_id` (created
        if needed); shards of an earlier push that this one replaces are deleted. Returns the `CommitInfo`."""
        with tempfile.TemporaryDirectory() as folder:
            files = self.save_pretrained(folder, max_shard_size, keep_covariances, eigenvector_dtype, repo_id)
            return push_folder(
                folder,
                repo_id,
                "model",
                files,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
                stale_patterns=["factors*.safetensors", WEIGHTS_INDEX_NAME],
            )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        task: DiffusionTask | None = None,
        force: bool = False,
        revision: str | None = None,
        modules: Sequence[str] | None = None,
        mmap: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        repo_type: str = "model",
    ) -> InfluenceFactors:
        """Load factors from a local folder or a Hub repo (at `revision`), downloading only the shards
        needed; with `task`, check they belong to its denoiser (`force=True` skips the weights check).

        `modules` loads a subset of the layers; `mmap=True` maps the files instead of reading them, so
        only the pages used are read (large factors, local or cached).
        """
        repo = open_repo(path_or_repo_id, repo_type, revision, token, cache_dir, local_files_only)
        config = read_config(repo.fetch(CONFIG_NAME).parent, FORMAT, FORMAT_VERSION, "InfluenceFactors")
        wanted = list(config["modules"]) if modules is None else list(modules)
        unknown = sorted(set(wanted) - set(config["modules"]))
        if unknown:
            raise KeyError(f"The factors have no layers {unknown[:5]}; they cover {len(config['modules'])} layers.")
        selected = set(wanted)  # tensor names are "{module}.{kind}"; kinds have no dots
        files = config.get("files", {WEIGHTS_NAME: None})  # saves before sharding had one file and no sizes
        if WEIGHTS_INDEX_NAME in files:
            weight_map = json.loads(repo.fetch(WEIGHTS_INDEX_NAME, files[WEIGHTS_INDEX_NAME]).read_text())["weight_map"]
            needed = {weight_map[name] for name in weight_map if name.rsplit(".", 1)[0] in selected}
        else:
            needed = set(files)
        tensors = {}
        for filename in sorted(needed):
            path = repo.fetch(filename, files.get(filename))
            tensors.update(_read_safetensors(path, lambda name: name.rsplit(".", 1)[0] in selected, mmap))
        config = {**config, "modules": wanted, "shapes": {name: config["shapes"][name] for name in wanted}}
        factors = cls(config, tensors)
        factors._check_tensors()
        if task is not None:
            factors.check_compatible(task, force=force)
        return factors

    def _stored_tensors(self, keep_covariances: bool, eigenvector_dtype: str | None) -> dict[str, torch.Tensor]:
        """The tensors to write under the storage policies, contiguous on the CPU."""
        if eigenvector_dtype not in (None, *STORAGE_DTYPES):
            raise ValueError(f"eigenvector_dtype must be one of {STORAGE_DTYPES}, got {eigenvector_dtype!r}.")
        tensors = {}
        for name, value in self.tensors.items():
            if not keep_covariances and name.endswith("_covariance"):
                continue
            if eigenvector_dtype is not None and name.endswith("_eigenvectors"):
                value = value.to(getattr(torch, eigenvector_dtype))
            tensors[name] = value.detach().to("cpu").contiguous()
        return tensors

    def _check_tensors(self) -> None:
        needed = ["activation_eigenvectors", "gradient_eigenvectors"]
        needed += ["eigenvalues"] if self.strategy == "ekfac" else ["activation_eigenvalues", "gradient_eigenvalues"]
        residual = "residual_eigenvalues" if self.strategy == "ekfac" else "activation_residual_eigenvalue"
        for module, (d_out, d_in) in self.config["shapes"].items():
            layer = self.layer(module)
            rank = activation_rank(d_in, self.config.get("max_factor_size"), self.config.get("large_layer_rank", d_in))
            missing = [kind for kind in needed + ([residual] if rank < d_in else []) if kind not in layer]
            if missing:
                raise ValueError(f"The factors file lacks {missing} for layer {module!r}: it is incomplete.")
            if layer["gradient_eigenvectors"].shape != (d_out, d_out) or layer["activation_eigenvectors"].shape != (
                d_in,
                rank,
            ):
                raise ValueError(f"The factors of layer {module!r} do not have the shapes its config records.")
            if not all(torch.isfinite(value).all() for value in layer.values()):
                raise ValueError(f"The factors of layer {module!r} contain NaN or infinite values.")


def _read_safetensors(path: Path, keep: Callable[[str], bool], mmap: bool) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file whose names pass `keep`; memory-mapped with `mmap`."""
    try:
        with safe_open(path, framework="pt") as handle:
            names = [name for name in handle.keys() if keep(name)]  # noqa: SIM118
            if not mmap:
                return {name: handle.get_tensor(name) for name in names}
    except SafetensorError as error:
        raise ValueError(f"Cannot read {path}: {error}. The file is corrupt or truncated.") from error
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)[8 + header_size :]
    tensors = {}
    for name in names:
        start, end = header[name]["data_offsets"]
        dtype = SAFETENSORS_DTYPES[header[name]["dtype"]]
        tensors[name] = data[start:end].view(dtype).view(header[name]["shape"])
    return tensors
