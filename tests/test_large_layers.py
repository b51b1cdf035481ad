"""The large-layer approximation (`curvature/large_layers.py`): a truncated activation eigenbasis with the
remainder as a scaled identity, checked against dense matrices and against exact (untruncated) fits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from conftest import mnist_dataset, tiny_unet, toy_task
from diffusers import DDPMScheduler
from scipy.stats import spearmanr
from torch import nn

import hf_influence as hfi
from hf_influence.curvature import LayerFactors, get_strategy
from hf_influence.curvature.eigen import eigendecompose
from hf_influence.curvature.large_layers import truncate


def decaying_covariance(size: int, seed: int = 0) -> torch.Tensor:
    """A random fp64 covariance whose spectrum decays like an activation factor's (power law)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    spectrum = torch.arange(1, size + 1, dtype=torch.float64) ** -1.5
    return basis @ torch.diag(spectrum) @ basis.T


def approximation(covariance: torch.Tensor, rank: int) -> torch.Tensor:
    """`Q_k Λ_k Q_kᵀ + σ (I − Q_k Q_kᵀ)` from the truncated factors."""
    values, vectors, residual = truncate(*eigendecompose(covariance), rank)
    projector = vectors @ vectors.T
    return vectors @ torch.diag(values) @ vectors.T + residual * (
        torch.eye(len(covariance), dtype=covariance.dtype) - projector
    )


def test_truncation_keeps_trace_and_leading_spectrum_on_a_mid_sized_factor() -> None:
    covariance = decaying_covariance(1024)
    exact = torch.linalg.eigvalsh(covariance).flip(0)
    errors = []
    for rank in (64, 256, 1023):
        approx = approximation(covariance, rank)
        assert torch.trace(approx) == pytest.approx(torch.trace(covariance).item(), rel=1e-10)
        # The approximation's spectrum: the k leading eigenvalues exactly, then σ repeated.
        approx_values = torch.linalg.eigvalsh(approx).flip(0)
        torch.testing.assert_close(approx_values[:rank], exact[:rank], rtol=1e-9, atol=1e-12)
        sigma = exact[rank:].mean()
        torch.testing.assert_close(approx_values[rank:], sigma.expand(1024 - rank), rtol=1e-8, atol=1e-12)
        # Frobenius error from the discarded eigenvalues alone (an independent formula).
        predicted = (exact[rank:] - sigma).norm() / exact.norm()
        errors.append(((approx - covariance).norm() / covariance.norm()).item())
        assert errors[-1] == pytest.approx(predicted.item(), rel=1e-6, abs=1e-12)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-10  # one discarded direction is an eigenvector: exact


@pytest.mark.parametrize("rank", [5, 31])
def test_damped_inverse_matches_the_dense_kronecker_inverse(rank: int) -> None:
    """K-FAC preconditioning of a truncated layer is exactly `(G ⊗ Â + λI)⁻¹` applied to vec(V)."""
    d_out, d_in, damping = 6, 32, 1e-3
    activation, gradient = decaying_covariance(d_in, seed=1), decaying_covariance(d_out, seed=2)
    a_values, a_vectors, residual = truncate(*eigendecompose(activation), rank)
    g_values, g_vectors = eigendecompose(gradient)
    layer = LayerFactors(
        activation_eigenvectors=a_vectors,
        activation_eigenvalues=a_values,
        activation_residual_eigenvalue=residual,
        gradient_eigenvectors=g_vectors,
        gradient_eigenvalues=g_values,
        bias_eigenvalues=g_values,
    )
    weight = torch.randn(3, d_out, d_in, dtype=torch.float64)
    bias = torch.randn(3, d_out, dtype=torch.float64)
    ours, ours_bias = get_strategy("kfac").precondition(layer, weight, bias, damping)
    # W row-major: vec(G W Aᵀ) = (G ⊗ A) vec(W), so the weight block is kron(G, Â).
    dense = torch.kron(gradient, approximation(activation, rank)) + damping * torch.eye(
        d_out * d_in, dtype=torch.float64
    )
    expected = torch.linalg.solve(dense, weight.reshape(3, -1).T).T.reshape(3, d_out, d_in)
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10)
    expected_bias = torch.linalg.solve(gradient + damping * torch.eye(d_out, dtype=torch.float64), bias.T).T
    torch.testing.assert_close(ours_bias, expected_bias, rtol=1e-8, atol=1e-10)


