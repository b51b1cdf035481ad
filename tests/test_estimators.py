"""Gradient estimators: unbiased draws with less variance (stratified timesteps, antithetic noise, common random
numbers), checked against their definitions, and the same gradients in expectation as the plain estimator."""

from __future__ import annotations

import pytest
import torch
from conftest import mnist_dataset, tiny_unet
from diffusers import DDPMScheduler

import hf_influence as hfi
from hf_influence.curvature.layers import find_layers
from hf_influence.engine import DrawPlan
from hf_influence.estimators import Estimator
from hf_influence.gradients import per_example_gradients


@pytest.fixture(scope="module")
def task():
    return hfi.DiffusionTask(tiny_unet(), DDPMScheduler())


def test_names_round_trip_and_bad_names_are_refused():
    assert Estimator.named("plain") == Estimator()
    assert Estimator.named("antithetic+stratified").name == "stratified+antithetic"
    for bad in ("sobol", "stratified+stratified", ""):
        with pytest.raises((ValueError, TypeError), match="estimator"):
            Estimator.named(bad)
    with pytest.raises(ValueError, match="estimator"):
        hfi.IndexConfig(estimator="qmc")


def test_stratified_timesteps_cover_the_density_evenly(task):
    draws = task.draw(list(range(50)), 8, 0, "train", estimator=Estimator(stratified=True))
    strata = draws.timesteps.view(50, 8) // (task.num_train_timesteps // 8)
    assert (strata == torch.arange(8)).all()  # one draw in each eighth of the timesteps, for every example
    plain = task.draw(list(range(50)), 8, 0, "train").timesteps.view(50, 8) // 125
    assert not (plain == torch.arange(8)).all()


def test_antithetic_noise_comes_in_opposite_pairs(task):
    draws = task.draw([0, 1], 5, 0, "train", estimator=Estimator(antithetic=True))
    noise, t = draws.noise.view(2, 5, -1), draws.timesteps.view(2, 5)
    torch.testing.assert_close(noise[:, 0], -noise[:, 1]) and torch.testing.assert_close(noise[:, 2], -noise[:, 3])
    assert (t[:, 0] == t[:, 1]).all() and (t[:, 2] == t[:, 3]).all()
    assert not torch.equal(noise[:, 4], -noise[:, 3])  # an odd draw out is plain


def test_common_draws_are_shared_by_examples_and_queries(task):
    common = Estimator(common=True)
    train = task.draw([3, 7], 4, 0, "train", estimator=common)
    query = task.draw([0], 4, 0, "query", estimator=common)
    torch.testing.assert_close(train.noise[:4], train.noise[4:], rtol=0, atol=0)
    torch.testing.assert_close(train.noise[:4], query.noise, rtol=0, atol=0)
    assert not torch.equal(task.draw([3], 4, 0, "fit", estimator=common).noise, query.noise)  # fitting is apart


@pytest.mark.parametrize("name", ["stratified", "antithetic", "common", "stratified+antithetic"])
def test_every_estimator_has_the_plain_expectation(task, name):
    """Averaged over many draws, per-example gradients agree with the plain estimator's (unbiasedness), and the
    spread of one example's estimate over seeds is no larger than the plain one's."""
    examples = task.examples(mnist_dataset(2, 8)["image"])
    layers = {name: module for name, module in find_layers(task.denoiser).items() if name == "conv_out"}

    def gradients(estimator: str, seed: int, draws: int) -> torch.Tensor:
        plan = DrawPlan.training(draws, seed, 256, estimator=Estimator.named(estimator))
        return per_example_gradients(task, layers, examples, [0, 1], plan, torch.float64)["conv_out"][0]

    plain = gradients("plain", 0, 2048)
    other = gradients(name, 1, 2048)
    assert (other - plain).norm() < 0.1 * plain.norm()
    spread = {
        kind: torch.stack([gradients(kind, seed, 16) for seed in range(12)]).std(dim=0).norm()
        for kind in ("plain", name)
    }
    assert spread[name] <= 1.1 * spread["plain"]
