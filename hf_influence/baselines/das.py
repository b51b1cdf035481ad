"""DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025), on the TRAK machinery (`trak.py`).

DAS attributes the change of the denoiser's *output* rather than of a loss. Linearising the output in the
parameters, `ε_θ'(x_t, t) ≈ ε_θ(x_t, t) + J (θ' − θ)`, and taking the TRAK (Gauss-Newton) kernel of the
output's Jacobian gives

    τ(q, j) = φ_qᵀ (ΦᵀΦ + λ I)⁻¹ φ_j · r_j,

where `φ` is the projected gradient of `mean(ε_θ(x_t, t))` averaged over the (t, ε) draws (the same
features on both sides, `MeanOutput`), and `r_j` weights training example j by how far the model is from
fitting it: its root-mean-square residual `‖ε − ε_θ(x_t, t)‖ / √D` averaged over the same draws as its
features (TRAK's residual term; an example the model already fits exactly moves nothing). λ is relative to
the kernel's mean eigenvalue, as for TRAK, so the same sweep applies to all three baselines.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..engine import run_draws
from ..task import DiffusionTask
from .trak import TRAK, TRAKConfig


class DAS(TRAK):
    """DAS fitted to a training set: its projected output-gradient features, residuals and kernel.

    Takes a `TRAKConfig` whose measurement is "mean_output" (the default here); everything else — the
    projection, draws, damping, batching — means what it means for TRAK.
    """

    def __init__(self, task: DiffusionTask, train_dataset: Iterable[dict[str, Any]], config: TRAKConfig | None = None):
        config = config or TRAKConfig(measurement="mean_output")
        if isinstance(config, TRAKConfig) and config.measurement != "mean_output":
            raise ValueError(
                f"DAS differentiates the mean output: TRAKConfig.measurement must be 'mean_output', "
                f"got {config.measurement!r}."
            )
        self._residual_parts: list[torch.Tensor] = []
        super().__init__(task, train_dataset, config)
        self.residuals = torch.cat(self._residual_parts)  # (N,) fp64
        del self._residual_parts

    def _train_features(self, examples: Any, ids: list[Any]) -> torch.Tensor:
        self._residual_parts.append(self._residuals(examples, ids))
        return super()._train_features(examples, ids)

    def _residuals(self, examples: Any, ids: list[Any]) -> torch.Tensor:
        """Each example's RMS residual averaged over its training draws (the features' draws, no graph)."""
        totals = torch.zeros(len(ids), dtype=torch.float64)
        draws = self.train_plan.draws_per_example

        def accumulate(rows: slice, output: Any, _draws: Any) -> None:
            rms = (output.prediction - output.target).double().pow(2).flatten(1).mean(dim=1).sqrt()
            totals[rows] += rms.cpu().view(rows.stop - rows.start, -1).sum(dim=1) / draws

        run_draws(self.task, examples, ids, self.train_plan, accumulate, grad=False)
        return totals

    def scores_from_features(self, query_features: torch.Tensor, damping: float | None = None) -> torch.Tensor:
        """`(Q, N)` fp64 scores `φ_q (ΦᵀΦ + λ I)⁻¹ φ_j r_j` with λ = damping · tr(ΦᵀΦ)/k."""
        return super().scores_from_features(query_features, damping) * self.residuals
