"""hf_influence's (E)K-FAC factors against curvlinops, a peer K-FAC implementation (float64).

curvlinops gets exactly the inputs hf_influence fits on: the same example ids, `FactorConfig.seed`,
stream ("fit" for the covariances, "correction" for the EK-FAC eigenvalues) and draws per example,
turned into `x_t` by `task.draw` + `task.noisy_inputs`. Its model outputs are reshaped to `(S, D)`
and the loss is `MSELoss(reduction="mean")` with `num_data = S` draws and
`num_per_example_loss_terms = 1`, i.e. curvlinops approximates the GGN of
`1/S Σ_s 1/D ‖y_s − f_s‖²`, the per-draw training loss of method.md §1.1. Scale relations
(method.md §3.1), asserted below:

* GGN^model: hf_influence `ggn="model", output_curvature="exact"` equals curvlinops
  `fisher_type="type-2"` (A, G and corrected eigenvalues), to rounding;
* GGN^loss: curvlinops `fisher_type="empirical"` equals **D ×** hf_influence `ggn="loss"` in G and
  in the corrected eigenvalues (it rescales the mean-reduced loss by sqrt(D)); A is identical.

EK-FAC: curvlinops would take its eigenbasis from covariances of the data it is given, while
hf_influence fits the basis on the "fit" draws and corrects the eigenvalues on the independent
"correction" draws. So the reference is a curvlinops `EKFACLinearOperator` over the *correction*
draws whose eigenvectors are set to hf_influence's `Q_A`, `Q_G` before its correction pass: both then
compute `1/S Σ_s (Q_Gᵀ ∇W_s Q_A)²` from the same draws in the same basis, an exact comparison that
does not depend on how `eigh` picks vectors inside degenerate eigenspaces. (The basis itself is
checked separately: hf_influence's `Q_A`, `Q_G` diagonalise curvlinops' A and G.)

curvlinops (3.0.1) keeps its factors in private attributes, read here: `_input_covariances` and
`_gradient_covariances` (module name → A, G), `_input_covariances_eigenvectors`,
`_gradient_covariances_eigenvectors` and `_corrected_eigenvalues` (module name → {position of the
parameter in `params`: eigenvalues shaped like the (d_out, d_in) weight, or (d_out,) for the bias}).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import mnist_dataset, tiny_unet, toy_task
from curvlinops import EKFACLinearOperator, KFACLinearOperator
from diffusers import DDPMScheduler
from torch import nn

import hf_influence as hfi
from hf_influence.curvature import find_layers

EXACT_RTOL = 1e-10
# Absolute slack, relative to the largest tensor of the same kind over all layers: covers factors that
# are zero up to rounding, e.g. K-FAC-reduce's G of attention `to_k` (softmax is invariant to shifting
# all keys, so Σ_r ∂ℓ/∂k_r = 0) and its bias eigenvalues, where both libraries return ~1e-34 noise.
ZERO_ATOL = 1e-13
PREFIX = "denoiser."  # curvlinops sees the denoiser through `_FlatDenoiser`


class _FlatDenoiser(nn.Module):
    """curvlinops' `model_func`: one input (a dict with `x_t` and `t`) → outputs flattened to `(S, D)`."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.denoiser(inputs["x_t"], inputs["t"]).sample.flatten(1)


def _conv_task() -> hfi.DiffusionTask:
    """conv3x3 → tanh → dilated conv3x3 → tanh → bias-free conv1x1: 3 weight-sharing layers, D = 64."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3, padding=2, dilation=2),
        nn.Tanh(),
        nn.Conv2d(3, 1, 1, bias=False),
    )
    return toy_task(net.double(), 1, 8, random_flip=True)


def _unet_task() -> hfi.DiffusionTask:
    """diffusers UNet2DModel with attention (conv, time-embedding Linear, token Linear layers), D = 64."""
    return hfi.DiffusionTask(tiny_unet(sample_size=8).double(), DDPMScheduler(), random_flip=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is as fast, and avoids OpenMP oversubscription
    (tens of times slower) when other processes share the CPU cores. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _all_digits():
    return mnist_dataset(16, 8)  # parsing MNIST takes seconds: do it once


def _digits(count: int):
    return _all_digits().select(range(count))


TASKS = {"conv": _conv_task, "unet": _unet_task}
# (examples, draws per example, hf_influence batch size, curvlinops batch size): both libraries
# split the draws into differently sized batches, so the normalisation by S is checked as well.
SIZES = {"conv": (4, 2, 4, 3), "unet": (2, 2, 64, 3)}


def _curvlinops_data(
    task: hfi.DiffusionTask, dataset, config: hfi.FactorConfig, stream: str, batch_size: int
) -> tuple[list, int]:
    """The (X, y) batches of hf_influence's draws for `stream`, and their number S."""
    rows = list(dataset)
    samples = task.preprocess([row[task.image_column] for row in rows])
    ids = [row[config.id_column] for row in rows]
    draws = task.draw(ids, config.draws_per_example, config.seed, stream, augment=True)
    clean, noisy = task.noisy_inputs(samples, draws, config.draws_per_example)
    target = task.target(clean, draws.noise.to(clean.dtype), draws.timesteps).flatten(1)
    data = [
        ({"x_t": noisy[i : i + batch_size], "t": draws.timesteps[i : i + batch_size]}, target[i : i + batch_size])
        for i in range(0, len(draws), batch_size)
    ]
    return data, len(draws)


