"""Per-example gradients and influence scores against `torch.func` references (float64).

References rebuild each draw's input independently of the library's `noisy_inputs`: the draws come
from `task.draw` (same ids, seed and stream), the noisy input from diffusers' own
`scheduler.add_noise`, and gradients from `vmap(grad(...))` of the per-draw loss over rows.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import tiny_unet, toy_task
from diffusers import DDPMScheduler
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import hf_influence as hfi
from hf_influence.curvature.layers import find_layers
from hf_influence.engine import DrawPlan
from hf_influence.gradients import per_example_gradients

# vmap over diffusers' attention falls back to a loop for CPU flash attention: slow-ish, still exact.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def reference_inputs(task: hfi.DiffusionTask, samples: torch.Tensor, draws) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, ε) per draw row, with the flips applied and diffusers' `add_noise` (ε-prediction: target ε)."""
    assert task.prediction_type == "epsilon"
    repeats = len(draws) // len(samples)
    clean = samples.to(torch.float64).repeat_interleave(repeats, dim=0)
    clean = torch.where(draws.flip.view(-1, 1, 1, 1), clean.flip(-1), clean)
    noise = draws.noise.to(torch.float64)
    return task.scheduler.add_noise(clean, noise, draws.timesteps), noise


def per_draw_loss_gradients(denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> dict:
    """`{param name: (S, *shape)}`: ∇θ mean((ε_θ(x_s, t_s) − target_s)²) for every row s."""
    params = {name: value.detach() for name, value in denoiser.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, ti: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(denoiser, p, (xi[None], ti[None])).sample
        return (out - yi[None]).pow(2).mean()

    return vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, t, target)


def reference_example_gradients(
    task: hfi.DiffusionTask,
    layers: dict[str, nn.Module],
    samples: torch.Tensor,
    ids: list,
    num_draws: int,
    seed: int,
    stream: str,
    augment: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per example: the mean over its `num_draws` draws of the per-draw loss gradient, as `(B, d_out, d_in)`."""
    draws = task.draw(ids, num_draws, seed, stream, augment=augment)
    x, noise = reference_inputs(task, samples, draws)
    grads = per_draw_loss_gradients(task.denoiser, x, draws.timesteps, noise)
    count = len(ids)
    result = {}
    for name, module in layers.items():
        weight = grads[f"{name}.weight"].reshape(count, num_draws, module.weight.shape[0], -1).mean(dim=1)
        bias = None
        if module.bias is not None:
            bias = grads[f"{name}.bias"].reshape(count, num_draws, -1).mean(dim=1)
        result[name] = (weight, bias)
    return result


def assert_gradients_close(actual: dict, expected: dict, rtol: float = 1e-10) -> None:
    """Layer by layer; the absolute tolerance is relative to the largest gradient of the whole model, since
    some blocks (e.g. attention key biases, to which softmax is invariant) are exactly zero in theory."""
    assert actual.keys() == expected.keys()
    scale = max(weight.abs().max().item() for weight, _ in expected.values())
    for name, (weight, bias) in expected.items():
        got_weight, got_bias = actual[name]
        assert got_weight.shape == weight.shape, name
        torch.testing.assert_close(got_weight, weight, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")
        if bias is None:
            assert got_bias is None, name
        else:
            torch.testing.assert_close(got_bias, bias, rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}")


def flat(gradients: dict) -> torch.Tensor:
    parts = []
    for weight, bias in gradients.values():
        parts.append(weight.flatten(1))
        if bias is not None:
            parts.append(bias)
    return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- 5. tiny UNet


@pytest.fixture(scope="module")
def unet_setup(digits8):
    unet = tiny_unet().double().eval()
    task = hfi.DiffusionTask(unet, DDPMScheduler(), random_flip=True)
    samples = task.preprocess(digits8.select(range(3))["image"])
    ids = [5, 17, 2]  # ids that are not positions
    references = {
        num_draws: reference_example_gradients(task, find_layers(unet), samples, ids, num_draws, 4, "train", True)
        for num_draws in (1, 3)
    }
    return task, find_layers(unet), samples, ids, references


@pytest.mark.parametrize(
    ("num_draws", "batch_size"),
    [
        (1, 2),  # examples spread over two passes
        (3, 2),  # one example's draws split across passes
        (3, 7),  # two whole examples per pass
    ],
)
def test_per_example_gradients_match_torch_func_on_unet(unet_setup, num_draws: int, batch_size: int) -> None:
    task, layers, samples, ids, references = unet_setup
    assert len(layers) == 51  # every Linear and Conv2d of the UNet, attention projections included
    plan = DrawPlan(hfi.Loss(), num_draws, 4, "train", batch_size, augment=True)
    actual = per_example_gradients(task, layers, samples, ids, plan, dtype=torch.float64)
    draws = task.draw(ids, num_draws, 4, "train", augment=True)
    if num_draws == 3:
        assert draws.flip.any() and not draws.flip.all()
    assert_gradients_close(actual, references[num_draws])
    # and independent of the batch size, up to rounding
    whole_plan = DrawPlan(hfi.Loss(), num_draws, 4, "train", 64, augment=True)
    whole = per_example_gradients(task, layers, samples, ids, whole_plan, dtype=torch.float64)
    assert_gradients_close(actual, whole, rtol=1e-12)


# --------------------------------------------------------------------------- 6. unusual layers


class SubclassedLinear(nn.Linear):
    """A subclass of nn.Linear (as diffusers' LoRA-compatible layers) with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class UnusualLayers(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(channels, 3, 3, padding=1, padding_mode="reflect")
        # even kernel height: "same" pads asymmetrically (1 top, 2 bottom); dilated width
        self.same = nn.Conv2d(3, 3, (4, 3), padding="same", dilation=(1, 2), bias=False)
        self.circular_same = nn.Conv2d(3, 3, 3, padding="same", padding_mode="circular")
        self.dilated_strided = nn.Conv2d(3, 4 * channels, 3, stride=2, dilation=2, padding=2)
        self.shuffle = nn.PixelShuffle(2)
        self.linear = SubclassedLinear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.reflect(x))
        h = torch.tanh(self.same(h))
        h = torch.tanh(self.circular_same(h))
        h = torch.tanh(self.same(h))  # the same layer called twice: its gradient sums both calls
        h = self.shuffle(self.dilated_strided(h))
        b, c, height, width = h.shape
        tokens = self.linear(h.permute(0, 2, 3, 1).reshape(b, height * width, c))
        return tokens.reshape(b, height, width, c).permute(0, 3, 1, 2)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_per_example_gradients_of_unusual_layers() -> None:
    torch.manual_seed(0)
    task = toy_task(UnusualLayers(2).double(), 2, 8, random_flip=True)
    layers = find_layers(task.denoiser)
    assert list(layers) == [
        "net.reflect",
        "net.same",
        "net.circular_same",
        "net.dilated_strided",
        "net.linear",
    ]
    samples = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = ["a", "b", "c"]
    plan = DrawPlan(hfi.Loss(), 2, 0, "train", 3, augment=True)
    actual = per_example_gradients(task, layers, samples, ids, plan, dtype=torch.float64)
    expected = reference_example_gradients(task, layers, samples, ids, 2, 0, "train", augment=True)
    assert_gradients_close(actual, expected)


def test_per_example_gradients_of_grouped_and_depthwise_convolutions() -> None:
    """Grouped convolutions (Sana's depthwise GLU convolutions): exact per-example gradients, one group per
    example block inside the layer's own groups."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), nn.Tanh(), nn.Conv2d(4, 2, 1),
    ).double()  # fmt: skip
    task = toy_task(net, 2, 6, random_flip=True)
    layers = find_layers(task.denoiser)
    assert [layers[name].groups for name in ("net.2", "net.4")] == [2, 4]
    samples = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = [0, 1, 2]
    plan = DrawPlan(hfi.Loss(), 2, 0, "train", 4, augment=True)  # two examples per pass, one split over two
    actual = per_example_gradients(task, layers, samples, ids, plan, dtype=torch.float64)
    expected = reference_example_gradients(task, layers, samples, ids, 2, 0, "train", augment=True)
    assert_gradients_close(actual, expected)


# --------------------------------------------------------------------------- 7. large-damping limit


def test_large_damping_limit_is_gradient_dot_product(digits8) -> None:
    """λ·τ(λ) = ⟨λ(F̂+λI)⁻¹ g_q, g_j⟩ and ‖λ(F̂+λI)⁻¹ − I‖ = λ_max/(λ_max+λ), so
    |λτ − ⟨g_q, g_j⟩| ≤ λ_max/(λ_max+λ)·‖g_q‖‖g_j‖ (+ fp32 rounding: scores and gradients are fp32)."""
    task = hfi.DiffusionTask(tiny_unet().double().eval(), DDPMScheduler())
    train = digits8.select(range(4))
    queries = digits8.select(range(4, 6))["image"]
    factors = hfi.fit_factors(task, train, hfi.FactorConfig(draws_per_example=2, dtype="float64", batch_size=8))
    layers = {name: dict(task.denoiser.named_modules())[name] for name in factors.modules}
    largest = max(
        max(
            tensor.max().item()
            for kind, tensor in factors.layer(name).tensors().items()
            if kind.endswith("eigenvalues")
        )
        for name in factors.modules
    )
    assert largest > 0

    query_samples = task.preprocess(queries)
    train_samples = task.preprocess(train["image"])
    g_query = flat(reference_example_gradients(task, layers, query_samples, [0, 1], 2, 0, "query", augment=False))
    g_train = flat(reference_example_gradients(task, layers, train_samples, train["id"], 2, 0, "train", augment=True))
    dot = g_query @ g_train.T
    norms = torch.outer(g_query.norm(dim=1), g_train.norm(dim=1))
    assert (dot.abs() > 0.05 * norms).any()  # the limit is not a trivial zero

    errors = []
    for ratio in (1e1, 1e3, 1e6):
        damping = ratio * largest
        scores = hfi.pairwise_scores(
            task,
            factors,
            queries,
            train,
            damping=damping,
            draws_per_query=2,
            draws_per_example=2,
            batch_size=4,
            estimator="plain",  # the reference's independent draws
        ).to(torch.float64)
        error = (damping * scores - dot).abs()
        bound = (largest / (largest + damping) + 1e-5) * norms
        assert (error <= bound).all(), (ratio, (error / norms).max().item())
        errors.append((error / norms).max().item())
    assert errors[-1] < 1e-5 and errors[-1] < errors[0]


# --------------------------------------------------------------------------- 8. exact influence, linear model


class VectorLinear(nn.Module):
    """`(B, C, H, W)` → one token of size D → `nn.Linear(D, D)` → back (R = 1)."""

    def __init__(self, shape: tuple[int, int, int], bias: bool) -> None:
        super().__init__()
        self.shape = shape
        size = shape[0] * shape[1] * shape[2]
        self.linear = nn.Linear(size, size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).view(-1, *self.shape)


@pytest.mark.parametrize("bias", [False, True])
def test_pairwise_scores_equal_exact_influence_on_linear_model(digits8, bias: bool) -> None:
    """For one Linear layer, K-FAC expand with output_curvature="exact" is the exact GGN (for the weight;
    weight and bias are separate blocks, so with a bias the reference drops the W–b cross-blocks).
    The tolerance is fp32's: pairwise_scores returns fp32 scores (and accumulates gradients in fp32)."""
    size, draws = 4, 3
    torch.manual_seed(0)
    task = toy_task(VectorLinear((1, size, size), bias).double(), 1, size, random_flip=True)
    crops = [image.crop((2, 2, 2 + size, 2 + size)) for image in digits8.select(range(9))["image"]]  # 4×4 digits
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})
    train = datasets.Dataset.from_dict({"image": crops[:6], "id": [30 + i for i in range(6)]}, features=features)
    queries = crops[6:]
    config = hfi.FactorConfig(
        strategy="kfac", output_curvature="exact", dtype="float64", draws_per_example=draws, batch_size=6, seed=2
    )
    factors = hfi.fit_factors(task, train, config)
    layers = {"net.linear": task.denoiser.net.linear}

    # exact GGN on the same x_t as the fit
    train_samples = task.preprocess(train["image"])
    fit_draws = task.draw(train["id"], draws, config.seed, "fit", augment=True)
    x_fit, _ = reference_inputs(task, train_samples, fit_draws)
    params = {name: value.detach() for name, value in task.denoiser.named_parameters()}

    def output(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(task.denoiser, p, (xi[None], torch.zeros(1))).sample.flatten()

    jac = vmap(jacrev(output), in_dims=(None, 0))(params, x_fit)
    names = ["net.linear.weight"] + (["net.linear.bias"] if bias else [])
    jac = torch.cat([jac[name].flatten(2) for name in names], dim=2)  # (S, D, P)
    num_outputs = jac.shape[1]
    ggn = torch.einsum("sop,soq->pq", jac, jac) * (2.0 / num_outputs) / len(x_fit)
    if bias:
        num_weights = num_outputs * num_outputs
        ggn[:num_weights, num_weights:] = 0
        ggn[num_weights:, :num_weights] = 0

    g_query = flat(
        reference_example_gradients(task, layers, task.preprocess(queries), [0, 1, 2], 4, 0, "query", augment=False)
    )
    g_train = flat(reference_example_gradients(task, layers, train_samples, train["id"], draws, 0, "train", True))
    largest = torch.linalg.eigvalsh(ggn).max().item()
    assert torch.linalg.eigvalsh(ggn).min() > 1e-4 * largest  # so 1e-6 is as good as undamped
    for damping in (1e-6 * largest, 1e-2 * largest, 1.0 * largest):
        expected = g_query @ torch.linalg.solve(ggn + damping * torch.eye(len(ggn), dtype=ggn.dtype), g_train.T)
        scores = hfi.pairwise_scores(
            task,
            factors,
            queries,
            train,
            damping=damping,
            draws_per_query=4,
            draws_per_example=draws,
            batch_size=6,
            estimator="plain",  # the reference's independent draws
        )
        assert scores.shape == (3, 6)
        torch.testing.assert_close(scores.to(torch.float64), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
