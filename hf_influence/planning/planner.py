"""`Plan` and `plan()`: a denoiser's layers and one traced draw, turned into the bytes, device memory and
speed of fitting, storing and indexing its factors under a FactorConfig, an IndexConfig and the storage
policies. The per-layer byte rules live in `layer_bytes.py`; this module sums them and explains the totals.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compression import Compressor, fit_to_budget, make_compressor
from ..curvature.large_layers import activation_rank
from ..curvature.layers import LORA_ONLY, find_layers, layer_kind
from ..curvature.partitions import balanced_groups
from ..eigenbasis_compression import EigenbasisCompressor, WhitenedBasis, allocate_ranks
from ..factors import STORAGE_DTYPES, FactorConfig
from ..index import IndexConfig
from .inputs import meta_inputs
from .layer_bytes import BYTE_KINDS, fitting_bytes, stored_bytes
from .meta import PRESETS, denoiser_on_meta
from .trace import Trace, trace_draw

# The assumed device for the draws-per-second class: an H100-class GPU running the network in bf16
# autocast and the covariance products in fp32 (no TF32), at rates measured by benchmarks/sd_scale.py.
NETWORK_TFLOPS = 200.0
COVARIANCE_TFLOPS = 40.0


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
        config, index = self.factor_config, self.index_config
        selected = [layer for layer in self.model_layers if layer.name in self.selected]
        shapes = {layer.name: (layer.d_out, layer.d_in) for layer in selected}
        selected = [
            dataclasses.replace(
                layer, activation_rank=activation_rank(layer.d_in, config.max_factor_size, config.large_layer_rank)
            )
            for layer in selected
        ]
        # A budget's choice given the factors (the build's too, when it is passed them).
        index = fit_to_budget(index, shapes, {layer.name: layer.bias for layer in selected}, with_factors=True)
        self.index_config = index
        compressor = make_compressor(index, shapes, planned_eigenbasis(selected, index))
        self.layers = []
        for layer in selected:
            layer.bytes = self._stored_bytes(layer, compressor)
            self.layers.append(layer)

    # ------------------------------------------------------------------ bytes

    def _stored_bytes(self, layer: LayerPlan, compressor: Compressor) -> dict[str, int]:
        return stored_bytes(
            layer.name,
            layer.d_out,
            layer.d_in,
            layer.activation_rank,
            layer.bias,
            strategy=self.factor_config.curvature,
            dtype=self.factor_config.dtype,
            eigenvector_dtype=self.eigenvector_dtype,
            keep_covariances=self.keep_covariances,
            compressor=compressor,
        )

    def _fitting_bytes(self, layer: LayerPlan) -> dict[str, int]:
        config = self.factor_config
        return fitting_bytes(
            layer.d_out, layer.d_in, layer.activation_rank, strategy=config.curvature, dtype=config.dtype
        )

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
        """One example's index entry, with its int64 id and search sketch."""
        return self.totals()["index_per_example"] + 8 + self.index_config.sketch_bytes

    @property
    def eigenbasis_file_bytes(self) -> int:
        """compression="eigenbasis": the basis file the index keeps (fp32 Q_G, Q_A, whitening scales); else 0."""
        if self.index_config.compression != "eigenbasis":
            return 0
        return sum(
            4 * (layer.d_out**2 + layer.d_in * layer.activation_rank + layer.d_out * (_width(layer) + layer.bias))
            for layer in self.layers
        )

    @property
    def parameter_bytes(self) -> int:
        return self.num_parameters * 4

    # ------------------------------------------------------------------ device memory

    @property
    def fitting_memory_bytes(self) -> int:
        """Device memory of one process fitting the factors (every process holds all of it): the largest of
        `fitting_phases()`."""
        return max(self.fitting_phases().values())

    def fitting_phases(self) -> dict[str, int]:
        """Device memory of each phase of a fit, with the fp32 model: the covariance pass (covariances and a
        batch's activations); the eigendecompositions (see `_eigendecomposition_peak`); the correction pass
        (eigenvectors, correction sums and a batch's activations) — for the largest of the
        `FactorConfig.module_partitions` groups of layers (a finished group's factors leave the device)."""
        per_layer = {layer.name: self._fitting_bytes(layer) for layer in self.layers}
        activations = self.factor_config.batch_size * self.activation_bytes_per_draw
        phases = dict.fromkeys(("covariance_pass", "eigendecomposition", "correction_pass"), 0)
        shapes = {layer.name: (layer.d_out, layer.d_in) for layer in self.layers}
        for group in balanced_groups(shapes, self.factor_config.module_partitions):
            rows = [per_layer[name] for name in group]
            group_phases = {
                "covariance_pass": sum(layer["covariances"] for layer in rows) + activations,
                "eigendecomposition": _eigendecomposition_peak(rows),
                "correction_pass": sum(layer["eigenvectors"] + layer["corrections"] for layer in rows) + activations,
            }
            phases = {phase: max(value, group_phases[phase]) for phase, value in phases.items()}
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
            *(
                (
                    f"module_partitions={count} + all of the above",
                    {**policies, **large, **small_batch, "module_partitions": count},
                )
                for count in (2, 4, 8)
            ),
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
            f"{_gb(self.factor_bytes)}. Every process holds all factors: more processes do not lower this.",
            *self._what_would_fit(memory_bytes, storage_bytes),
        ]
        if not self.has_lora:
            lines.append(
                "For a fine-tune, attribute through its LoRA adapters only (module_filter=hfi.LORA_ONLY on the "
                "LoRA-adapted denoiser): plan that model to see its cost."
            )
        raise MemoryError("\n".join(lines))

    def _what_would_fit(self, memory_bytes: float, storage_bytes: float | None) -> list[str]:
        """The refusal's advice: the options that fit, or why none can (the covariance pass's floor)."""
        working = [(label, plan) for label, plan in self.options() if plan.fits(memory_bytes, storage_bytes)]
        if not working:
            covariances = self.replace(batch_size=1).fitting_phases()["covariance_pass"]
            return [
                f"None of the options fits: the covariance pass alone holds every fitted layer's A and G at once "
                f"({_gb(covariances)} with the model at batch 1). Fit fewer layers (module_filter), or more "
                "module_partitions."
            ]
        return ["These would fit:"] + [
            f"  - {label}: fitting {_gb(plan.fitting_memory_bytes)}, scoring {_gb(plan.scoring_memory_bytes)}, "
            f"stored factors {_gb(plan.factor_bytes)}"
            for label, plan in working
        ]

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
            "index_compression": self.index_config.compression,
            "eigenbasis_file_bytes": self.eigenbasis_file_bytes,
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
            sizes = " | ".join(_gb(layer.bytes[kind]) for kind in BYTE_KINDS)
            rows.append(f"| {layer.name} | {layer.kind} | {rank} | {layer.d_out} | {layer.positions} | {sizes} |")
        totals = self.totals()
        rows.append(
            f"| **total ({len(self.layers)} layers)** | | | | | "
            + " | ".join(_gb(totals[kind]) for kind in BYTE_KINDS)
            + " |"
        )
        return "\n".join(rows)

    def _index_note(self) -> str:
        index = self.index_config
        if index.compression == "eigenbasis":
            note = f"8-bit eigenbasis, basis file {_gb(self.eigenbasis_file_bytes)}"
        elif index.compression == "svd":
            note = f"SVD rank {index.rank}" + (", 8-bit" if index.quantize_bits else "")
        elif index.compression == "projection":
            note = f"projection {index.projection_dim}" + (", 8-bit" if index.quantize_bits else "")
        else:
            note = "exact"
        return note + (f", budget {index.max_bytes_per_example} bytes" if index.max_bytes_per_example else "")

    def __str__(self) -> str:
        config = self.factor_config
        headline = (
            f"Plan for {self.model}: {len(self.layers)} layers, {self.num_parameters / 1e6:.0f} M parameters, "
            f"{config.strategy} / {config.approx}, covariances {'kept' if self.keep_covariances else 'dropped'}, "
            f"eigenvectors in {self.eigenvector_dtype}"
        )
        costs = [
            f"stored factors: {_gb(self.factor_bytes)}; index: {_gb(self.index_bytes_per_example)} per example "
            f"({self._index_note()})",
            f"device memory: fitting {_gb(self.fitting_memory_bytes)} (batch {config.batch_size}), "
            f"scoring {_gb(self.scoring_memory_bytes)}",
            f"speed class: {self.draws_per_second_class} ({self.throughput_note})",
        ]
        return "\n".join([headline, "", self.to_table(max_rows=12), "", *costs])


