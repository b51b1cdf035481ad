"""Data-aware index compression: a low-rank SVD of each gradient *whitened* in the fitted factors' eigenbasis.

An influence score is `⟨∇W, (F̂ + λ)⁻¹ q⟩ = Σ_ij c_ij q_ij / (Λ_ij + λ)` with `c = Q_Gᵀ ∇W Q_A` the gradient's
coefficients in the factors' Kronecker eigenbasis and Λ the curvature there (EK-FAC's corrected eigenvalues,
K-FAC's `λ^G_i λ^A_j`). Whitened, `c̃ = c / √Λ` and `q̃ = q √Λ / (Λ + λ)`, the score is the plain inner product
`⟨c̃, q̃⟩`: a rank-r truncation of c̃ (Eckart–Young) is then the best rank-r approximation in the metric the scores
use, where a plain SVD of ∇W spends its rank on directions the preconditioner damps away.

Each layer gets its own rank, chosen from a sample of training gradients so that the kept whitened energy is
greatest for a byte budget (`allocate_ranks`). The bases, whitening scales and ranks are saved with the index
(`BASIS_FILE`), so it scores on its own — at any damping, and with refitted factors (then merely a fixed linear
compression).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .compression import Quantized, Stored, SVDCompressor
from .curvature.layer_factors import LayerFactors
from .curvature.strategies import KFAC
from .engine import DrawPlan, dataset_batches
from .estimators import Estimator
from .gradients import per_example_gradients

if TYPE_CHECKING:
    from .factors import InfluenceFactors
    from .index import IndexConfig
    from .task import DiffusionTask

BASIS_FILE = "compression.safetensors"
RANK_SAMPLE = 32  # training examples whose whitened gradients choose the ranks under a byte budget
# Whitening divides by √max(Λ, floor · the layer's largest Λ): directions of (near) zero curvature would otherwise
# blow up, and one huge whitened value would take an 8-bit range from every other.
WHITENING_FLOOR = 1e-4
BASIS_FIELDS = ("gradient_eigenvectors", "activation_eigenvectors", "weight_scales", "bias_scales")


@dataclass(frozen=True)
class WhitenedBasis:
    """One layer's eigenbasis and whitening scales.

    Attributes:
        gradient_eigenvectors: Q_G (d_out × d_out).
        activation_eigenvectors: Q_A (d_in × k; k < d_in for a truncated large layer, whose activation complement
            is kept in the original coordinates, as `KFAC.to_eigenbasis` does).
        weight_scales: √Λ on the rotated weight grid (d_out × width, width = k, or k + d_in when truncated).
        bias_scales: √Λ of the bias block (d_out), None for a layer without a bias.
    """

    gradient_eigenvectors: torch.Tensor
    activation_eigenvectors: torch.Tensor
    weight_scales: torch.Tensor
    bias_scales: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.weight_scales.shape[1]

    def rotate(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = LayerFactors(
            activation_eigenvectors=self.activation_eigenvectors.to(weight.device, weight.dtype),
            gradient_eigenvectors=self.gradient_eigenvectors.to(weight.device, weight.dtype),
        )
        return KFAC().to_eigenbasis(layer, weight, bias)

    def scaled(
        self, weight: torch.Tensor, bias: torch.Tensor | None, power: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotated gradients times `scales ** power` (−1 whitens a training gradient, +1 a preconditioned query)."""
        weight, bias = self.rotate(weight, bias)
        weight = weight * self.weight_scales.to(weight.device, weight.dtype) ** power
        if bias is not None:
            bias = bias * self.bias_scales.to(bias.device, bias.dtype) ** power
        return weight, bias


