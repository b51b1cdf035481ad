"""Gradient compressors for the index: none, per-layer low-rank SVD, Kronecker random projection, SVD of
gradients whitened in the fitted factors' eigenbasis (`eigenbasis_compression.py`), each optionally followed by
8-bit quantisation.

A compressor turns a layer's per-example gradients into the tensors an index shard stores, turns a
(preconditioned) query gradient into the matching query-side form, and scores one against the
other. Inner products are what is preserved: ⟨query, train⟩ ≈ ⟨compressed query, compressed train⟩.
A linear compressor also offers `transform`, applied to each part of a gradient as it arrives (so the
full gradient of a wide layer is never accumulated). `layout` says what one example's entry for a layer
holds, in bytes per stored tensor (fp32 gradients), without computing anything: shard sizes and plans use it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .seeding import seeded_generator

if TYPE_CHECKING:
    from .index import IndexConfig

COMPRESSIONS = ("none", "svd", "projection", "eigenbasis")

Stored = dict[str, torch.Tensor]  # a layer's tensors in a shard, by key ("weight", "bias", ...)
# Per layer: (P_out (d_out, k_out), P_in (d_in, k_in)) for Kronecker-structured projections.
Projections = dict[str, tuple[torch.Tensor, torch.Tensor]]


def kronecker_projections(shapes: dict[str, tuple[int, int]], dim: int, seed: int) -> Projections:
    """Gaussian `P_out` (d_out × k_out) and `P_in` (d_in × k_in) per layer, entries N(0, 1/k), so that
    E[P Pᵀ] = I and inner products are preserved in expectation. A side no larger than `dim` keeps
    the identity (no error). Seeded by (seed, layer name): the same matrices on every machine."""
    projections = {}
    for name, (d_out, d_in) in shapes.items():
        generator = seeded_generator(seed, "projection", name)
        projections[name] = (_gaussian(d_out, dim, generator), _gaussian(d_in, dim, generator))
    return projections


def _gaussian(size: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    if size <= dim:
        return torch.eye(size)
    return torch.randn(size, dim, generator=generator) / dim**0.5


class Compressor:
    """No compression: the exact gradients (the projection compressor reuses this storage)."""

    def transform(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The linear part of the compression, applied to gradients as they arrive (the identity here)."""
        return weight, bias

    def encode(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stored:
        stored = {"weight": weight.flatten(1)}
        if bias is not None:
            stored["bias"] = bias
        return stored

    def layout(self, name: str, d_out: int, d_in: int, has_bias: bool) -> dict[str, int]:
        """Bytes per example of each tensor `encode` stores for a layer of weight shape (d_out, d_in)."""
        return {"weight": 4 * d_out * d_in} | ({"bias": 4 * d_out} if has_bias else {})

    def query(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stored:
        """The query-side form of preconditioned query gradients `(Q, d_out, d_in)`, `(Q, d_out)`."""
        return self.encode(name, weight, bias)

    def space_shape(self, name: str, d_out: int, d_in: int) -> tuple[int, int]:
        """A layer's weight shape after `transform`: the space where stored and query-side forms are compared."""
        return d_out, d_in

    def scores(self, name: str, query: Stored, stored: Stored) -> torch.Tensor:
        """`(Q, n)` inner products of query-side forms with stored examples."""
        result = query["weight"] @ stored["weight"].to(query["weight"].dtype).T
        if "bias" in query:
            result += query["bias"] @ stored["bias"].to(query["bias"].dtype).T
        return result


class ProjectionCompressor(Compressor):
    """`P_outᵀ ∇W P_in` (and `P_outᵀ ∇b`): training gradients are projected as they arrive (`transform`),
    queries with the same matrices."""

    def __init__(self, projections: Projections) -> None:
        self.projections = projections

    def transform(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        project_out, project_in = (p.to(weight.device, weight.dtype) for p in self.projections[name])
        return project_out.T @ weight @ project_in, None if bias is None else bias @ project_out

    def layout(self, name: str, d_out: int, d_in: int, has_bias: bool) -> dict[str, int]:
        project_out, project_in = self.projections[name]
        return super().layout(name, project_out.shape[1], project_in.shape[1], has_bias)

    def query(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stored:
        return self.encode(name, *self.transform(name, weight, bias))

    def space_shape(self, name: str, d_out: int, d_in: int) -> tuple[int, int]:
        project_out, project_in = self.projections[name]
        return project_out.shape[1], project_in.shape[1]


class SVDCompressor(Compressor):
    """Rank-`r` truncation of each example's weight gradient, `∇W ≈ L R` with L (d_out × r) and
    R (r × d_in); layers with min(d_out, d_in) ≤ r and biases are stored exactly.

    The truncation projects ∇W onto its top-r singular subspace on the smaller side, found from the
    eigenvectors of the small Gram matrix (fast for the wide layers of a UNet, and the best rank-r
    approximation, by Eckart–Young)."""

    def __init__(self, rank: int | dict[str, int]) -> None:
        """`rank`: one rank for every layer (≥ 1), or each layer's by name (≥ 0; a layer at rank 0 stores nothing)."""
        if isinstance(rank, int) and rank < 1:
            raise ValueError(f"The SVD rank must be at least 1, got {rank}.")
        self.rank = rank if isinstance(rank, int) else None
        self.ranks = rank if isinstance(rank, dict) else {}

    def rank_of(self, name: str) -> int:
        return self.ranks[name] if self.rank is None else self.rank

    def encode(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stored:
        d_out, d_in = weight.shape[1:]
        rank = self.rank_of(name)
        if not rank:
            return {}
        if min(d_out, d_in) <= rank:
            return super().encode(name, weight, bias)
        if d_out <= d_in:  # ∇W ≈ U Uᵀ ∇W with U the top left singular vectors
            basis = _top_eigenvectors(weight @ weight.transpose(1, 2), rank)
            stored = {"weight.left": basis, "weight.right": basis.transpose(1, 2) @ weight}
        else:  # ∇W ≈ ∇W V Vᵀ with V the top right singular vectors
            basis = _top_eigenvectors(weight.transpose(1, 2) @ weight, rank)
            stored = {"weight.left": weight @ basis, "weight.right": basis.transpose(1, 2)}
        if bias is not None:
            stored["bias"] = bias
        return stored

    def layout(self, name: str, d_out: int, d_in: int, has_bias: bool) -> dict[str, int]:
        rank = self.rank_of(name)
        if not rank:
            return {}
        if min(d_out, d_in) <= rank:
            return super().layout(name, d_out, d_in, has_bias)
        factors = {"weight.left": 4 * d_out * rank, "weight.right": 4 * rank * d_in}
        return factors | ({"bias": 4 * d_out} if has_bias else {})

    def query(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stored:
        return {"weight.full": weight} | ({} if bias is None else {"bias": bias})

    def scores(self, name: str, query: Stored, stored: Stored) -> torch.Tensor:
        if not stored:  # a layer at rank 0
            return torch.zeros(())
        weight = query["weight.full"]  # (Q, d_out, d_in)
        if "weight" in stored:  # stored exactly
            return super().scores(name, {"weight": weight.flatten(1)} | _bias(query), stored)
        left, right = stored["weight.left"].to(weight.dtype), stored["weight.right"].to(weight.dtype)
        examples, rank, d_in = right.shape
        # ⟨V, L R⟩ = Σ_r l_rᵀ V r_r: one matmul of V with every stored R, then a contraction with L.
        projected = (weight.reshape(-1, d_in) @ right.reshape(-1, d_in).T).view(len(weight), -1, examples, rank)
        result = torch.einsum("qonr,nor->qn", projected, left)
        if "bias" in query:
            result += query["bias"] @ stored["bias"].to(weight.dtype).T
        return result


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` leading eigenvectors (batch, d, rank) of symmetric matrices, computed in fp64, each signed so that
    its largest entry is positive: the same stored factors however the examples were batched (several processes)."""
    _, vectors = torch.linalg.eigh(gram.to(torch.float64))
    vectors = vectors[..., -rank:].flip(-1)
    largest = vectors.gather(-2, vectors.abs().argmax(-2, keepdim=True))
    return (vectors * largest.sign()).to(gram.dtype)


def _bias(stored: Stored) -> Stored:
    return {"bias": stored["bias"]} if "bias" in stored else {}


class Quantized(Compressor):
    """8-bit affine quantisation of every stored tensor, per example: `x ≈ min + code · scale`."""

    def __init__(self, inner: Compressor, bits: int = 8) -> None:
        if bits != 8:
            raise ValueError(f"Only 8-bit quantisation is supported, got {bits} bits.")
        self.inner = inner

    def encode(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stored:
        stored = {}
        for key, value in self.inner.encode(name, weight, bias).items():
            flat = value.flatten(1).to(torch.float32)
            low, high = flat.min(dim=1).values, flat.max(dim=1).values
            scale = ((high - low) / 255).clamp_min(torch.finfo(torch.float32).tiny)
            codes = ((flat - low[:, None]) / scale[:, None]).round_().clamp_(0, 255).to(torch.uint8)
            stored |= {key: codes.view(value.shape), f"{key}.scale": scale, f"{key}.min": low}
        return stored

    def transform(
        self, name: str, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.inner.transform(name, weight, bias)

    def layout(self, name: str, d_out: int, d_in: int, has_bias: bool) -> dict[str, int]:
        """A byte per value, and an fp32 minimum and scale per tensor."""
        layout = {}
        for key, size in self.inner.layout(name, d_out, d_in, has_bias).items():
            layout |= {key: size // 4, f"{key}.scale": 4, f"{key}.min": 4}
        return layout

    def query(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Stored:
        return self.inner.query(name, weight, bias)

    def space_shape(self, name: str, d_out: int, d_in: int) -> tuple[int, int]:
        return self.inner.space_shape(name, d_out, d_in)

    def scores(self, name: str, query: Stored, stored: Stored) -> torch.Tensor:
        if isinstance(self.inner, SVDCompressor):  # scores are not linear in the stored factors: decode
            return self.inner.scores(name, query, {key: self._decode(stored, key) for key in _codes(stored)})
        # Linear inner compressors: ⟨q, min + code·scale⟩ = scale ⟨q, code⟩ + min Σq, without decoding.
        result = 0
        for key, value in query.items():
            codes = stored[key].flatten(1).to(value.dtype)
            result = (
                result
                + (value @ codes.T) * stored[f"{key}.scale"]
                + value.sum(dim=1, keepdim=True) * stored[f"{key}.min"]
            )
        return result

    @staticmethod
    def _decode(stored: Stored, key: str) -> torch.Tensor:
        codes = stored[key]
        shape = (-1,) + (1,) * (codes.dim() - 1)
        return codes.to(torch.float32) * stored[f"{key}.scale"].view(shape) + stored[f"{key}.min"].view(shape)


def _codes(stored: Stored) -> list[str]:
    return [key for key, value in stored.items() if value.dtype == torch.uint8]


def dequantized(stored: Stored) -> Stored:
    """A layer's stored entry as the scores see it: 8-bit codes decoded (an unquantized entry is returned as is)."""
    codes = _codes(stored)
    return {key: Quantized._decode(stored, key) for key in codes} if codes else stored


def bytes_per_example(compressor: Compressor, shapes: dict[str, tuple[int, int]], biases: dict[str, bool]) -> int:
    """What one example's stored tensors take, over every layer (its `layout`; the id and file header apart)."""
    return sum(sum(compressor.layout(name, *shape, biases[name]).values()) for name, shape in shapes.items())


# Measured on the test UNet (tests/test_search_sketch.py): the sketch's estimates rank the examples (Spearman
# 0.8–0.9 against the exact scores) in the factors' whitened eigenbasis, and not at all (about 0, at 512 and 2048
# values) between raw gradients (exact, SVD or projected), whose norms there far exceed the scores' spread.
SKETCH_NEEDS_WHITENING = (
    "the search sketch estimates the scores only between gradients whitened by the factors; elsewhere its estimates "
    "do not rank the examples."
)


def fit_to_budget(
    config: IndexConfig, shapes: dict[str, tuple[int, int]], biases: dict[str, bool], with_factors: bool
) -> IndexConfig:
    """The config with the compression a byte budget (`config.max_bytes_per_example`, less the search sketch's
    bytes) chooses: the exact gradients when they fit; else, `with_factors`, 8-bit "eigenbasis" (its per-layer
    ranks are chosen from a sample of gradients as the build starts: `eigenbasis_compression.py`), the best on the
    LDS benchmark at every budget; else 8-bit SVD at the largest rank whose bytes fit (layers no wider than the
    rank are stored exactly). With a search sketch, always the eigenbasis (the sketch needs its whitened space).
    A config without a budget is kept."""
    budget = config.gradient_budget
    if budget is None:
        return config
    if config.search_dim is not None:
        if not with_factors:
            raise ValueError(
                f"IndexConfig.search_dim under a budget needs the factors (build_index(..., factors=...)): "
                f"{SKETCH_NEEDS_WHITENING}"
            )
        return replace(config, compression="eigenbasis", quantize_bits=8)
    if bytes_per_example(Compressor(), shapes, biases) <= budget:
        return replace(config, compression="none", quantize_bits=None)
    if with_factors:
        return replace(config, compression="eigenbasis", quantize_bits=8)
    smallest = bytes_per_example(Quantized(SVDCompressor(1)), shapes, biases)
    if smallest > budget:
        raise ValueError(
            f"IndexConfig.max_bytes_per_example={config.max_bytes_per_example} is below the smallest index of these "
            f"{len(shapes)} layers ({smallest + config.sketch_bytes} bytes per example at 8-bit rank 1"
            + (", with the search sketch" if config.sketch_bytes else "")
            + "): raise it, pass the factors (their eigenbasis "
            "compression keeps only the layers that pay most), or index fewer layers (module_filter)."
        )
    rank = 1
    while rank < max(min(shape) for shape in shapes.values()):
        if bytes_per_example(Quantized(SVDCompressor(rank + 1)), shapes, biases) > budget:
            break
        rank += 1
    return replace(config, compression="svd", rank=rank, quantize_bits=8)


def make_compressor(
    config: IndexConfig, shapes: dict[str, tuple[int, int]], eigenbasis: Compressor | None = None
) -> Compressor:
    """The compressor an index config names, for layers of weight shapes `shapes` (for "eigenbasis", the index's
    saved `EigenbasisCompressor`)."""
    if config.compression == "eigenbasis":
        if eigenbasis is None:
            raise ValueError("compression='eigenbasis' needs the index's eigenbasis (its compression file).")
        compressor = eigenbasis
    elif config.compression == "projection":
        compressor = ProjectionCompressor(kronecker_projections(shapes, config.projection_dim, config.seed))
    elif config.compression == "svd":
        compressor = SVDCompressor(config.rank)
    else:
        compressor = Compressor()
    return compressor if config.quantize_bits is None else Quantized(compressor, config.quantize_bits)