def _curvlinops_operator(cls, task, layers, data, num_draws, fisher_type, approx):
    model = _FlatDenoiser(task.denoiser).eval()
    params = [param for module in layers.values() for param in module.parameters()]
    operator = cls(
        model,
        nn.MSELoss(reduction="mean"),
        params,
        data,
        fisher_type=fisher_type,
        kfac_approx=approx,
        num_per_example_loss_terms=1,
        num_data=num_draws,
        check_deterministic=False,
        batch_size_fn=lambda inputs: inputs["x_t"].shape[0],
    )
    assert set(operator._mapping) == {PREFIX + name for name in layers}
    return operator


def _positions(layers: dict[str, nn.Module]) -> dict[str, dict[str, int]]:
    """Each layer's parameter positions in the `params` list given to curvlinops (weight, then bias)."""
    positions, index = {}, 0
    for name, module in layers.items():
        positions[name] = {}
        for param_name, _ in module.named_parameters():
            positions[name][param_name] = index
            index += 1
    return positions


def _compare(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float, what: str) -> float:
    """Per-layer ‖ours − ref‖ ≤ rtol ‖ref‖ + ZERO_ATOL max‖ref‖; returns the largest relative error
    over the layers whose reference is not zero up to rounding."""
    assert ours.keys() == reference.keys()
    scale = max(value.norm().item() for value in reference.values())
    worst = 0.0
    for name, ref in reference.items():
        assert ours[name].shape == ref.shape, f"{what} {name}: {tuple(ours[name].shape)} vs {tuple(ref.shape)}"
        error = (ours[name] - ref).norm().item()
        assert error <= rtol * ref.norm().item() + ZERO_ATOL * scale, (
            f"{what} of {name}: relative error {error / ref.norm().item():.2e} (‖ref‖ = {ref.norm().item():.3e})"
        )
        if ref.norm().item() > 1e3 * ZERO_ATOL * scale:
            worst = max(worst, error / ref.norm().item())
    return worst


def _check_against_curvlinops(
    task: hfi.DiffusionTask, dataset, config: hfi.FactorConfig, fisher_type: str, curv_batch: int, mc_rtol: float = 0.0
) -> dict[str, float]:
    """Fit with hf_influence and compare A, G (fit draws) and, for EK-FAC, the corrected eigenvalues
    (correction draws, hf_influence's eigenbasis) with curvlinops. Returns the worst relative errors.

    G and the eigenvalues must agree to rounding unless hf_influence uses Monte-Carlo probes
    (GGN^model with output_curvature="mc"), where `mc_rtol` applies; A never depends on the probes."""
    exact = config.ggn == "loss" or config.output_curvature == "exact"
    rtol = EXACT_RTOL if exact else mc_rtol
    factors = hfi.fit_factors(task, dataset, config)
    layers = find_layers(task.denoiser)
    # GGN^loss: curvlinops' "empirical" K-FAC is D × ours (method.md §3.1); type-2 and MC have no factor.
    scale = float(task.sample_numel) if fisher_type == "empirical" else 1.0
    report = {}

    data, num_draws = _curvlinops_data(task, dataset, config, "fit", curv_batch)
    assert num_draws == factors.metadata.total_draws
    kfac = _curvlinops_operator(KFACLinearOperator, task, layers, data, num_draws, fisher_type, config.approx)
    kfac.compute_kronecker_factors()
    activation = {name: factors.tensors[f"{name}.activation_covariance"] for name in layers}
    gradient = {name: scale * factors.tensors[f"{name}.gradient_covariance"] for name in layers}
    report["A"] = _compare(activation, {n: kfac._input_covariances[PREFIX + n] for n in layers}, EXACT_RTOL, "A")
    report["G"] = _compare(gradient, {n: kfac._gradient_covariances[PREFIX + n] for n in layers}, rtol, "G")

    if exact:  # the stored eigenbasis is that of curvlinops' covariances: QᵀFQ is diagonal
        for kind, covariances in (("activation", kfac._input_covariances), ("gradient", kfac._gradient_covariances)):
            scale_kind = max(value.norm().item() for value in covariances.values())
            for name in layers:
                vectors = factors.tensors[f"{name}.{kind}_eigenvectors"]
                rotated = vectors.T @ covariances[PREFIX + name] @ vectors
                off_diagonal = (rotated - torch.diag(torch.diagonal(rotated))).norm().item()
                bound = EXACT_RTOL * covariances[PREFIX + name].norm().item() + ZERO_ATOL * scale_kind
                assert off_diagonal <= bound, f"the {kind} eigenvectors of {name} do not diagonalise curvlinops' factor"

    if config.strategy == "ekfac":
        data, num_draws = _curvlinops_data(task, dataset, config, "correction", curv_batch)
        ekfac = _curvlinops_operator(EKFACLinearOperator, task, layers, data, num_draws, fisher_type, config.approx)
        ekfac._input_covariances_eigenvectors = {
            PREFIX + n: factors.tensors[f"{n}.activation_eigenvectors"] for n in layers
        }
        ekfac._gradient_covariances_eigenvectors = {
            PREFIX + n: factors.tensors[f"{n}.gradient_eigenvectors"] for n in layers
        }
        ekfac.compute_eigenvalue_correction()  # keeps the eigenvectors set above
        positions = _positions(layers)
        reference = {n: ekfac._corrected_eigenvalues[PREFIX + n][positions[n]["weight"]] for n in layers}
        ours = {n: scale * factors.tensors[f"{n}.eigenvalues"] for n in layers}
        report["eigenvalues"] = _compare(ours, reference, rtol, "corrected eigenvalues")
        with_bias = [n for n in layers if "bias" in positions[n]]
        assert {n for n in layers if f"{n}.bias_eigenvalues" in factors.tensors} == set(with_bias)
        reference = {n: ekfac._corrected_eigenvalues[PREFIX + n][positions[n]["bias"]] for n in with_bias}
        ours = {n: scale * factors.tensors[f"{n}.bias_eigenvalues"] for n in with_bias}
        report["bias_eigenvalues"] = _compare(ours, reference, rtol, "bias eigenvalues")
    return report


