"""What fitting backpropagates through the capture: the GGN's output-side factor (`method.md` §3.1, §3.3).

Per draw, the capture turns each backpropagated vector `s` at the denoiser output into the layers' `g`; the
covariances of those `g` are the GGN's. With a per-draw loss `ℓ = mean((f − y)²)` over `D` output elements:

* GGN^model, Monte Carlo (the paper's): `s = sqrt(2/D) ξ` with `ξ ~ N(0, I)`, so `E[s sᵀ] = 2/D I`, the loss's
  curvature in the output: an unbiased estimate of `Jᵀ (2/D) J`.
* GGN^model, exact: `s = sqrt(2/D) e_k` for every output element `k` (`D` backward passes per draw; for small
  models and tests).
* GGN^loss: `s = ∂ℓ/∂f` with the true target, the per-draw loss gradient (an empirical Fisher).

A training loss weighted per draw (`w ℓ`, flow-matching loss weightings) has curvature `2w/D I`: the probes are
scaled by `sqrt(w)` per draw.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

GGN_KINDS = ("model", "loss")
OUTPUT_CURVATURES = ("mc", "exact")


def backpropagated_values(
    prediction: torch.Tensor,
    loss_per_draw: torch.Tensor,
    probe: torch.Tensor,
    ggn: str,
    output_curvature: str,
    weights: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, bool]]:
    """The scalars whose gradients with respect to the outputs are each draw's vectors `s`, and whether each is
    the last (the graph can be freed after it). `prediction` is `(S, ...)`, `loss_per_draw` `(S,)` (weighted, when
    the training loss is), `probe` (`ξ`, shaped like `prediction`) is used by the Monte-Carlo GGN^model only, and
    `weights` `(S,)` are the training loss weights, if any."""
    if ggn == "loss":
        if not torch.isfinite(loss_per_draw).all():
            raise FloatingPointError("The training loss is NaN or infinite: check the model weights and the data.")
        yield loss_per_draw.sum(), True
        return
    scale = math.sqrt(2.0 / prediction[0].numel())
    if weights is not None:
        prediction = prediction * weights.sqrt().view(-1, *([1] * (prediction.dim() - 1)))
    if output_curvature == "mc":
        yield (prediction * probe.to(prediction.device, prediction.dtype)).sum() * scale, True
        return
    flat = prediction.flatten(1)
    for k in range(flat.shape[1]):
        yield flat[:, k].sum() * scale, k == flat.shape[1] - 1
