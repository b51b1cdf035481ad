"""TRAK, D-TRAK, gradient dot products and pixel similarity against direct dense computations:
per-example gradients from `torch.func` on a tiny net, the projection materialised, the kernel solved."""

from __future__ import annotations

from dataclasses import replace

import datasets
import pytest
import torch
from conftest import tiny_unet, toy_task
from diffusers import DDPMScheduler
from torch import nn
from torch.func import functional_call, grad

import hf_influence as hfi
from hf_influence.baselines import (
    DAS,
    TRAK,
    GaussianProjection,
    TRAKConfig,
    gradient_dot_scores,
    pixel_similarity_scores,
)
from hf_influence.curvature.layers import find_layers

SIZE, DRAWS, SEED = 4, 3, 7


def toy():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 1, 1),
        nn.Flatten(0),
        nn.Unflatten(0, (-1, 1, SIZE, SIZE)),
    )
    return toy_task(net.to(torch.float64), 1, SIZE, random_flip=True)


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def as_dataset(samples: torch.Tensor) -> datasets.Dataset:
    """Images in [-1, 1] stored as (H, W) arrays in [0, 1], as the task reads arrays."""
    pixels = [((s[0] + 1) / 2).numpy() for s in samples]
    return datasets.Dataset.from_dict({"image": pixels, "id": list(range(len(samples)))})


def dataset_images(dataset: datasets.Dataset, task: hfi.DiffusionTask) -> torch.Tensor:
    return task.preprocess([row["image"] for row in dataset])


