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


def _random_basis(d_out: int, d_in: int, generator: torch.Generator):
    """A random orthonormal Kronecker eigenbasis and curvature Λ spread over four orders of magnitude."""
    from hf_influence.eigenbasis_compression import WhitenedBasis

    q_g = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64, generator=generator))[0]
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64, generator=generator))[0]
    eigenvalues = 10 ** (4 * torch.rand(d_out, d_in, dtype=torch.float64, generator=generator) - 4)
    bias_eigenvalues = 10 ** (4 * torch.rand(d_out, dtype=torch.float64, generator=generator) - 4)
    basis = WhitenedBasis(q_g, q_a, eigenvalues.sqrt(), bias_eigenvalues.sqrt())
    return basis, eigenvalues, bias_eigenvalues


@pytest.mark.parametrize("shape", [(6, 5, 9), (6, 9, 5)])
def test_eigenbasis_compression_is_the_best_rank_r_approximation_of_the_whitened_gradient(shape):
    """Against the dense definition: full rank gives the exact preconditioned scores ⟨∇W, (F̂ + λ)⁻¹ q⟩ with
    F̂ = (Q_G ⊗ Q_A) diag(Λ) (Q_G ⊗ Q_A)ᵀ; rank r gives ⟨best rank-r approximation of Λ^-½ ∘ Q_Gᵀ ∇W Q_A, the
    query whitened the same way⟩."""
    from hf_influence.eigenbasis_compression import EigenbasisCompressor

    generator = torch.Generator().manual_seed(3)
    examples, d_out, d_in = shape
    basis, eigenvalues, bias_eigenvalues = _random_basis(d_out, d_in, generator)
    weight = torch.randn(examples, d_out, d_in, dtype=torch.float64, generator=generator)
    bias = torch.randn(examples, d_out, dtype=torch.float64, generator=generator)
    query_weight = torch.randn(2, d_out, d_in, dtype=torch.float64, generator=generator)
    query_bias = torch.randn(2, d_out, dtype=torch.float64, generator=generator)
    damping = 1e-3
    kronecker = torch.kron(basis.gradient_eigenvectors, basis.activation_eigenvectors)
    curvature = kronecker @ torch.diag(eigenvalues.flatten()) @ kronecker.T
    preconditioned = torch.linalg.solve(
        curvature + damping * torch.eye(d_out * d_in, dtype=torch.float64), query_weight.flatten(1).T
    ).T.reshape(query_weight.shape)
    bias_curvature = basis.gradient_eigenvectors @ torch.diag(bias_eigenvalues) @ basis.gradient_eigenvectors.T
    preconditioned_bias = torch.linalg.solve(
        bias_curvature + damping * torch.eye(d_out, dtype=torch.float64), query_bias.T
    ).T
    exact = weight.flatten(1) @ preconditioned.flatten(1).T + bias @ preconditioned_bias.T  # (examples, queries)

    def scores(rank: int) -> torch.Tensor:
        compressor = EigenbasisCompressor({"layer": basis}, {"layer": rank})
        stored = compressor.encode("layer", *compressor.transform("layer", weight, bias))
        return compressor.scores("layer", compressor.query("layer", preconditioned, preconditioned_bias), stored)

    torch.testing.assert_close(scores(min(d_out, d_in)), exact.T)
    whitened = basis.gradient_eigenvectors.T @ weight @ basis.activation_eigenvectors / eigenvalues.sqrt()
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    best = u[:, :, :2] @ torch.diag_embed(s[:, :2]) @ vh[:, :2]
    query_side = basis.gradient_eigenvectors.T @ preconditioned @ basis.activation_eigenvectors * eigenvalues.sqrt()
    bias_part = bias @ preconditioned_bias.T  # biases are stored exactly: whitening and rotation cancel
    torch.testing.assert_close(scores(2), (best.flatten(1) @ query_side.flatten(1).T + bias_part).T)
    assert not EigenbasisCompressor({"layer": basis}, {"layer": 0}).encode("layer", weight, bias)  # rank 0: nothing


def test_allocated_ranks_meet_the_budget_and_leave_no_step_that_fits():
    from hf_influence.compression import Quantized, bytes_per_example
    from hf_influence.eigenbasis_compression import EigenbasisCompressor, allocate_ranks, singular_energies

    generator = torch.Generator().manual_seed(4)
    shapes = {"wide": (8, 40), "tall": (30, 6), "small": (3, 3)}
    bases, energies = {}, {}
    for name, (d_out, d_in) in shapes.items():
        bases[name] = _random_basis(d_out, d_in, generator)[0]
        # a sample whose spectrum decays at a layer-specific rate
        decay = torch.linspace(0, 3 * len(name), min(d_out, d_in), dtype=torch.float64).neg().exp()
        weight = torch.randn(5, d_out, min(d_out, d_in), dtype=torch.float64, generator=generator) * decay
        weight = weight @ torch.randn(min(d_out, d_in), d_in, dtype=torch.float64, generator=generator)
        energies[name] = singular_energies(weight, torch.randn(5, d_out, generator=generator))
    biases = dict.fromkeys(shapes, True)
    for budget in (60, 300, 700, 5000):
        ranks = allocate_ranks(bases, energies, budget)
        used = bytes_per_example(Quantized(EigenbasisCompressor(bases, ranks)), shapes, biases)
        assert used <= budget
        for name in shapes:  # greedy to the end: no single rank step still fits
            if ranks[name] < min(shapes[name]):
                raised = ranks | {name: ranks[name] + 1}
                assert bytes_per_example(Quantized(EigenbasisCompressor(bases, raised)), shapes, biases) > budget
    assert allocate_ranks(bases, energies, 10**6) == {name: min(shape) for name, shape in shapes.items()}
