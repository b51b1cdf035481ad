"""`plan`: what fitting, storing and indexing (E)K-FAC factors of a denoiser will cost, before any compute.

The denoiser is built from its config on the meta device (shapes only: no weights, no download) and its
layers are found as fitting finds them (`find_layers` with the FactorConfig's module_filter). One meta
forward and backward pass counts a draw's FLOPs, each layer's weight-sharing positions and the tensors
autograd keeps. From those shapes the plan gives, per layer and in total, the bytes of the covariances,
eigenvectors and eigenvalues under a storage policy, an index entry's bytes under an IndexConfig, the
device memory a fit needs, and a coarse draws-per-second class.

    plan = hfi.plan("sd15")                                   # a shipped preset config
    plan = hfi.plan("runwayml/stable-diffusion-v1-5")         # a pipeline folder or Hub id (config.json only)
    plan = hfi.plan(pipe.unet, hfi.FactorConfig(module_filter=hfi.LORA_ONLY))
    print(plan); plan.check_fits(80e9)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .curvature.large_layers import activation_rank
from .curvature.layers import LORA_ONLY, find_layers, layer_kind
from .factors import STORAGE_DTYPES, FactorConfig
from .index import IndexConfig

PRESETS = {
    "sd15": "sd15_unet.json",
    "sdxl": "sdxl_unet.json",
    "sd3-medium": "sd3_medium_transformer.json",
}
TEXT_TOKENS = {"UNet2DConditionModel": 77, "SD3Transformer2DModel": 333}  # CLIP; CLIP + T5 for SD3
# The assumed device for the draws-per-second class: an H100-class GPU running the network in bf16
# autocast and the covariance products in fp32 (no TF32), at rates measured by benchmarks/sd_scale.py.
NETWORK_TFLOPS = 200.0
COVARIANCE_TFLOPS = 40.0
EIGH_WORKSPACE = 3  # an fp64 eigendecomposition of a d × d factor holds about 3 d² fp64 numbers


def preset_config(name: str) -> dict[str, Any]:
    """The diffusers config of a shipped preset: "sd15" (SD-1.5 UNet), "sdxl" (SDXL base UNet) or
    "sd3-medium" (SD3-medium transformer)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    text = resources.files("hf_influence").joinpath("plan_configs", PRESETS[name]).read_text()
    return json.loads(text)


# ---------------------------------------------------------------------------------------------- the model


def denoiser_on_meta(source: Any) -> nn.Module:
    """A denoiser with the shapes of `source` and no data: `source` is a preset name, a diffusers config
    dict, a pipeline folder, a Hub id (its config.json alone is downloaded), a pipeline, or a model (used as
    is if already on the meta device, else rebuilt there from its config with its PEFT adapters)."""
    if isinstance(source, nn.Module):
        if all(p.device.type == "meta" for p in source.parameters()):
            return source
        return _rebuild_on_meta(source)
    components = getattr(source, "components", None)
    if isinstance(components, dict):
        denoiser = components.get("unet") or components.get("transformer")
        if denoiser is None:
            raise TypeError(f"{type(source).__name__} has no `unet` or `transformer` component.")
        return denoiser_on_meta(denoiser)
    if isinstance(source, str) and source in PRESETS:
        source = preset_config(source)
    if isinstance(source, (str, Path)):
        source = _read_denoiser_config(str(source))
    if isinstance(source, dict):
        return _from_config(source)
    raise TypeError(
        f"Cannot plan for a {type(source).__name__}: pass a preset name {sorted(PRESETS)}, a diffusers config "
        "dict, a pipeline folder or Hub id, a pipeline or a denoiser module."
    )


def _from_config(config: dict[str, Any]) -> nn.Module:
    import diffusers

    class_name = config.get("_class_name")
    model_class = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if model_class is None or not hasattr(model_class, "from_config"):
        raise ValueError(f"The config names no diffusers model class (_class_name={class_name!r}).")
    with torch.device("meta"):
        return model_class.from_config(config)