def whitened_bases(factors: InfluenceFactors, modules: Iterable[str]) -> dict[str, WhitenedBasis]:
    """The eigenbasis and whitening scales of the layers `modules` from K-FAC or EK-FAC factors."""
    bases = {}
    for name in modules:
        layer = factors.layer(name)
        if layer.gradient_eigenvectors is None:
            raise ValueError(
                f"compression='eigenbasis' needs factors with an eigenbasis; these are {factors.strategy!r} factors. "
                "Fit K-FAC or EK-FAC factors, or choose another compression."
            )
        weight = factors.curvature.weight_eigenvalues(layer).to(torch.float64)
        if layer.truncated:
            residual = factors.curvature.residual_eigenvalues(layer).to(torch.float64)
            weight = torch.cat([weight, residual[:, None].expand(-1, layer.activation_eigenvectors.shape[0])], dim=1)
        floor = WHITENING_FLOOR * weight.max().clamp_min(torch.finfo(torch.float64).tiny)
        bias = layer.bias_eigenvalues

        def scales(eigenvalues: torch.Tensor, floor: torch.Tensor = floor) -> torch.Tensor:
            return eigenvalues.to(torch.float64).nan_to_num(0.0).clamp_min(floor).sqrt().float().contiguous()

        bases[name] = WhitenedBasis(
            gradient_eigenvectors=layer.gradient_eigenvectors.float().contiguous(),
            activation_eigenvectors=layer.activation_eigenvectors.float().contiguous(),
            weight_scales=scales(weight),
            bias_scales=None if bias is None else scales(bias),
        )
    return bases


