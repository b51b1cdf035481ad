"""Exact checks of the K-FAC / EK-FAC curvature against dense GGNs built with `torch.func` (float64).

The references rebuild the very `x_t` the library fits on (same example ids, seed, stream and
`draws_per_example`) and form `1/S Σ_s J_sᵀ (2/D) J_s` from per-draw Jacobians, with `W`
flattened row-major as `(d_out, d_in)` (a conv weight as `W.view(C_out, -1)`).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import toy_task
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import hf_influence as hfi

CHANNELS, SIZE = 2, 6
D = CHANNELS * SIZE * SIZE  # elements of one denoiser output: the 1/D of the per-draw loss


class TokenLinear(nn.Module):
    """`(B, C, H, W)` → tokens `(B, H·W, C)` → `nn.Linear(C, C)` → back: R = H·W weight-sharing positions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.linear(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def make_net(kind: str, seed: int = 0) -> tuple[nn.Module, str]:
    """A double-precision toy net and the qualified name (inside ToyDenoiser) of the layer under test."""
    torch.manual_seed(seed)
    if kind == "token_linear":
        return TokenLinear(CHANNELS).double(), "net.linear"
    if kind == "conv3x3":
        return nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1).double(), "net"
    if kind == "conv_stride2":  # a pixel shuffle (a permutation) restores the input shape
        conv = nn.Conv2d(CHANNELS, 4 * CHANNELS, 3, stride=2, padding=1)
        return nn.Sequential(conv, nn.PixelShuffle(2)).double(), "net.0"
    if kind == "two_conv":  # nonlinear: K-FAC is not exact here
        net = nn.Sequential(
            nn.Conv2d(CHANNELS, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, CHANNELS, 3, padding=1)
        ).double()
        return net, ("net.0", "net.2")
    if kind == "grouped":  # a grouped and a depthwise convolution: K-FAC averages their groups' patches
        net = nn.Sequential(
            nn.Conv2d(CHANNELS, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Tanh(),
            nn.Conv2d(4, CHANNELS, 3, padding=1, groups=CHANNELS),
        ).double()  # fmt: skip
        return net, ("net.2", "net.4")
    raise ValueError(kind)


def random_rows(count: int, channels: int = CHANNELS, size: int = SIZE, seed: int = 0) -> list[dict]:
    """Training rows with `(C, H, W)` images in [-1, 1] and ids that are not their positions."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, channels, size, size, generator=generator) * 2 - 1
    return [{"image": image, "id": 100 + 7 * i} for i, image in enumerate(images)]


def fit_inputs(task: hfi.DiffusionTask, rows: list[dict], config: hfi.FactorConfig, stream: str):
    """The noisy inputs `x_t` (and draws) the library sees in a fitting pass of `stream`."""
    samples = task.preprocess([row["image"] for row in rows])
    ids = [row["id"] for row in rows]
    draws = task.draw(ids, config.draws_per_example, config.seed, stream, augment=True)
    _, noisy = task.noisy_inputs(samples, draws, config.draws_per_example)
    return noisy, draws


def param_names(layer: str) -> tuple[str, str]:
    """ToyDenoiser's layer name → parameter names of `task.denoiser.net`."""
    prefix = layer.removeprefix("net").removeprefix(".")
    prefix = f"{prefix}." if prefix else ""
    return f"{prefix}weight", f"{prefix}bias"


def per_draw_jacobians(net: nn.Module, x: torch.Tensor, names: list[str], chunk: int = 256) -> torch.Tensor:
    """`(S, D_out, P)`: the Jacobian of each draw's flattened output w.r.t. the named parameters, row-major."""
    params = {name: value.detach() for name, value in net.named_parameters()}
    chosen = {name: params[name] for name in names}

    def output(sub: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(net, {**params, **sub}, (xi[None],)).flatten()

    blocks = []
    for start in range(0, len(x), chunk):
        jac = vmap(jacrev(output), in_dims=(None, 0))(chosen, x[start : start + chunk])
        blocks.append(torch.cat([jac[name].flatten(2) for name in names], dim=2))
    return torch.cat(blocks)


def exact_ggn(net: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Dense `1/S Σ_s J_sᵀ (2/D) J_s` for the named parameters, on the draws `x`."""
    jac = per_draw_jacobians(net, x, names)
    return torch.einsum("sop,soq->pq", jac, jac) * (2.0 / D) / len(x)


def per_draw_loss_gradients(net: nn.Module, x: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """`(S, *param.shape)`: ∇ℓ_s of the per-draw loss `mean((f(x_s) − ε_s)²)` w.r.t. one parameter."""
    params = {key: value.detach() for key, value in net.named_parameters()}

    def loss(value: torch.Tensor, xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, {**params, name: value}, (xi[None],))
        return (out - ti[None]).pow(2).mean()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params[name], x, target)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# --------------------------------------------------------------------------- 1. K-FAC expand is exact


@pytest.mark.parametrize(
    ("kind", "draws_per_example", "batch_size"),
    [
        ("token_linear", 2, 4),  # two examples per forward pass
        ("conv3x3", 3, 2),  # one example's draws split over two passes
        ("conv_stride2", 2, 64),  # everything in one pass
    ],
)
def test_kfac_expand_exact_for_single_layer(kind: str, draws_per_example: int, batch_size: int) -> None:
    net, layer = make_net(kind)
    task = toy_task(net, CHANNELS, SIZE, random_flip=True)
    rows = random_rows(5)
    config = hfi.FactorConfig(
        strategy="kfac",
        output_curvature="exact",
        dtype="float64",
        draws_per_example=draws_per_example,
        batch_size=batch_size,
        seed=3,
    )
    factors = hfi.fit_factors(task, rows, config)
    assert factors.metadata.total_draws == len(rows) * draws_per_example

    x, draws = fit_inputs(task, rows, config, "fit")
    assert draws.flip.any() and not draws.flip.all()  # augmentation is part of what is reproduced
    weight, bias = param_names(layer)
    ggn_weight = exact_ggn(net, x, [weight])
    ggn_bias = exact_ggn(net, x, [bias])

    tensors = factors.layer(layer).tensors()
    activation, gradient = tensors["activation_covariance"], tensors["gradient_covariance"]
    assert activation.dtype == gradient.dtype == torch.float64
    torch.testing.assert_close(torch.kron(gradient, activation), ggn_weight, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gradient, ggn_bias, rtol=1e-10, atol=1e-14)
    # the stored eigenpairs reconstruct the covariances
    for kind_name, covariance in (("activation", activation), ("gradient", gradient)):
        values, vectors = tensors[f"{kind_name}_eigenvalues"], tensors[f"{kind_name}_eigenvectors"]
        torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, covariance, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- 2. EK-FAC eigenvalues


@functools.cache
def two_conv_fit(strategy: str, ggn: str):
    net, layers = make_net("two_conv", seed=1)
    task = toy_task(net, CHANNELS, SIZE, random_flip=True)
    rows = random_rows(4, seed=1)
    config = hfi.FactorConfig(
        strategy=strategy,
        ggn=ggn,
        output_curvature="exact",
        dtype="float64",
        draws_per_example=3,
        batch_size=5,
        seed=11,
    )
    return net, layers, task, rows, config, hfi.fit_factors(task, rows, config)


def kronecker_basis(tensors: dict) -> torch.Tensor:
    return torch.kron(tensors["gradient_eigenvectors"], tensors["activation_eigenvectors"])


def test_ekfac_eigenvalues_are_exact_ggn_diagonal_in_kfac_basis() -> None:
    net, layers, task, rows, config, factors = two_conv_fit("ekfac", "model")
    x_correction, _ = fit_inputs(task, rows, config, "correction")
    x_fit, _ = fit_inputs(task, rows, config, "fit")
    assert not torch.allclose(x_correction, x_fit)  # the correction pass uses independent draws
    for layer in layers:
        tensors = factors.layer(layer).tensors()
        weight, bias = param_names(layer)
        d_out, d_in = tensors["eigenvalues"].shape
        q = kronecker_basis(tensors)
        ggn_weight = exact_ggn(net, x_correction, [weight])
        rotated = q.T @ ggn_weight @ q
        torch.testing.assert_close(
            tensors["eigenvalues"], torch.diagonal(rotated).reshape(d_out, d_in), rtol=1e-10, atol=1e-16
        )
        # not a trivial identity: the GGN block is not diagonal in the K-FAC basis (K-FAC is inexact here)
        off_diagonal = rotated - torch.diag(torch.diagonal(rotated))
        assert off_diagonal.norm() > 1e-3 * rotated.norm()

        q_g = tensors["gradient_eigenvectors"]
        ggn_bias = exact_ggn(net, x_correction, [bias])
        torch.testing.assert_close(
            tensors["bias_eigenvalues"], torch.diagonal(q_g.T @ ggn_bias @ q_g), rtol=1e-10, atol=1e-16
        )
        # the eigenvectors are those of the covariances fitted on the "fit" draws
        for kind_name in ("activation", "gradient"):
            vectors, covariance = tensors[f"{kind_name}_eigenvectors"], tensors[f"{kind_name}_covariance"]
            rotated_cov = vectors.T @ covariance @ vectors
            torch.testing.assert_close(rotated_cov, torch.diag(torch.diagonal(rotated_cov)), rtol=0, atol=1e-12)


def test_ekfac_eigenvalues_of_grouped_convolutions_are_exact_ggn_diagonal() -> None:
    """Whatever basis K-FAC gives a grouped convolution, EK-FAC's eigenvalues are the exact GGN's diagonal in it."""
    net, layers = make_net("grouped")
    task = toy_task(net, CHANNELS, SIZE)
    rows = random_rows(4)
    config = hfi.FactorConfig(output_curvature="exact", dtype="float64", draws_per_example=2, batch_size=8)
    factors = hfi.fit_factors(task, rows, config, checkpoint_dir=None)
    x_correction, _ = fit_inputs(task, rows, config, "correction")
    for layer in layers:
        tensors = factors.layer(layer).tensors()
        d_out, d_in = tensors["eigenvalues"].shape
        assert d_in == task.denoiser.net[int(layer[-1])].weight[0].numel()  # C_in / groups · k²
        q = kronecker_basis(tensors)
        rotated = q.T @ exact_ggn(net, x_correction, [param_names(layer)[0]]) @ q
        torch.testing.assert_close(
            tensors["eigenvalues"], torch.diagonal(rotated).reshape(d_out, d_in), rtol=1e-10, atol=1e-16
        )


def test_ekfac_eigenvalues_ggn_loss_are_empirical_fisher_diagonal() -> None:
    net, layers, task, rows, config, factors = two_conv_fit("ekfac", "loss")
    x, draws = fit_inputs(task, rows, config, "correction")
    target = draws.noise.to(torch.float64)  # epsilon prediction: the target is the noise
    for layer in layers:
        tensors = factors.layer(layer).tensors()
        weight, bias = param_names(layer)
        q_a, q_g = tensors["activation_eigenvectors"], tensors["gradient_eigenvectors"]
        grads = per_draw_loss_gradients(net, x, target, weight).flatten(2)  # (S, d_out, d_in)
        expected = (q_g.T @ grads @ q_a).pow(2).mean(dim=0)
        torch.testing.assert_close(tensors["eigenvalues"], expected, rtol=1e-10, atol=1e-18)
        # the same thing as the diagonal of the dense empirical Fisher 1/S Σ ∇ℓ ∇ℓᵀ in the Kronecker basis
        flat = grads.flatten(1)
        fisher = flat.T @ flat / len(flat)
        q = kronecker_basis(tensors)
        torch.testing.assert_close(
            tensors["eigenvalues"].flatten(), torch.diagonal(q.T @ fisher @ q), rtol=1e-10, atol=1e-18
        )
        bias_grads = per_draw_loss_gradients(net, x, target, bias)
        torch.testing.assert_close(
            tensors["bias_eigenvalues"], (bias_grads @ q_g).pow(2).mean(dim=0), rtol=1e-10, atol=1e-18
        )


# --------------------------------------------------------------------------- 3. damped inverse


def dense_curvature(strategy: str, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense weight and bias blocks of F̂ as the factors define it."""
    if strategy == "kfac":
        gradient = tensors["gradient_covariance"]
        return torch.kron(gradient, tensors["activation_covariance"]), gradient
    q, q_g = kronecker_basis(tensors), tensors["gradient_eigenvectors"]
    weight = q @ torch.diag(tensors["eigenvalues"].flatten()) @ q.T
    return weight, q_g @ torch.diag(tensors["bias_eigenvalues"]) @ q_g.T


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_precondition_is_damped_inverse(strategy: str) -> None:
    _, layers, _, _, _, factors = two_conv_fit(strategy, "model")
    generator = torch.Generator().manual_seed(5)
    for layer in layers:
        tensors = factors.layer(layer).tensors()
        f_weight, f_bias = dense_curvature(strategy, tensors)
        d_out, d_in = tensors["gradient_covariance"].shape[0], tensors["activation_covariance"].shape[0]
        v_weight = torch.randn(3, d_out, d_in, generator=generator, dtype=torch.float64)
        v_bias = torch.randn(3, d_out, generator=generator, dtype=torch.float64)
        scale = torch.linalg.eigvalsh(f_weight).max().item()
        for damping in (1e-3 * scale, 0.5 * scale, 10.0 * scale):
            p_weight, p_bias = factors.precondition(layer, v_weight, v_bias, damping)
            expected_weight = torch.linalg.solve(
                f_weight + damping * torch.eye(d_out * d_in, dtype=torch.float64), v_weight.flatten(1).T
            ).T.reshape(3, d_out, d_in)
            expected_bias = torch.linalg.solve(f_bias + damping * torch.eye(d_out, dtype=torch.float64), v_bias.T).T
            torch.testing.assert_close(p_weight, expected_weight, rtol=1e-9, atol=1e-9 * expected_weight.abs().max())
            torch.testing.assert_close(p_bias, expected_bias, rtol=1e-9, atol=1e-9 * expected_bias.abs().max())
            alone, none = factors.precondition(layer, v_weight, None, damping)
            assert none is None
            torch.testing.assert_close(alone, p_weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="damping"):
        factors.precondition(layer, v_weight, v_bias, -1.0)


# --------------------------------------------------------------------------- 4. Monte-Carlo GGN^model


@pytest.mark.parametrize("draws_per_example", [4, 64])
def test_mc_output_curvature_converges_to_exact_ggn(draws_per_example: int) -> None:
    """With one probe ξ per draw, `G_mc = (2/D)/S Σ_s Σ_r ξ_{s,r} ξ_{s,r}ᵀ` (ξ_{s,r}: the channel vector
    of draw s's probe at pixel r, for a stride-1 conv). The exact `G` is `(2/D) R I` and `A` is exact,
    so `‖G_mc ⊗ A − GGN‖_F / ‖GGN‖_F = ‖W/n − I‖_F / √d` with W a Wishart(I_d, n), n = S·R:
    its mean square is (d + 1)/n, and n·d·error²/2 is (to leading order) χ² with k = d(d+1)/2 degrees
    of freedom. We allow 4× the RMS (for a random seed, P(χ²_3 > 48) ≈ 2e-10) and require at least a
    tenth of it (the probes really are random; P(χ²_3 < 0.03) ≈ 1e-3)."""
    net, layer = make_net("conv3x3", seed=2)
    task = toy_task(net, CHANNELS, SIZE)
    rows = random_rows(30, seed=2)
    config = hfi.FactorConfig(
        strategy="kfac", dtype="float64", draws_per_example=draws_per_example, batch_size=512, seed=7
    )
    assert config.output_curvature == "mc"
    factors = hfi.fit_factors(task, rows, config)
    tensors = factors.layer(layer).tensors()
    activation, gradient = tensors["activation_covariance"], tensors["gradient_covariance"]

    x, draws = fit_inputs(task, rows, config, "fit")
    num_draws, positions = len(x), SIZE * SIZE
    # the library's G is exactly the probe second moment described above
    probes = draws.probe.to(torch.float64).flatten(2).transpose(1, 2).reshape(-1, CHANNELS)
    torch.testing.assert_close(gradient, probes.T @ probes * (2.0 / D) / num_draws, rtol=1e-10, atol=1e-16)

    weight, bias = param_names(layer)
    ggn_weight = exact_ggn(net, x, [weight])
    ggn_bias = exact_ggn(net, x, [bias])
    rms = math.sqrt((CHANNELS + 1) / (num_draws * positions))
    for error in (rel_err(torch.kron(gradient, activation), ggn_weight), rel_err(gradient, ggn_bias)):
        assert 0.1 * rms < error < 4 * rms, (error, rms)