def two_conv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1)).double()


def image_rows(count: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 2, 6, 6, generator=generator, dtype=torch.float64) * 2 - 1
    return [{"image": image, "id": i} for i, image in enumerate(images)]


def test_ekfac_correction_in_the_truncated_basis_matches_the_exact_fit() -> None:
    """The kept columns are the exact fit's corrected eigenvalues of the same directions, and the complement's
    value is the mean of the exact corrected eigenvalues over the discarded directions."""
    task = toy_task(two_conv(), 2, 6)
    rows = image_rows(24)
    common = {"draws_per_example": 2, "batch_size": 16, "dtype": "float64"}
    exact = hfi.fit_factors(task, rows, hfi.FactorConfig(**common))
    rank = 10  # first conv: d_in = 2·9 = 18; second: 4·9 = 36
    truncated = hfi.fit_factors(task, rows, hfi.FactorConfig(**common, max_factor_size=16, large_layer_rank=rank))
    for name in ("net.0", "net.2"):
        full, cut = exact.layer(name).tensors(), truncated.layer(name).tensors()
        d_in = full["activation_eigenvectors"].shape[0]
        assert cut["activation_eigenvectors"].shape == (d_in, rank)
        # Same directions (up to sign): the exact basis's last `rank` eigenvectors, in decreasing order.
        kept = full["activation_eigenvectors"][:, -rank:].flip(1)
        torch.testing.assert_close(
            (kept * cut["activation_eigenvectors"]).sum(0).abs(), torch.ones(rank, dtype=torch.float64)
        )
        torch.testing.assert_close(cut["eigenvalues"], full["eigenvalues"][:, -rank:].flip(1), rtol=1e-9, atol=1e-14)
        expected_residual = full["eigenvalues"][:, : d_in - rank].mean(dim=1)
        torch.testing.assert_close(cut["residual_eigenvalues"], expected_residual, rtol=1e-8, atol=1e-14)
        torch.testing.assert_close(cut["bias_eigenvalues"], full["bias_eigenvalues"])


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_one_discarded_direction_gives_the_exact_scores(strategy: str, tmp_path) -> None:
    """With k = d_in − 1 the complement is one eigendirection, so its mean eigenvalue is its eigenvalue:
    the truncated factors must score exactly as the full ones (through save/load, as a user would)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, padding=1)).double()
    task = toy_task(net, 2, 6)
    rows = image_rows(16)
    common = {"strategy": strategy, "draws_per_example": 2, "batch_size": 16, "dtype": "float64"}
    exact = hfi.fit_factors(task, rows, hfi.FactorConfig(**common))
    cut = hfi.fit_factors(task, rows, hfi.FactorConfig(**common, max_factor_size=8, large_layer_rank=17))
    cut.save_pretrained(tmp_path)
    cut = hfi.InfluenceFactors.from_pretrained(tmp_path, task=task)
    assert cut.layer("net.0").activation_eigenvectors.shape == (18, 17)
    queries = torch.stack([row["image"] for row in image_rows(3, seed=1)])
    options = {"damping": 1e-6, "draws_per_query": 2, "draws_per_example": 2, "batch_size": 16}
    expected = hfi.pairwise_scores(task, exact, queries, rows, **options)
    scores = hfi.pairwise_scores(task, cut, queries, rows, **options)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())


def test_tiny_unet_scores_survive_moderate_truncation(digits8) -> None:
    """Sanity only (the measured figures are in benchmarks/large_layer_error.py): keeping half of every
    activation factor over 64 leaves the tiny UNet's scores strongly rank-correlated with the exact ones."""
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    train = digits8.select(range(16))
    common = {"batch_size": 32, "draws_per_example": 2}
    exact = hfi.fit_factors(task, train, hfi.FactorConfig(**common))
    cut = hfi.fit_factors(task, train, hfi.FactorConfig(**common, max_factor_size=64, large_layer_rank=32))
    truncated_layers = [name for name, layer in cut.layers.items() if layer.residual_eigenvalues is not None]
    assert truncated_layers  # the approximation is in use
    queries = task.preprocess([row["image"] for row in digits8.select(range(16, 20))])
    options = {"damping": 1e-8, "draws_per_query": 2, "draws_per_example": 2, "batch_size": 32}
    expected = hfi.pairwise_scores(task, exact, queries, train, **options)
    scores = hfi.pairwise_scores(task, cut, queries, train, **options)
    assert torch.isfinite(scores).all()
    correlation = spearmanr(scores.flatten().numpy(), expected.flatten().numpy()).statistic
    assert correlation > 0.5


