"""The search sketch: one short vector per indexed example whose inner products estimate its influence scores.

Exhaustive top-k over a million 16 KB entries reads 16 GB and, for low-rank entries, costs rank × the layer's
size per example and query: minutes on a CPU. With `IndexConfig(search_dim=m)` every example also stores
`s = Σ_layers S_l vec(E_l) / √m` (bf16, 2m bytes), where E_l is the layer's stored entry in the space the scores
are inner products in and `S_l` has rows `p_j ⊗ r_j` (Gaussian `p_j`, `r_j`: a Khatri–Rao, or "Kronecker JL",
sketch, applied to a rank-r entry as `(p_jᵀ L)(R r_j)` without forming it). Then `⟨s_query, s_example⟩` is an
unbiased estimate of the score, with a standard error of about `‖query‖ ‖example‖ / √m`. A search scores every
example by its sketch (one [N, m] × [m, Q] product), then rescores the best and worst candidates exactly from
their full entries; only those entries are read.
"""

from __future__ import annotations

import torch

from ..compression import Stored
from ..seeding import seeded_generator

SKETCH_KEY = "sketch"  # the shard tensor (n, m), bf16
KEPT_VALUES = 64 * 2**20  # Gaussians kept between calls, at most (256 MB of fp32)


class SearchSketch:
    """The sketch of `dim` values shared by an index's entries and its queries; its Gaussians are drawn from
    (seed, layer name), so every process and every later query uses the same."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim = dim
        self.seed = seed
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._kept_values = 0

    def _gaussians(self, name: str, d_out: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P (d_out, m) and R (width, m) for the weight, B (d_out, m) for the bias. Drawing them is most of a
        query's sketch, so they are kept while all kept take at most `KEPT_VALUES` floats (a large model's would
        take gigabytes: the rest are drawn anew each time)."""
        if name in self._kept:
            return self._kept[name]
        generator = seeded_generator(self.seed, "search-sketch", name)
        gaussians = tuple(torch.randn(size, self.dim, generator=generator) for size in (d_out, width, d_out))
        values = (2 * d_out + width) * self.dim
        if self._kept_values + values <= KEPT_VALUES:
            self._kept[name] = gaussians
            self._kept_values += values
        return gaussians

    def layer(self, name: str, entry: Stored, space_shape: tuple[int, int]) -> torch.Tensor:
        """`(n, m)`: one layer's part of the sketch of `n` entries (stored or query-side forms, dequantized): a dense
        `weight` (flattened) or `weight.full`, or low-rank `weight.left` (n, d_out, r) and `weight.right`
        (n, r, width); and an optional `bias`."""
        d_out, width = space_shape
        left, right, bias = self._gaussians(name, d_out, width)
        if "weight.left" in entry:
            outer = torch.einsum("nor,om->nrm", entry["weight.left"].float(), left)
            inner = torch.einsum("nrw,wm->nrm", entry["weight.right"].float(), right)
            result = (outer * inner).sum(1)
        elif entry:
            weight = (entry["weight.full"] if "weight.full" in entry else entry["weight"]).float()
            projected = weight.reshape(-1, d_out, width) @ right  # (n, d_out, m)
            result = (projected * left).sum(1)
        else:  # a layer at rank 0 stores nothing
            return torch.zeros(())
        if "bias" in entry:
            result = result + entry["bias"].float() @ bias
        return result / self.dim**0.5

    def of(self, entries: dict[str, Stored], space_shapes: dict[str, tuple[int, int]]) -> torch.Tensor:
        """`(n, m)` fp32: the sketch of `n` examples' (or queries') entries in every layer."""
        return sum(self.layer(name, entry, space_shapes[name]) for name, entry in entries.items())