def _rebuild_on_meta(model: nn.Module) -> nn.Module:
    if not hasattr(model, "config") or not hasattr(type(model), "from_config"):
        raise TypeError(
            f"{type(model).__name__} is not a diffusers model: build it on the meta device "
            "(`with torch.device('meta'): ...`) and pass that."
        )
    meta = _from_config({**dict(model.config), "_class_name": type(model).__name__})
    for adapter_name, adapter_config in getattr(model, "peft_config", {}).items():
        with torch.device("meta"):
            meta.add_adapter(adapter_config, adapter_name=adapter_name)
    return meta


def _read_denoiser_config(location: str) -> dict[str, Any]:
    """The denoiser's config.json from a pipeline or model folder, or from the Hub (that file alone)."""
    candidates = ("unet/config.json", "transformer/config.json", "config.json")
    folder = Path(location)
    if folder.is_dir():
        for candidate in candidates:
            if (folder / candidate).is_file():
                return json.loads((folder / candidate).read_text())
        raise FileNotFoundError(f"{folder} holds no {' or '.join(candidates)}.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for candidate in candidates:
        try:
            return json.loads(Path(hf_hub_download(location, candidate)).read_text())
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"The Hub repo {location!r} holds no {' or '.join(candidates)}.")


def meta_inputs(model: nn.Module, batch: int, resolution: int | None) -> dict[str, Any]:
    """Meta inputs for one forward pass of a diffusers denoiser: the noisy sample, the timestep and the
    conditioning its class needs (text states, SDXL's added conditions, SD3's pooled projections)."""
    config = model.config
    size = resolution or config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    name = type(model).__name__
    with torch.device("meta"):
        inputs: dict[str, Any] = {
            "sample": torch.zeros(batch, config.in_channels, *size, requires_grad=True),
            "timestep": torch.zeros(batch, dtype=torch.long),
        }
        if name == "UNet2DConditionModel":
            inputs["encoder_hidden_states"] = torch.zeros(batch, TEXT_TOKENS[name], config.cross_attention_dim)
            if config.addition_embed_type == "text_time":
                text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                inputs["added_cond_kwargs"] = {
                    "text_embeds": torch.zeros(batch, text),
                    "time_ids": torch.zeros(batch, 6),
                }
            if config.class_embed_type is not None or config.num_class_embeds is not None:
                inputs["class_labels"] = torch.zeros(batch, dtype=torch.long)
        elif name == "SD3Transformer2DModel":
            inputs["hidden_states"] = inputs.pop("sample")
            inputs["encoder_hidden_states"] = torch.zeros(batch, TEXT_TOKENS[name], config.joint_attention_dim)
            inputs["pooled_projections"] = torch.zeros(batch, config.pooled_projection_dim)
        elif name == "DiTTransformer2DModel":
            inputs["hidden_states"] = inputs.pop("sample")
            inputs["class_labels"] = torch.zeros(batch, dtype=torch.long)
        elif name != "UNet2DModel":
            raise NotImplementedError(f"No example inputs are known for {name}: pass inputs=... to plan().")
    return inputs


@dataclass
class _Trace:
    """What one meta forward and backward pass of a draw shows."""

    forward_backward_flops: int
    positions: dict[str, int]
    layer_input_numel: dict[str, int]
    saved_numel: int


class _SavedNumbers:
    """Counts the numbers autograd saves for the backward pass (parameters and views aside).

    On the meta device attention runs its math path, which saves the L × L attention probabilities; GPUs
    run fused kernels (flash / memory-efficient) that save only q, k, v, the output and a log-sum-exp per
    row. While it is active, `torch.nn.functional.scaled_dot_product_attention` is counted as those."""

    def __init__(self, parameters: set[int]) -> None:
        self.parameters = parameters
        self.numel = 0
        self.paused = False

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.paused and id(tensor) not in self.parameters and tensor._base is None:
            self.numel += tensor.numel()
        return tensor

    @contextlib.contextmanager
    def fused_attention(self) -> Iterator[None]:
        original = F.scaled_dot_product_attention

        def fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.paused = True
            try:
                output = original(query, key, value, *args, **kwargs)
            finally:
                self.paused = False
            self.numel += query.numel() + key.numel() + value.numel() + output.numel() + query[..., 0].numel()
            return output

        F.scaled_dot_product_attention = fused
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                yield
        finally:
            F.scaled_dot_product_attention = original