@pytest.mark.parametrize("ggn, fisher_type", [("model", "type-2"), ("loss", "empirical")])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("model", ["conv", "unet"])
def test_ekfac_matches_curvlinops(model: str, approx: str, ggn: str, fisher_type: str) -> None:
    """Exact expectations on identical draws: A, G and corrected eigenvalues agree to rounding."""
    examples, draws, batch_size, curv_batch = SIZES[model]
    task = TASKS[model]()
    config = hfi.FactorConfig(
        approx=approx,
        ggn=ggn,
        output_curvature="exact",
        draws_per_example=draws,
        batch_size=batch_size,
        seed=7,
        dtype="float64",
    )
    report = _check_against_curvlinops(task, _digits(examples), config, fisher_type, curv_batch)
    assert set(report) == {"A", "G", "eigenvalues", "bias_eigenvalues"}
    assert max(report.values()) < EXACT_RTOL


def test_empirical_fisher_scale_is_sample_numel() -> None:
    """curvlinops' empirical K-FAC is exactly D = C·H·W times hf_influence's GGN^loss, here on 3-channel
    4×4 images (D = 48, not H·W = 16): the ratio of the G factors is D in every layer; A coincides."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 3, 3, padding=1))
    task = toy_task(net.double(), 3, 4)
    assert task.sample_numel == 48
    dataset = [{"image": torch.rand(3, 4, 4) * 2 - 1, "id": f"example-{i}"} for i in range(3)]
    config = hfi.FactorConfig(strategy="kfac", ggn="loss", draws_per_example=2, dtype="float64", seed=1)
    factors = hfi.fit_factors(task, dataset, config)
    layers = find_layers(task.denoiser)
    data, num_draws = _curvlinops_data(task, dataset, config, "fit", 4)
    kfac = _curvlinops_operator(KFACLinearOperator, task, layers, data, num_draws, "empirical", "expand")
    kfac.compute_kronecker_factors()
    for name in layers:
        ours = factors.tensors[f"{name}.gradient_covariance"]
        reference = kfac._gradient_covariances[PREFIX + name]
        torch.testing.assert_close(reference, 48 * ours, rtol=1e-12, atol=0)
        assert (reference.trace() / ours.trace()).item() == pytest.approx(48, rel=1e-12)
        torch.testing.assert_close(
            kfac._input_covariances[PREFIX + name], factors.tensors[f"{name}.activation_covariance"], rtol=1e-12, atol=0
        )


def test_monte_carlo_fisher_approaches_type2() -> None:
    """hf_influence's default MC Fisher (one probe ξ per draw) against curvlinops' exact type-2 Fisher on
    the same 256 draws: A does not depend on the probes and is exact; G and the corrected eigenvalues
    agree within Monte-Carlo error (measured: 1.3% and 14%). A probe of the wrong scale (e.g. 1/D
    instead of 2/D) would be off by at least 50% in both."""
    task = _conv_task()
    config = hfi.FactorConfig(draws_per_example=16, batch_size=256, seed=3, dtype="float64")
    assert config.output_curvature == "mc" and config.strategy == "ekfac"
    report = _check_against_curvlinops(task, _digits(16), config, "type-2", 256, mc_rtol=0.35)
    assert report["A"] < EXACT_RTOL
    assert 1e-4 < report["G"] < 0.1  # a Monte-Carlo estimate: close, but not equal
    assert report["eigenvalues"] < 0.35 and report["bias_eigenvalues"] < 0.35