def planned_eigenbasis(layers: list[LayerPlan], index: IndexConfig) -> EigenbasisCompressor | None:
    """compression="eigenbasis" without any data: shape-only bases (meta tensors) at `index.rank`, or, under a
    budget, ranks allocated on a flat spectrum (the build allocates on a sample of real gradients instead)."""
    if index.compression != "eigenbasis":
        return None
    bases = {
        layer.name: WhitenedBasis(
            gradient_eigenvectors=torch.empty(layer.d_out, layer.d_out, device="meta"),
            activation_eigenvectors=torch.empty(layer.d_in, layer.activation_rank, device="meta"),
            weight_scales=torch.empty(layer.d_out, _width(layer), device="meta"),
            bias_scales=torch.empty(layer.d_out, device="meta") if layer.bias else None,
        )
        for layer in layers
    }
    if index.max_bytes_per_example is None:
        return EigenbasisCompressor(bases, dict.fromkeys(bases, index.rank))
    flat = {layer.name: (torch.ones(min(layer.d_out, _width(layer))), 0.0) for layer in layers}
    return EigenbasisCompressor(bases, allocate_ranks(bases, flat, index.gradient_budget))


def _width(layer: LayerPlan) -> int:
    """The rotated weight's width: Q_A's columns, and the activation complement of a truncated layer."""
    return layer.activation_rank + (layer.d_in if layer.activation_rank < layer.d_in else 0)


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
    lora_preset = isinstance(source, str) and source in PRESETS and PRESETS[source].lora_rank is not None
    if lora_preset and factor_config.module_filter is None:  # a LoRA preset attributes its adapter
        factor_config = dataclasses.replace(factor_config, module_filter=LORA_ONLY)
    model = denoiser_on_meta(source)
    everything = find_layers(model, None)
    selected = find_layers(model, factor_config.module_filter)
    trace = trace_draw(model, inputs if inputs is not None else meta_inputs(model, 1, resolution), everything)
    captured = sum(trace.layer_input_numel.get(name, 0) for name in selected)
    return Plan(
        model=type(model).__name__,
        model_layers=_layer_rows(everything, trace),
        selected=tuple(selected),
        factor_config=factor_config,
        index_config=index_config or IndexConfig(module_filter=factor_config.module_filter),
        keep_covariances=keep_covariances,
        eigenvector_dtype=eigenvector_dtype or factor_config.dtype,
        num_parameters=sum(p.numel() for p in model.parameters()),
        forward_backward_flops=trace.forward_backward_flops,
        activation_bytes_per_draw=(trace.saved_numel + captured) * 4,
    )