TRUNCATED = hfi.FactorConfig(
    draws_per_example=2, batch_size=8, dtype="float64", max_factor_size=64, large_layer_rank=20
)


def _fit_truncated_on_every_rank(output_dir: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    task = hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())
    factors = hfi.fit_factors(task, mnist_dataset(13, 8), TRUNCATED, accelerator=accelerator)
    factors.save_pretrained(f"{output_dir}/rank{accelerator.process_index}")


def test_two_processes_fit_the_truncated_factors_of_one(tmp_path) -> None:
    """Truncated eigendecompositions are computed by one rank and broadcast with their own shapes."""
    debug_launcher(_fit_truncated_on_every_rank, args=(str(tmp_path),), num_processes=2)
    task = hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())
    single = hfi.fit_factors(task, mnist_dataset(13, 8), TRUNCATED)
    ranks = [hfi.InfluenceFactors.from_pretrained(tmp_path / f"rank{r}", task=task) for r in (0, 1)]
    assert any(name.endswith(".residual_eigenvalues") for name in single.tensors)
    for name, value in single.tensors.items():
        torch.testing.assert_close(ranks[0].tensors[name], ranks[1].tensors[name], rtol=0, atol=0)
        if name.endswith(("covariance", "residual_eigenvalues")):  # basis-independent sums
            torch.testing.assert_close(ranks[0].tensors[name], value, rtol=1e-8, atol=1e-14)


def test_randomized_leading_eigenpairs_match_the_full_decomposition() -> None:
    """Randomized subspace iteration against `eigh` on a factor with a decaying spectrum: the leading
    eigenvalues, the projector onto their eigenvectors (orthonormal) and the residual (the mean of the others)."""
    from hf_influence.curvature.eigen import decompose, leading_eigenpairs

    generator = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=generator)).Q
    spectrum = 0.7 ** torch.arange(200, dtype=torch.float64)
    covariance = basis @ torch.diag(spectrum) @ basis.T
    exact = decompose(covariance, 20)
    randomized = leading_eigenpairs(covariance, 20)
    torch.testing.assert_close(randomized.values, exact.values, rtol=1e-10, atol=0)
    torch.testing.assert_close(randomized.residual, exact.residual, rtol=1e-10, atol=0)
    torch.testing.assert_close(randomized.vectors.T @ randomized.vectors, torch.eye(20, dtype=torch.float64))
    torch.testing.assert_close(
        randomized.vectors @ randomized.vectors.T, exact.vectors @ exact.vectors.T, rtol=0, atol=1e-8
    )
    with pytest.raises(ValueError, match="large_layer_solver"):
        hfi.FactorConfig(large_layer_solver="lanczos")


def test_randomized_solver_gives_the_damped_inverse_of_the_full_one(digits8) -> None:
    """A fit whose large layers use the randomized solver scores as the one that decomposes them in full (their
    leading spectra, on real gradients, are separated enough for six iterations)."""
    task = hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())
    queries = task.preprocess([digits8[i]["image"] for i in range(2)])
    scores = {}
    for solver in ("eigh", "randomized"):
        config = dataclasses.replace(TRUNCATED, large_layer_solver=solver)
        factors = hfi.fit_factors(task, digits8, config)
        scores[solver] = hfi.pairwise_scores(task, factors, queries, digits8, damping=1e-3, draws_per_example=2)
    expected = scores["eigh"]
    torch.testing.assert_close(scores["randomized"], expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