def _trace(model: nn.Module, inputs: dict[str, Any], layers: dict[str, nn.Module]) -> _Trace:
    """Count FLOPs (forward, and backward to the inputs as fitting runs it: no weight gradients), each
    layer's weight-sharing positions and input size, and the numbers autograd saves, for one draw."""
    from torch.utils.flop_counter import FlopCounterMode

    positions, input_numel = {}, {}
    saved = _SavedNumbers({id(p) for p in model.parameters()})

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            d_out = layer_kind(module).weight_shape(module)[0]
            positions[name] = output.numel() // (output.shape[0] * d_out)
            input_numel[name] = args[0].numel() // args[0].shape[0]

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter, saved.fused_attention():
            output = model(**inputs)
            output = output.sample if hasattr(output, "sample") else output[0]
            output.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    return _Trace(counter.get_total_flops(), positions, input_numel, saved.numel)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class LayerPlan:
    """One layer's factor shapes and bytes.

    Attributes:
        name: the qualified module name (as in the factors' tensor names).
        kind: "Linear" or "Conv2d".
        d_in: the activation factor's side (a conv's C_in·k1·k2; the bias is a block of its own, not a column).
        d_out: the gradient factor's side.
        bias: whether the layer has a bias (its block: `d_out` corrected eigenvalues).
        positions: weight-sharing positions per draw (tokens or output pixels) at the planned resolution.
        activation_rank: activation eigenvectors kept (`d_in`, or `large_layer_rank` for a large layer).
        bytes: bytes by tensor kind under the plan's policies (see `Plan`).
    """

    name: str
    kind: str
    d_in: int
    d_out: int
    bias: bool
    positions: int
    activation_rank: int = 0
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.activation_rank < self.d_in