def _layer_rows(layers: dict[str, nn.Module], trace: Trace) -> list[LayerPlan]:
    """One `LayerPlan` per layer: its factor sides from the weight, its positions from the trace."""
    rows = []
    for name, module in layers.items():
        kind = layer_kind(module)
        d_out, d_in = kind.weight_shape(module)
        positions = trace.positions.get(name, 0)
        rows.append(LayerPlan(name, kind.module_type.__name__, d_in, d_out, module.bias is not None, positions))
    return rows


def _eigendecomposition_peak(per_layer: list[dict[str, int]]) -> int:
    """The eigendecompositions' peak, layer by layer in fitting order: the covariances not yet decomposed,
    the eigenvectors of those that are, and the fp64 workspace of the layer's larger factor (finished
    covariances move to the CPU)."""
    peak, done, waiting = 0, 0, sum(layer["covariances"] for layer in per_layer)
    for layer in per_layer:
        peak = max(peak, done + waiting + layer["eigh_workspace"])
        done, waiting = done + layer["eigenvectors"], waiting - layer["covariances"]
    return peak


def _selected(name: str, module_filter: str | None) -> bool:
    """The str filter of `find_layers`: a regex searched in the name."""
    return module_filter is None or re.search(module_filter, name) is not None


def _gb(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f} GB"
    if value >= 1e6:
        return f"{value / 1e6:.1f} MB"
    return f"{value / 1e3:.1f} kB"
