"""Measurements: definitions checked against their formulas, and against each other where they coincide."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

import hf_influence as hfi
from hf_influence.measurements import get_measurement


def _output(prediction_type: str = "epsilon"):
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler(prediction_type=prediction_type))
    samples = torch.rand(2, 1, 8, 8) * 2 - 1
    draws = task.draw([0, 1], 4, seed=0, stream="query")
    with torch.no_grad():
        return task, samples, draws, task.predict(samples, draws, repeats=4)


def test_loss_and_square_norm():
    task, _, draws, output = _output()
    torch.testing.assert_close(hfi.Loss()(task, output), (output.prediction - draws.noise).pow(2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(hfi.SquareNorm()(task, output), output.prediction.pow(2).mean(dim=(1, 2, 3)))


def test_simplified_elbo_weights():
    task, _, _, output = _output()
    betas = DDPMScheduler().betas.double()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    t = output.timesteps
    weight = betas[t] / (2 * (1 - betas[t]) * (1 - alphas_cumprod[t]))
    torch.testing.assert_close(hfi.SimplifiedELBO()(task, output), weight.float() * hfi.Loss()(task, output))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_simplified_elbo_is_in_epsilon_space(prediction_type):
    """For v- and x0-prediction the ELBO uses ε̂ derived from the prediction, not the raw MSE."""
    task, samples, draws, output = _output(prediction_type)
    _, noisy = task.noisy_inputs(samples, draws, repeats=4)
    alpha_bar = task.alphas_cumprod[output.timesteps].float().view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        epsilon = alpha_bar.sqrt() * output.prediction + (1 - alpha_bar).sqrt() * noisy
    else:
        epsilon = (noisy - alpha_bar.sqrt() * output.prediction) / (1 - alpha_bar).sqrt()
    t = output.timesteps
    betas = task.betas[t].float()
    weight = betas / (2 * (1 - betas) * (1 - alpha_bar.flatten()))
    expected = weight * (epsilon - draws.noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(hfi.SimplifiedELBO()(task, output), expected, rtol=1e-4, atol=1e-6)


def test_weighted_and_fixed_time_losses():
    task, _, _, output = _output()
    weights = torch.linspace(0, 1, task.num_train_timesteps)
    expected = weights[output.timesteps].float() * hfi.Loss()(task, output)
    torch.testing.assert_close(hfi.WeightedLoss(weights)(task, output), expected)
    with pytest.raises(ValueError, match="weights"):
        hfi.WeightedLoss(torch.ones(3))(task, output)
    fixed = hfi.LossAtTime(17)
    draws = task.draw([0], 5, seed=0, stream="query", timestep=fixed.timestep)
    assert (draws.timesteps == 17).all()


def test_unknown_measurement_is_named():
    with pytest.raises(ValueError, match="simplified_elbo"):
        get_measurement("elbo_typo")
    assert isinstance(get_measurement("square_norm"), hfi.SquareNorm)