class EigenbasisCompressor(SVDCompressor):
    """SVD, at each layer's rank, of training gradients whitened in the factors' eigenbasis (see the module
    docstring). The rotation and whitening are linear, so they run on gradient parts as they arrive
    (`transform`); the truncation runs once per example (`encode`)."""

    def __init__(self, bases: Mapping[str, WhitenedBasis], ranks: Mapping[str, int]) -> None:
        super().__init__(dict(ranks))
        self.bases = dict(bases)

    def transform(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.bases[name].scaled(weight, bias, -1)

    def layout(self, name: str, d_out: int, d_in: int, has_bias: bool) -> dict[str, int]:
        return super().layout(name, d_out, self.bases[name].width, has_bias)

    def query(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stored:
        return super().query(name, *self.bases[name].scaled(weight, bias, 1))

    def space_shape(self, name: str, d_out: int, d_in: int) -> tuple[int, int]:
        return d_out, self.bases[name].width


def choose_ranks(
    task: DiffusionTask,
    dataset: Iterable[dict[str, Any]],
    layers: dict[str, torch.nn.Module],
    bases: dict[str, WhitenedBasis],
    config: IndexConfig,
) -> EigenbasisCompressor:
    """The eigenbasis compressor an index config asks for: `config.rank` in every layer without a budget; under
    `config.max_bytes_per_example`, ranks allocated on the whitened gradients of the first `RANK_SAMPLE` training
    examples, taken as the index takes them (`allocate_ranks`)."""
    if config.max_bytes_per_example is None:
        return EigenbasisCompressor(bases, dict.fromkeys(bases, config.rank))
    plan = DrawPlan.training(
        config.draws_per_example, config.seed, config.batch_size, estimator=Estimator.named(config.estimator)
    )
    whiten = EigenbasisCompressor(bases, dict.fromkeys(bases, 0)).transform
    energies: dict[str, tuple[torch.Tensor, float]] = {}
    sample = itertools.islice(dataset, RANK_SAMPLE)
    for batch in dataset_batches(sample, task, plan.examples_per_pass, config.id_column):
        grads = per_example_gradients(task, layers, batch.examples, batch.ids, plan, transform=whiten)
        for name, (weight, bias) in grads.items():
            singular, bias_energy = singular_energies(weight.cpu(), None if bias is None else bias.cpu())
            before = energies.get(name, (0, 0.0))
            energies[name] = (before[0] + singular, before[1] + bias_energy)
    ranks = allocate_ranks(bases, energies, config.gradient_budget)
    if not any(ranks.values()):
        raise ValueError(
            f"IndexConfig.max_bytes_per_example={config.max_bytes_per_example} is below the smallest entry of any "
            "indexed layer at rank 1: raise it."
        )
    return EigenbasisCompressor(bases, ranks)


def allocate_ranks(
    bases: Mapping[str, WhitenedBasis], energies: Mapping[str, tuple[torch.Tensor, float]], budget: int
) -> dict[str, int]:
    """Per-layer ranks whose 8-bit index entry fits `budget` bytes, greedily keeping the most whitened energy per
    byte (`energies`: each layer's `singular_energies` over one sample of training examples). Each step raises
    the rank of the layer whose next singular value² (a layer's first step also gains its bias) buys the most per
    byte it adds. A layer at rank 0 stores nothing."""
    compressor = Quantized(EigenbasisCompressor(bases, dict.fromkeys(bases, 0)))
    ranks = compressor.inner.ranks  # the ranks the layouts below are computed at

    def step_bytes(name: str) -> int:
        """The bytes per example that raising the layer's rank by one adds (≤ 0 when full rank is stored exactly)."""
        d_out, has_bias = len(bases[name].gradient_eigenvectors), bases[name].bias_scales is not None
        before = sum(compressor.layout(name, d_out, 0, has_bias).values())
        compressor.inner.ranks[name] += 1
        after = sum(compressor.layout(name, d_out, 0, has_bias).values())
        compressor.inner.ranks[name] -= 1
        return after - before

    spent = 0
    while True:
        best, best_value = None, -1.0
        for name, (singular, bias) in energies.items():
            rank = ranks[name]
            if rank >= len(singular):
                continue
            cost = step_bytes(name)
            if spent + cost > budget:
                continue
            # At full rank the layer is stored exactly: the step gains every remaining singular value.
            gain = float(singular[rank:].sum() if rank + 1 == len(singular) else singular[rank]) + (0 if rank else bias)
            value = torch.inf if cost <= 0 else gain / cost
            if value > best_value:
                best, best_value, best_cost = name, value, cost
        if best is None:
            return dict(ranks)
        spent += best_cost
        ranks[best] += 1


def singular_energies(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Summed over a batch of whitened gradients (n, d_out, width): their squared singular values, largest first,
    and their biases' squared norms (what `allocate_ranks` weighs; sums over the same examples for every layer)."""
    gram = weight @ weight.transpose(1, 2) if weight.shape[1] <= weight.shape[2] else weight.transpose(1, 2) @ weight
    energies = torch.linalg.eigvalsh(gram.to(torch.float64)).flip(-1).clamp_min(0).sum(0)
    return energies, 0.0 if bias is None else float(bias.to(torch.float64).square().sum())


def basis_tensors(compressor: EigenbasisCompressor) -> dict[str, torch.Tensor]:
    """Every layer's basis, scales and rank as `"{module}.{field}"` tensors (the saved file)."""
    tensors = {}
    for name, basis in compressor.bases.items():
        for field in BASIS_FIELDS:
            value = getattr(basis, field)
            if value is not None:
                tensors[f"{name}.{field}"] = value.contiguous()
        tensors[f"{name}.rank"] = torch.tensor([compressor.ranks[name]], dtype=torch.int64)
    return tensors


def compressor_from_tensors(tensors: Mapping[str, torch.Tensor], modules: list[str]) -> EigenbasisCompressor:
    """The inverse of `basis_tensors` for the layers `modules`; a layer missing a tensor is refused by name."""
    bases, ranks = {}, {}
    for name in modules:
        for field in ("gradient_eigenvectors", "activation_eigenvectors", "weight_scales", "rank"):
            if f"{name}.{field}" not in tensors:
                raise ValueError(f"The index's {BASIS_FILE} lacks {name}.{field}: it is not this index's file.")
        bases[name] = WhitenedBasis(**{field: tensors.get(f"{name}.{field}") for field in BASIS_FIELDS})
        ranks[name] = int(tensors[f"{name}.rank"][0])
    return EigenbasisCompressor(bases, ranks)
