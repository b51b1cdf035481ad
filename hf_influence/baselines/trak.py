"""TRAK and D-TRAK for diffusion models (`method.md` §7), on the library's gradient machinery.

Each example's feature is a Gaussian random projection `φ = Pᵀ g` of its gradient `g`, averaged over
`K` draws of (t, ε); the curvature is the feature kernel `ΦᵀΦ` of the training set, and

    τ(q, j) = φ_qᵀ (ΦᵀΦ + λ I)⁻¹ φ_j.

TRAK differentiates the training loss on both sides; D-TRAK (Zheng et al., 2024) the square norm
`mean(ε_θ(x_t, t)²)` on both sides. The sign is the library's: positive = removing example j is
predicted to increase the query's measurement. Differences from the reference runs: gradients over
the Linear and Conv2d layers (GroupNorm excluded, as for K-FAC), averaged rather than summed over
draws, and `damping` relative to the kernel's mean eigenvalue `tr(ΦᵀΦ) / k`, so one value means the
same for any model, draw count or feature scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..curvature.layers import find_layers
from ..data import check_dataset
from ..deprecation import renamed_fields
from ..engine import DrawPlan, dataset_batches
from ..gradients import LayerGradients, per_example_gradients
from ..measurements import Loss, MeanOutput, SquareNorm
from ..seeding import seeded_generator
from ..task import DiffusionTask
from ..validation import check_choice, check_float, check_int, check_type

MEASUREMENTS = {"loss": Loss, "square_norm": SquareNorm, "mean_output": MeanOutput}


@renamed_fields(num_draws="draws_per_example", output_function="measurement")
@dataclass
class TRAKConfig:
    """How TRAK / D-TRAK features and scores are computed.

    Attributes:
        measurement: "loss" (TRAK: training loss on both sides), "square_norm" (D-TRAK: mean of
            the squared denoiser output on both sides) or "mean_output" (DAS: mean of the output).
        projection_dim: dimension k of the Gaussian projection of each gradient.
        draws_per_example: (t, ε) draws averaged per example, on both sides (training examples and queries).
        damping: λ relative to the mean eigenvalue of the kernel: `(ΦᵀΦ + damping · tr(ΦᵀΦ)/k · I)⁻¹`.
        seed: seeds the projection and every draw (with each example's id).
        batch_size: draws per forward/backward pass.
        examples_per_projection: examples whose full gradients are held at once; the projection
            matrices are regenerated for each such group, so larger groups are faster.
        module_filter: regex of the layers whose gradients are used; None takes every Linear/Conv2d.
        id_column: the dataset column with stable example ids.
    """

    measurement: str = "loss"
    projection_dim: int = 2048
    draws_per_example: int = 100
    damping: float = 1e-3
    seed: int = 0
    batch_size: int = 64
    examples_per_projection: int = 256
    module_filter: str | None = None
    id_column: str = "id"

    def __post_init__(self) -> None:
        check_choice("TRAKConfig.measurement (formerly output_function)", self.measurement, sorted(MEASUREMENTS))
        for name in ("projection_dim", "draws_per_example", "batch_size", "examples_per_projection"):
            setattr(self, name, check_int(f"TRAKConfig.{name}", getattr(self, name), minimum=1))
        self.damping = check_float("TRAKConfig.damping", self.damping, minimum=0)


class GaussianProjection:
    """`g ↦ Σ_layers vec(∇W_l, ∇b_l) P_l` with `P_l` (d_l × k) of i.i.d. N(0, 1/k) entries, so inner
    products are preserved in expectation. Each `P_l` is generated block by block from a CPU
    generator seeded by (seed, layer name): the same matrices on every machine and in every call,
    without ever holding the full projection in memory."""

    BLOCK_ROWS = 4096

    def __init__(self, dim: int, seed: int = 0) -> None:
        self.dim, self.seed = dim, seed

    def blocks(self, name: str, rows: int) -> Iterable[tuple[slice, torch.Tensor]]:
        """(row range, block of P_l) for a layer with `rows` gradient entries."""
        generator = seeded_generator(self.seed, "trak-projection", name)
        for start in range(0, rows, self.BLOCK_ROWS):
            stop = min(start + self.BLOCK_ROWS, rows)
            yield slice(start, stop), torch.randn(stop - start, self.dim, generator=generator) / math.sqrt(self.dim)

    def matrix(self, name: str, rows: int) -> torch.Tensor:
        """The full `P_l` (for tests and small layers)."""
        return torch.cat([block for _, block in self.blocks(name, rows)])

    def project(self, gradients: LayerGradients) -> torch.Tensor:
        """`(B, k)` fp64 projections of per-example layer gradients (weight then bias, flattened, per layer);
        each layer's product runs in the gradients' dtype and is summed over layers in fp64."""
        result = None
        for name, (weight, bias) in gradients.items():
            flat = weight.flatten(1) if bias is None else torch.cat([weight.flatten(1), bias], dim=1)
            flat = flat.cpu()
            if result is None:
                result = torch.zeros(len(flat), self.dim, dtype=torch.float64)
            for rows, block in self.blocks(name, flat.shape[1]):
                result += (flat[:, rows] @ block.to(flat.dtype)).to(torch.float64)
        return result


class TRAK:
    """TRAK (or D-TRAK) fitted to a training set: its projected features and kernel.

    The kernel's eigendecomposition is cached, so scores at another damping cost one matmul.
    """

    def __init__(self, task: DiffusionTask, train_dataset: Iterable[dict[str, Any]], config: TRAKConfig | None = None):
        call = "TRAK(task, train_dataset, config)"
        self.task = check_type("task", task, DiffusionTask, call)
        check_dataset(train_dataset, "train_dataset")
        self.config = check_type("config", config or TRAKConfig(), TRAKConfig, call)
        self.layers = find_layers(task.denoiser, self.config.module_filter)
        self.projection = GaussianProjection(self.config.projection_dim, self.config.seed)
        measurement = MEASUREMENTS[self.config.measurement]()
        c = self.config
        self.train_plan = DrawPlan(measurement, c.draws_per_example, c.seed, "train", c.batch_size, augment=True)
        self.query_plan = DrawPlan(measurement, c.draws_per_example, c.seed, "query", c.batch_size)
        features, ids = [], []
        batches = dataset_batches(train_dataset, task, c.examples_per_projection, c.id_column, "TRAK features")
        for batch in batches:
            features.append(self._train_features(batch.examples, batch.ids))
            ids.extend(batch.ids)
        self.train_features = torch.cat(features)  # (N, k) fp64
        self.ids = ids
        kernel = self.train_features.T @ self.train_features
        self.kernel_eigenvalues, self.kernel_eigenvectors = torch.linalg.eigh((kernel + kernel.T) / 2)
        self.kernel_scale = kernel.trace().item() / c.projection_dim

    def _features(self, examples: Any, ids: list[Any], plan: DrawPlan) -> torch.Tensor:
        gradients = per_example_gradients(self.task, self.layers, examples, ids, plan)
        return self.projection.project(gradients)

    def _train_features(self, examples: Any, ids: list[Any]) -> torch.Tensor:
        return self._features(examples, ids, self.train_plan)

    def query_features(self, queries: Any) -> torch.Tensor:
        """`(Q, k)` projected measurement gradients of generated images (query i has id i), unconditional."""
        samples = self.task.examples(queries)
        step = self.config.examples_per_projection
        parts = []
        for start in range(0, len(samples), step):
            ids = list(range(start, min(start + step, len(samples))))
            parts.append(self._features(samples[start : start + step], ids, self.query_plan))
        return torch.cat(parts)

    def scores_from_features(self, query_features: torch.Tensor, damping: float | None = None) -> torch.Tensor:
        """`(Q, N)` fp64 scores `φ_q (ΦᵀΦ + λ I)⁻¹ Φᵀ` with λ = damping · tr(ΦᵀΦ)/k."""
        damping = self.config.damping if damping is None else check_float("damping", damping, minimum=0)
        absolute = damping * self.kernel_scale
        inverse = 1.0 / (self.kernel_eigenvalues + absolute)
        if not torch.isfinite(inverse).all():
            raise ValueError("The TRAK kernel is singular at damping 0: use a positive damping.")
        rotated = query_features.to(torch.float64) @ self.kernel_eigenvectors
        return (rotated * inverse) @ (self.train_features @ self.kernel_eigenvectors).T

    def scores(self, queries: Any, damping: float | None = None) -> torch.Tensor:
        """`(Q, N)` scores of generated samples against every training example, in the dataset's order."""
        return self.scores_from_features(self.query_features(queries), damping)
