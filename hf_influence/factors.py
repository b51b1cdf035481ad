"""`InfluenceFactors`: the fitted (E)K-FAC curvature of a denoiser, saved as config.json + safetensors.

Tensor names follow `design.md`: `"{module}.{kind}"` with kinds `activation_covariance`,
`gradient_covariance`, `activation_eigenvectors`, `gradient_eigenvectors`, `eigenvalues`
(EK-FAC, d_out × d_in) and `bias_eigenvalues`; K-FAC stores `activation_eigenvalues` and
`gradient_eigenvalues` instead of the corrected ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .curvature.inverse import Layer
from .files import atomic_write, read_config

if TYPE_CHECKING:
    from .task import DiffusionTask

FORMAT = "hf_influence.factors"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "factors.safetensors"


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
        """The tensors of one module, keyed by kind."""
        prefix = f"{module}."
        return {name[len(prefix) :]: value for name, value in self.tensors.items() if name.startswith(prefix)}

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
        expected = self.config.get("model", {}).get("fingerprint")
        if expected != task.fingerprint() and not force:
            raise ValueError(
                f"These factors were fitted on a model with fingerprint {expected}, but the task's denoiser "
                f"has fingerprint {task.fingerprint()}: its weights differ. Refit the factors for this model, "
                "or pass force=True if you know the difference does not matter."
            )

    # ------------------------------------------------------------------ serialisation

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json, factors.safetensors and a model card; each file atomically."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().to("cpu").contiguous() for name, value in self.tensors.items()}
        atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        config = json.dumps(self.config, indent=2, sort_keys=True)
        atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(config))
        atomic_write(directory / "README.md", lambda path: Path(path).write_text(self._model_card()))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, task: DiffusionTask | None = None, force: bool = False
    ) -> InfluenceFactors:
        """Load factors from a local folder; with `task`, check they belong to its denoiser."""
        directory = Path(path)
        config = read_config(directory, FORMAT, FORMAT_VERSION, "InfluenceFactors")
        try:
            tensors = load_file(directory / WEIGHTS_NAME)
        except (SafetensorError, FileNotFoundError, OSError) as error:
            raise ValueError(
                f"Cannot read {directory / WEIGHTS_NAME}: {error}. The file is missing or corrupt."
            ) from error
        factors = cls(config, tensors)
        factors._check_tensors()
        if task is not None:
            factors.check_compatible(task, force=force)
        return factors

    def _check_tensors(self) -> None:
        needed = ["activation_eigenvectors", "gradient_eigenvectors"]
        needed += ["eigenvalues"] if self.strategy == "ekfac" else ["activation_eigenvalues", "gradient_eigenvalues"]
        for module, (d_out, d_in) in self.config["shapes"].items():
            layer = self.layer(module)
            missing = [kind for kind in needed if kind not in layer]
            if missing:
                raise ValueError(f"The factors file lacks {missing} for layer {module!r}: it is incomplete.")
            if layer["gradient_eigenvectors"].shape != (d_out, d_out) or layer["activation_eigenvectors"].shape != (
                d_in,
                d_in,
            ):
                raise ValueError(f"The factors of layer {module!r} do not have the shapes its config records.")
            if not all(torch.isfinite(value).all() for value in layer.values()):
                raise ValueError(f"The factors of layer {module!r} contain NaN or infinite values.")

    def _model_card(self) -> str:
        config = self.config
        return (
            "---\nlibrary_name: hf_influence\ntags:\n- influence-functions\n- data-attribution\n- diffusion\n---\n\n"
            f"# {config['strategy'].upper()} influence factors\n\n"
            f"Curvature factors (GGN^{config['ggn']}, {config['strategy']}, K-FAC {config['approx']}) of a diffusion "
            f"denoiser, fitted with hf_influence on {config['num_draws']} (t, ε) draws "
            f"over {len(config['modules'])} layers. Model fingerprint: `{config['model']['fingerprint']}`.\n\n"
            "```python\nimport hf_influence as hfi\n\nfactors = hfi.InfluenceFactors.from_pretrained(PATH)\n```\n"
        )