@dataclass
class Plan:
    """The cost of fitting, storing and indexing factors of one denoiser (see `plan`).

    Byte kinds per layer: `activation_covariance` and `gradient_covariance` (FactorConfig.dtype; zero when
    `keep_covariances=False`), `activation_eigenvectors` and `gradient_eigenvectors` (`eigenvector_dtype`),
    `eigenvalues` (EK-FAC's corrected ones with the bias and complement values, or K-FAC's per factor; in
    FactorConfig.dtype) and `index_per_example` (one example's entry under the IndexConfig, without its id).

    Attributes:
        model: the denoiser's class name.
        model_layers: every Linear and Conv2d layer of the model, in order (shapes and positions only).
        selected: the names of the fitted layers (what `find_layers` returns with the module_filter).
        factor_config: the FactorConfig planned for.
        index_config: the IndexConfig planned for.
        keep_covariances: whether the stored factors keep A and G (scoring does not need them).
        eigenvector_dtype: storage dtype of the eigenvectors ("float32", "bfloat16", "float16"; maths stay fp32).
        num_parameters: the denoiser's parameter count.
        forward_backward_flops: FLOPs of one draw's forward pass and backward pass to the layer outputs.
        activation_bytes_per_draw: what one draw keeps for the backward pass (autograd's saved tensors and
            the captured layer inputs, fp32).
        layers: one `LayerPlan` per fitted layer, in fitting order, with its bytes (computed).
    """

    model: str
    model_layers: list[LayerPlan] = field(repr=False)
    selected: tuple[str, ...] = field(repr=False)
    factor_config: FactorConfig
    index_config: IndexConfig
    keep_covariances: bool
    eigenvector_dtype: str
    num_parameters: int
    forward_backward_flops: int
    activation_bytes_per_draw: int
    layers: list[LayerPlan] = field(init=False)

    def __post_init__(self) -> None:
        if self.eigenvector_dtype not in STORAGE_DTYPES:
            raise ValueError(f"eigenvector_dtype must be one of {STORAGE_DTYPES}, got {self.eigenvector_dtype!r}.")
        config = self.factor_config
        self.layers = []
        for layer in self.model_layers:
            if layer.name in self.selected:
                rank = activation_rank(layer.d_in, config.max_factor_size, config.large_layer_rank)
                layer = dataclasses.replace(layer, activation_rank=rank)
                layer.bytes = self._layer_bytes(layer)
                self.layers.append(layer)

    # ------------------------------------------------------------------ bytes

    def _layer_bytes(self, layer: LayerPlan) -> dict[str, int]:
        value = _itemsize(self.factor_config.dtype)
        vector = _itemsize(self.eigenvector_dtype)
        d_in, d_out, rank = layer.d_in, layer.d_out, layer.activation_rank
        if self.factor_config.strategy == "ekfac":
            eigenvalues = d_out * rank + d_out * (layer.bias + layer.truncated)
        else:
            eigenvalues = rank + d_out * (1 + layer.bias) + layer.truncated
        covariances = self.keep_covariances
        return {
            "activation_covariance": d_in * d_in * value * covariances,
            "gradient_covariance": d_out * d_out * value * covariances,
            "activation_eigenvectors": d_in * rank * vector,
            "gradient_eigenvectors": d_out * d_out * vector,
            "eigenvalues": eigenvalues * value,
            "index_per_example": _index_bytes(self.index_config, d_out, d_in, layer.bias),
        }

    def totals(self) -> dict[str, int]:
        """Bytes by kind over all layers."""
        kinds = self.layers[0].bytes.keys()
        return {kind: sum(layer.bytes[kind] for layer in self.layers) for kind in kinds}

    @property
    def factor_bytes(self) -> int:
        """Bytes of the stored factors under the storage policies."""
        return sum(value for kind, value in self.totals().items() if kind != "index_per_example")

    @property
    def index_bytes_per_example(self) -> int:
        """One example's index entry, with its int64 id."""
        return self.totals()["index_per_example"] + 8

    @property
    def parameter_bytes(self) -> int:
        return self.num_parameters * 4

    @property
    def fitting_memory_bytes(self) -> int:
        """Device memory of one process fitting the factors (every process holds all of it): the largest of
        `fitting_phases()`."""
        return max(self.fitting_phases().values())

    def fitting_phases(self) -> dict[str, int]:
        """Device memory of each phase of a fit, with the fp32 model: the covariance pass (covariances and a
        batch's activations); the eigendecompositions, layer by layer in fitting order (the covariances not yet
        decomposed, the eigenvectors of those that are, and the fp64 workspace of the layer's larger factor:
        finished covariances move to the CPU); the correction pass (eigenvectors, correction sums and a
        batch's activations)."""
        accumulate = _itemsize(self.factor_config.dtype)
        covariance = [(layer.d_in**2 + layer.d_out**2) * accumulate for layer in self.layers]
        vectors = [(layer.d_in * layer.activation_rank + layer.d_out**2) * accumulate for layer in self.layers]
        covariances, eigenvectors = sum(covariance), sum(vectors)
        decomposing, done, waiting = 0, 0, covariances
        for layer, before, after in zip(self.layers, covariance, vectors, strict=True):
            workspace = EIGH_WORKSPACE * max(layer.d_in, layer.d_out) ** 2 * 8
            decomposing = max(decomposing, done + waiting + workspace)
            done, waiting = done + after, waiting - before
        corrections = 0
        if self.factor_config.strategy == "ekfac":
            corrections = sum(
                (layer.d_out * layer.activation_rank + 2 * layer.d_out) * accumulate for layer in self.layers
            )
        activations = self.factor_config.batch_size * self.activation_bytes_per_draw
        phases = {
            "covariance_pass": covariances + activations,
            "eigendecomposition": decomposing,
            "correction_pass": eigenvectors + corrections + activations,
        }
        return {phase: self.parameter_bytes + value for phase, value in phases.items()}

    @property
    def scoring_memory_bytes(self) -> int:
        """Device memory to score with the stored factors: the model and the factors without covariances."""
        totals = self.totals()
        stored = sum(value for kind, value in totals.items() if not kind.endswith(("_covariance", "per_example")))
        return self.parameter_bytes + stored

    # ------------------------------------------------------------------ speed

    @property
    def covariance_flops(self) -> int:
        """FLOPs of one draw's covariance products (expand: `2 R (d_in² + d_out²)` per layer)."""
        per_position = self.factor_config.approx == "expand"
        return sum(
            2 * (layer.positions if per_position else 1) * (layer.d_in**2 + layer.d_out**2) for layer in self.layers
        )

    @property
    def draws_per_second(self) -> float:
        """Estimated draws per second of the covariance pass on an H100-class GPU (see `throughput_note`)."""
        seconds = self.forward_backward_flops / (NETWORK_TFLOPS * 1e12) + self.covariance_flops / (
            COVARIANCE_TFLOPS * 1e12
        )
        return 1 / seconds

    @property
    def draws_per_second_class(self) -> str:
        """The estimate rounded to one significant figure: a class, not a promise."""
        rate = self.draws_per_second
        digits = max(0, -int(f"{rate:e}".split("e")[1]))
        return f"~{float(f'{rate:.1g}'):.{digits}f} draws/s"

    @property
    def throughput_note(self) -> str:
        return (
            f"{self.forward_backward_flops / 1e12:.2f} TFLOP network + {self.covariance_flops / 1e12:.2f} TFLOP "
            f"covariance products per draw, at {NETWORK_TFLOPS:.0f} and {COVARIANCE_TFLOPS:.0f} TFLOP/s "
            "(an H100-class GPU: bf16 autocast network, fp32 covariance products)"
        )

    # ------------------------------------------------------------------ options

    def replace(self, **changes: Any) -> Plan:
        """The same model planned with other policies: `keep_covariances`, `eigenvector_dtype`, an
        `index_config`, or FactorConfig fields (`max_factor_size=8192`, `module_filter="lora_"`, ...)."""
        factor_fields = {f.name for f in dataclasses.fields(FactorConfig)}
        factor_changes = {key: changes.pop(key) for key in list(changes) if key in factor_fields}
        config = dataclasses.replace(self.factor_config, **factor_changes)
        selected = self.selected
        if "module_filter" in factor_changes:
            selected = tuple(layer.name for layer in self.model_layers if _selected(layer.name, config.module_filter))
            if not selected:
                raise ValueError(f"No layer matches module_filter={config.module_filter!r}.")
        return dataclasses.replace(self, factor_config=config, selected=selected, **changes)

    @property
    def has_lora(self) -> bool:
        return any(_selected(layer.name, LORA_ONLY) for layer in self.model_layers)

    def options(self) -> list[tuple[str, Plan]]:
        """Cheaper set-ups of the same model, each with its plan: the storage policies, the large-layer
        approximation, a smaller batch, their combination, and LoRA-only attribution when the model has LoRA
        layers."""
        small_batch = {"batch_size": max(1, self.factor_config.batch_size // 8)}
        policies = {"keep_covariances": False, "eigenvector_dtype": "bfloat16"}
        large = {"max_factor_size": 8192, "large_layer_rank": 1024}
        candidates: list[tuple[str, dict[str, Any]]] = [
            ("drop covariances (keep_covariances=False)", {"keep_covariances": False}),
            ("bf16 eigenvectors (eigenvector_dtype='bfloat16')", {"eigenvector_dtype": "bfloat16"}),
            ("large-layer approximation (max_factor_size=8192, large_layer_rank=1024)", large),
            (f"batch_size={small_batch['batch_size']}", small_batch),
            ("all of the above", {**policies, **large, **small_batch}),
        ]
        if self.has_lora and self.factor_config.module_filter != LORA_ONLY:
            candidates.append(("LoRA layers only (module_filter=hfi.LORA_ONLY)", {"module_filter": LORA_ONLY}))
            candidates.append(("LoRA layers only + the above", {"module_filter": LORA_ONLY, **policies, **small_batch}))
        return [(label, self.replace(**changes)) for label, changes in candidates]

    def fits(self, memory_bytes: float, storage_bytes: float | None = None) -> bool:
        """Whether fitting and scoring fit `memory_bytes` of device memory per process (and the stored
        factors `storage_bytes`, if given)."""
        memory = max(self.fitting_memory_bytes, self.scoring_memory_bytes) <= memory_bytes
        return memory and (storage_bytes is None or self.factor_bytes <= storage_bytes)

    def check_fits(self, memory_bytes: float, storage_bytes: float | None = None) -> None:
        """Raise `MemoryError`, naming the set-ups that would fit, when fitting or scoring needs more than
        `memory_bytes` of one process's device memory, or the stored factors more than `storage_bytes`."""
        if self.fits(memory_bytes, storage_bytes):
            return
        budget = _gb(memory_bytes) + ("" if storage_bytes is None else f" and {_gb(storage_bytes)} of storage")
        lines = [
            f"{self.model} does not fit {budget}: fitting needs about {_gb(self.fitting_memory_bytes)} and "
            f"scoring {_gb(self.scoring_memory_bytes)} of device memory per process, the stored factors "
            f"{_gb(self.factor_bytes)}. Every process holds all factors: more processes do not lower this."
        ]
        working = [(label, plan) for label, plan in self.options() if plan.fits(memory_bytes, storage_bytes)]
        if working:
            lines.append("These would fit:")
            lines += [
                f"  - {label}: fitting {_gb(plan.fitting_memory_bytes)}, scoring {_gb(plan.scoring_memory_bytes)}, "
                f"stored factors {_gb(plan.factor_bytes)}"
                for label, plan in working
            ]
        else:
            covariances = self.replace(batch_size=1).fitting_phases()["covariance_pass"]
            lines.append(
                f"None of the options fits: the covariance pass alone holds every fitted layer's A and G at once "
                f"({_gb(covariances)} with the model at batch 1). Fit fewer layers (module_filter)."
            )
        if not self.has_lora:
            lines.append(
                "For a fine-tune, attribute through its LoRA adapters only (module_filter=hfi.LORA_ONLY on the "
                "LoRA-adapted denoiser): plan that model to see its cost."
            )
        raise MemoryError("\n".join(lines))

    # ------------------------------------------------------------------ display

    def summary(self) -> dict[str, Any]:
        """The totals as plain numbers (JSON-ready)."""
        return {
            "model": self.model,
            "layers": len(self.layers),
            "truncated_layers": sum(layer.truncated for layer in self.layers),
            "largest_activation_factor": max(layer.d_in for layer in self.layers),
            "bytes": self.totals(),
            "factor_bytes": self.factor_bytes,
            "index_bytes_per_example": self.index_bytes_per_example,
            "fitting_memory_bytes": self.fitting_memory_bytes,
            "scoring_memory_bytes": self.scoring_memory_bytes,
            "draws_per_second_estimate": self.draws_per_second,
            "draws_per_second_class": self.draws_per_second_class,
            "throughput_note": self.throughput_note,
        }

    def to_table(self, max_rows: int | None = None) -> str:
        """A markdown table: one row per layer (the largest first when `max_rows` cuts it), then the totals."""
        header = "| layer | kind | d_in | d_out | R | A | G | Q_A | Q_G | eigenvalues | index/example |"
        rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        layers = self.layers
        if max_rows is not None and len(layers) > max_rows:
            layers = sorted(layers, key=lambda layer: -sum(layer.bytes.values()))[:max_rows]
        for layer in layers:
            rank = f"{layer.d_in} (k={layer.activation_rank})" if layer.truncated else str(layer.d_in)
            sizes = " | ".join(_gb(layer.bytes[kind]) for kind in _KINDS)
            rows.append(f"| {layer.name} | {layer.kind} | {rank} | {layer.d_out} | {layer.positions} | {sizes} |")
        totals = self.totals()
        rows.append(
            f"| **total ({len(self.layers)} layers)** | | | | | " + " | ".join(_gb(totals[k]) for k in _KINDS) + " |"
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        config = self.factor_config
        return "\n".join(
            [
                f"Plan for {self.model}: {len(self.layers)} layers, {self.num_parameters / 1e6:.0f} M parameters, "
                f"{config.strategy} / {config.approx}, covariances {'kept' if self.keep_covariances else 'dropped'}, "
                f"eigenvectors in {self.eigenvector_dtype}",
                "",
                self.to_table(max_rows=12),
                "",
                f"stored factors: {_gb(self.factor_bytes)}; index: {_gb(self.index_bytes_per_example)} per example",
                f"device memory: fitting {_gb(self.fitting_memory_bytes)} (batch {self.factor_config.batch_size}), "
                f"scoring {_gb(self.scoring_memory_bytes)}",
                f"speed class: {self.draws_per_second_class} ({self.throughput_note})",
            ]
        )


_KINDS = (
    "activation_covariance",
    "gradient_covariance",
    "activation_eigenvectors",
    "gradient_eigenvectors",
    "eigenvalues",
    "index_per_example",
)


def plan(
    source: Any,
    factor_config: FactorConfig | None = None,
    index_config: IndexConfig | None = None,
    keep_covariances: bool = True,
    eigenvector_dtype: str | None = None,
    batch_size: int | None = None,
    resolution: int | None = None,
    inputs: dict[str, Any] | None = None,
) -> Plan:
    """Plan fitting and storing factors of a denoiser without computing anything.

    Args:
        source: a preset ("sd15", "sdxl", "sd3-medium"), a diffusers config dict, a pipeline folder or Hub id
            (only the denoiser's config.json is read), a pipeline, or a denoiser module (rebuilt on the meta
            device with its PEFT adapters; a model already on the meta device is used as is).
        factor_config: the fit (strategy, approx, module_filter, dtype, large-layer approximation).
        index_config: the gradient index whose per-example bytes are reported.
        keep_covariances, eigenvector_dtype: the storage policies of `InfluenceFactors.save_pretrained`
            (eigenvector_dtype None stores them in FactorConfig.dtype).
        batch_size: draws per pass for the activation memory (replaces FactorConfig.batch_size).
        resolution: the sample side in the denoiser's own space (latents for latent models; default its
            config's sample_size).
        inputs: forward keyword arguments (on the meta device, batch 1) for denoiser classes the planner
            does not know.
    """
    factor_config = factor_config or FactorConfig()
    if batch_size is not None:
        factor_config = dataclasses.replace(factor_config, batch_size=batch_size)
    model = denoiser_on_meta(source)
    everything = find_layers(model, None)
    selected = find_layers(model, factor_config.module_filter)
    trace = _trace(model, inputs if inputs is not None else meta_inputs(model, 1, resolution), everything)
    rows = []
    for name, module in everything.items():
        kind = layer_kind(module)
        d_out, d_in = kind.weight_shape(module)
        positions = trace.positions.get(name, 0)
        rows.append(LayerPlan(name, kind.module_type.__name__, d_in, d_out, module.bias is not None, positions))
    captured = sum(trace.layer_input_numel.get(name, 0) for name in selected)
    return Plan(
        model=type(model).__name__,
        model_layers=rows,
        selected=tuple(selected),
        factor_config=factor_config,
        index_config=index_config or IndexConfig(module_filter=factor_config.module_filter),
        keep_covariances=keep_covariances,
        eigenvector_dtype=eigenvector_dtype or factor_config.dtype,
        num_parameters=sum(p.numel() for p in model.parameters()),
        forward_backward_flops=trace.forward_backward_flops,
        activation_bytes_per_draw=(trace.saved_numel + captured) * 4,
    )


# ---------------------------------------------------------------------------------------------- helpers


def _selected(name: str, module_filter: str | None) -> bool:
    """The str filter of `find_layers`: a regex searched in the name."""
    return module_filter is None or re.search(module_filter, name) is not None


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _index_bytes(config: IndexConfig, d_out: int, d_in: int, bias: bool) -> int:
    """Bytes of one example's entry for a layer, as `compression.py` stores it."""
    if config.compression == "svd" and min(d_out, d_in) > config.rank:
        tensors = [config.rank * d_out, config.rank * d_in]
    elif config.compression == "projection":
        tensors = [min(d_out, config.projection_dim) * min(d_in, config.projection_dim)]
    else:
        tensors = [d_out * d_in]
    if bias:
        tensors.append(min(d_out, config.projection_dim) if config.compression == "projection" else d_out)
    if config.quantize_bits is not None:  # one byte per value, and an fp32 scale and minimum per tensor
        return sum(tensors) + 8 * len(tensors)
    return 4 * sum(tensors)


def _gb(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f} GB"
    if value >= 1e6:
        return f"{value / 1e6:.1f} MB"
    return f"{value / 1e3:.1f} kB"
