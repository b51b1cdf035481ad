"""Compressors against their definitions: best rank-r approximation, unbiased projections, 8-bit error."""

from __future__ import annotations

import pytest
import torch

from hf_influence.compression import Compressor, ProjectionCompressor, Quantized, SVDCompressor, kronecker_projections


@pytest.mark.parametrize("shape", [(6, 8, 30), (6, 30, 8)])
def test_svd_is_the_best_rank_r_approximation(shape):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64, generator=generator)
    queries = torch.randn(3, *shape[1:], dtype=torch.float64, generator=generator)
    compressor = SVDCompressor(rank=3)
    stored = compressor.encode("layer", weight, None)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    best = u[:, :, :3] @ torch.diag_embed(s[:, :3]) @ vh[:, :3]  # Eckart–Young
    torch.testing.assert_close(stored["weight.left"] @ stored["weight.right"], best)
    scores = compressor.scores("layer", compressor.query("layer", queries, None), stored)
    torch.testing.assert_close(scores, queries.flatten(1) @ best.flatten(1).T)


def test_svd_keeps_small_layers_and_biases_exact():
    weight, bias = torch.randn(4, 2, 9), torch.randn(4, 2)
    compressor = SVDCompressor(rank=3)
    stored = compressor.encode("layer", weight, bias)
    query_weight, query_bias = torch.randn(2, 2, 9), torch.randn(2, 2)
    expected = query_weight.flatten(1) @ weight.flatten(1).T + query_bias @ bias.T
    torch.testing.assert_close(
        compressor.scores("layer", compressor.query("layer", query_weight, query_bias), stored), expected
    )


def test_kronecker_projection_preserves_inner_products_in_expectation():
    shapes = {f"layer{i}": (40, 50) for i in range(200)}
    projections = kronecker_projections(shapes, dim=10, seed=0)
    generator = torch.Generator().manual_seed(1)
    query, train = torch.randn(1, 40, 50, generator=generator), torch.randn(1, 40, 50, generator=generator)
    exact = (query * train).sum()
    estimates = []
    for name in shapes:  # 200 independent projections of the same pair
        compressor = ProjectionCompressor({name: projections[name]})
        out, inp = projections[name]
        stored = compressor.encode(name, out.T @ train @ inp, None)  # as the gradient hooks store it
        estimates.append(compressor.scores(name, compressor.query(name, query, None), stored))
    estimates = torch.cat(estimates).flatten()
    standard_error = estimates.std() / len(estimates) ** 0.5
    assert abs(estimates.mean() - exact) < 4 * standard_error
    # and the same seed gives the same matrices
    again = kronecker_projections(shapes, dim=10, seed=0)
    assert torch.equal(again["layer7"][0], projections["layer7"][0])


def test_eight_bit_scores_are_within_the_quantisation_error():
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(5, 6, 7, generator=generator), torch.randn(5, 6, generator=generator)
    query_weight, query_bias = torch.randn(3, 6, 7, generator=generator), torch.randn(3, 6, generator=generator)
    quantized = Quantized(Compressor())
    stored = quantized.encode("layer", weight, bias)
    assert stored["weight"].dtype == torch.uint8
    exact = query_weight.flatten(1) @ weight.flatten(1).T + query_bias @ bias.T
    scores = quantized.scores("layer", quantized.query("layer", query_weight, query_bias), stored)
    # each value is off by at most half a step; bound the error of the inner products accordingly
    bound = (query_weight.flatten(1).abs().sum(1, keepdim=True) * stored["weight.scale"] / 2) + (
        query_bias.abs().sum(1, keepdim=True) * stored["bias.scale"] / 2
    )
    assert ((scores - exact).abs() <= bound * 1.001 + 1e-5).all()
    # the SVD path decodes instead of using the affine identity: same answer for an exactly stored layer
    svd = Quantized(SVDCompressor(rank=8))
    torch.testing.assert_close(
        svd.scores("layer", svd.query("layer", query_weight, query_bias), svd.encode("layer", weight, bias)),
        scores,
    )