def reference_gradient(task, sample, example_id, stream, augment, objective) -> torch.Tensor:
    """The flattened gradient (layer by layer: weight, then bias) of the objective averaged over the draws."""
    layers = find_layers(task.denoiser)
    names = [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    params = {name: param.detach() for name, param in task.denoiser.named_parameters() if name in names}
    drawn = task.draw([example_id], DRAWS, SEED, stream, augment=augment)
    clean = sample.to(torch.float64).expand(DRAWS, -1, -1, -1)
    clean = torch.where(drawn.flip.view(-1, 1, 1, 1), clean.flip(-1), clean)
    alpha_bar = task.alphas_cumprod[drawn.timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * drawn.noise.to(torch.float64)

    def value(p):
        prediction = functional_call(task.denoiser, p, (noisy, drawn.timesteps)).sample
        if objective == "mean_output":
            return prediction.flatten(1).mean(dim=1).mean()
        per_draw = (prediction - drawn.noise.to(torch.float64)) if objective == "loss" else prediction
        return per_draw.pow(2).flatten(1).mean(dim=1).mean()

    if objective == "residual":  # the RMS residual averaged over the draws (DAS's training-side weight)
        with torch.no_grad():
            prediction = task.denoiser(noisy, drawn.timesteps).sample
        return (prediction - drawn.noise.to(torch.float64)).pow(2).flatten(1).mean(dim=1).sqrt().mean()
    gradients = grad(value)(params)
    return torch.cat([gradients[name].flatten() for name in names])


def dense_features(task, samples, stream, augment, objective, projection) -> torch.Tensor:
    layers = find_layers(task.denoiser)
    matrix = torch.cat(
        [
            projection.matrix(name, module.weight.numel() + module.bias.numel()).to(torch.float64)
            for name, module in layers.items()
        ]
    )
    gradients = torch.stack(
        [reference_gradient(task, sample[None], i, stream, augment, objective) for i, sample in enumerate(samples)]
    )
    return gradients @ matrix


@pytest.mark.parametrize("objective", ["loss", "square_norm"])
def test_trak_and_d_trak_match_a_dense_computation(objective):
    task = toy()
    train = as_dataset(images(9, 0))
    queries = images(3, 1)
    config = TRAKConfig(
        measurement=objective,
        projection_dim=5,
        draws_per_example=DRAWS,
        seed=SEED,
        damping=0.1,
        examples_per_projection=4,
    )
    trak = TRAK(task, train, config)
    projection = GaussianProjection(5, SEED)
    phi = dense_features(task, dataset_images(train, task), "train", True, objective, projection)
    phi_q = dense_features(task, queries, "query", False, objective, projection)
    torch.testing.assert_close(trak.train_features, phi, rtol=1e-9, atol=1e-12)
    kernel = phi.T @ phi
    damping = 0.1 * kernel.trace() / 5
    expected = phi_q @ torch.linalg.solve(kernel + damping * torch.eye(5, dtype=torch.float64), phi.T)
    scores = trak.scores(queries)
    assert scores.shape == (3, 9)
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)
    # Another damping reuses the cached eigendecomposition and still matches the direct solve.
    expected = phi_q @ torch.linalg.solve(kernel + 10 * kernel.trace() / 5 * torch.eye(5, dtype=torch.float64), phi.T)
    torch.testing.assert_close(trak.scores_from_features(phi_q, damping=10.0), expected, rtol=1e-8, atol=1e-12)
    # Sign: an example scored as its own query is a proponent, (K + λI)⁻¹ being positive definite.
    assert (trak.scores_from_features(phi).diagonal() > 0).all()


def test_das_matches_a_dense_computation():
    task = toy()
    train = as_dataset(images(9, 0))
    queries = images(3, 1)
    config = TRAKConfig(measurement="mean_output", projection_dim=5, draws_per_example=DRAWS, seed=SEED, damping=0.1)
    das = DAS(task, train, replace(config, examples_per_projection=4))
    projection = GaussianProjection(5, SEED)
    samples = dataset_images(train, task)
    phi = dense_features(task, samples, "train", True, "mean_output", projection)
    phi_q = dense_features(task, queries, "query", False, "mean_output", projection)
    residuals = torch.stack(
        [reference_gradient(task, sample[None], i, "train", True, "residual") for i, sample in enumerate(samples)]
    )
    torch.testing.assert_close(das.train_features, phi, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(das.residuals, residuals, rtol=1e-9, atol=1e-12)
    kernel = phi.T @ phi
    expected = phi_q @ torch.linalg.solve(kernel + 0.1 * kernel.trace() / 5 * torch.eye(5, dtype=torch.float64), phi.T)
    torch.testing.assert_close(das.scores(queries), expected * residuals, rtol=1e-8, atol=1e-12)
    # The same scores whatever the grouping of examples; a loss-based config is refused by name.
    torch.testing.assert_close(DAS(task, train, config).scores(queries), expected * residuals, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="measurement must be 'mean_output'"):
        DAS(task, train, TRAKConfig(measurement="loss"))


def test_projection_is_deterministic_and_independent_of_grouping():
    first, second = GaussianProjection(16, seed=3), GaussianProjection(16, seed=3)
    rows = GaussianProjection.BLOCK_ROWS + 10  # more than one block
    assert torch.equal(first.matrix("layer", rows), second.matrix("layer", rows))
    assert first.matrix("layer", rows).shape == (rows, 16)
    assert not torch.equal(first.matrix("layer", 50), GaussianProjection(16, seed=4).matrix("layer", 50))
    assert not torch.equal(first.matrix("layer", 50), first.matrix("other", 50))
    weight, bias = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    flat = torch.cat([weight.flatten(1), bias], dim=1)
    torch.testing.assert_close(first.project({"layer": (weight, bias)}), flat @ first.matrix("layer", 18).double())

    task = toy()
    train = as_dataset(images(7, 0))
    features = [
        TRAK(
            task, train, TRAKConfig(projection_dim=6, draws_per_example=DRAWS, examples_per_projection=group)
        ).train_features
        for group in (2, 7)
    ]
    torch.testing.assert_close(features[0], features[1], rtol=1e-10, atol=1e-13)


def test_gradient_dot_matches_direct_dot_products():
    task = toy()
    train = as_dataset(images(5, 0))
    queries = images(2, 1)
    scores = gradient_dot_scores(
        task, queries, train, draws_per_query=DRAWS, draws_per_example=DRAWS, seed=SEED, estimator="plain"
    )  # the reference's independent draws
    train_grads = torch.stack(
        [reference_gradient(task, s[None], i, "train", True, "loss") for i, s in enumerate(dataset_images(train, task))]
    )
    query_grads = torch.stack(
        [reference_gradient(task, s[None], i, "query", False, "loss") for i, s in enumerate(queries)]
    )
    assert scores.shape == (2, 5)
    torch.testing.assert_close(scores.to(torch.float64), query_grads @ train_grads.T, rtol=1e-8, atol=1e-12)


def test_gradient_dot_is_the_large_damping_limit_of_influence(digits8):
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    train = digits8.select(range(6))
    factors = hfi.fit_factors(task, train, hfi.FactorConfig(strategy="kfac", draws_per_example=2))
    queries = task.preprocess([row["image"] for row in digits8.select(range(6, 8))])
    damping = 1e6
    influence = hfi.pairwise_scores(
        task, factors, queries, train, damping=damping, draws_per_query=4, draws_per_example=4
    )
    dot = gradient_dot_scores(task, queries, train, draws_per_query=4, draws_per_example=4)
    torch.testing.assert_close(damping * influence, dot, rtol=2e-3, atol=1e-6 * dot.abs().max().item())


def test_pixel_similarity():
    task = toy()
    train = as_dataset(images(6, 0))
    train_images = dataset_images(train, task).float()
    queries = torch.stack([train_images[4], -train_images[1]])
    scores = pixel_similarity_scores(task, queries, train, batch_size=4)
    assert scores.shape == (2, 6)
    flat = train_images.flatten(1).double()
    expected = torch.nn.functional.cosine_similarity(queries.flatten(1).double()[:, None], flat[None], dim=2)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6)
    assert scores[0].argmax() == 4 and scores[0, 4] == pytest.approx(1.0)  # the image itself is the top proponent
    assert scores[1].argmin() == 1 and scores[1, 1] == pytest.approx(-1.0)


def test_bad_trak_config():
    with pytest.raises(ValueError, match="output_function"):
        TRAKConfig(output_function="elbo")
    with pytest.raises(ValueError, match="damping"):
        TRAKConfig(damping=-1.0)
