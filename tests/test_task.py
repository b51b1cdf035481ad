"""DiffusionTask: preprocessing, draws seeded by id, training targets per prediction type."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

import hf_influence as hfi


def test_from_pipeline_reads_scheduler(tmp_path):
    scheduler = DDIMScheduler(num_train_timesteps=50, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")
    DDIMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(tmp_path)
    task = hfi.DiffusionTask.from_pretrained(str(tmp_path))
    assert task.num_train_timesteps == 50
    assert task.prediction_type == "v_prediction"
    torch.testing.assert_close(task.alphas_cumprod, scheduler.alphas_cumprod.double())
    assert task.sample_shape == (1, 8, 8)


def test_preprocess_pil_array_and_tensor_agree():
    task = hfi.DiffusionTask(tiny_unet(channels=3), DDPMScheduler())
    array = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    from_pil = task.preprocess(PIL.Image.fromarray(array))
    from_array = task.preprocess(array)
    expected = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(from_pil[0], expected)
    torch.testing.assert_close(from_array[0], expected)
    assert task.preprocess(expected).shape == (1, 3, 8, 8)
    # a grey PIL image is converted to the denoiser's RGB mode, as diffusers' training scripts do
    grey = PIL.Image.fromarray(array[:, :, 0])
    assert task.preprocess(grey).shape == (1, 3, 8, 8)


def test_draws_depend_on_id_not_position():
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    both = task.draw([7, 3], 4, seed=1, stream="train")
    alone = task.draw([3], 4, seed=1, stream="train")
    torch.testing.assert_close(both.rows(slice(4, 8)).noise, alone.noise)
    torch.testing.assert_close(both.rows(slice(4, 8)).timesteps, alone.timesteps)
    other_stream = task.draw([3], 4, seed=1, stream="query")
    assert not torch.equal(other_stream.noise, alone.noise)
    other_seed = task.draw([3], 4, seed=2, stream="train")
    assert not torch.equal(other_seed.noise, alone.noise)
    assert (alone.timesteps >= 0).all() and (alone.timesteps < task.num_train_timesteps).all()


def test_flips_only_when_augmenting_a_flipped_task():
    flipping = hfi.DiffusionTask(tiny_unet(), DDPMScheduler(), random_flip=True)
    draws = flipping.draw(list(range(16)), 4, seed=0, stream="train", augment=True)
    assert 0 < draws.flip.float().mean() < 1
    assert not flipping.draw(list(range(16)), 4, seed=0, stream="query", augment=False).flip.any()
    plain = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    assert not plain.draw(list(range(16)), 4, seed=0, stream="train", augment=True).flip.any()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_matches_diffusers(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    task = hfi.DiffusionTask(tiny_unet(), scheduler)
    clean = torch.randn(5, 1, 8, 8)
    noise = torch.randn(5, 1, 8, 8)
    timesteps = torch.tensor([0, 10, 400, 800, 999])
    expected = {
        "epsilon": noise,
        "sample": clean,
        "v_prediction": scheduler.get_velocity(clean, noise, timesteps),
    }[prediction_type]
    torch.testing.assert_close(task.target(clean, noise, timesteps), expected)
    # the noisy input is diffusers' add_noise
    draws = task.draw([0], 5, seed=0, stream="train")
    _, noisy = task.noisy_inputs(clean[:1], draws, repeats=5)
    torch.testing.assert_close(
        noisy, scheduler.add_noise(clean[:1].expand(5, -1, -1, -1), draws.noise, draws.timesteps)
    )


def test_loss_per_draw_is_diffusers_mse():
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    samples = torch.rand(2, 1, 8, 8) * 2 - 1
    draws = task.draw([0, 1], 3, seed=0, stream="train")
    output = task.predict(samples, draws, repeats=3)
    for row in range(6):
        expected = torch.nn.functional.mse_loss(output.prediction[row], draws.noise[row])
        torch.testing.assert_close(output.loss_per_draw()[row], expected)


def test_unsupported_components_are_named():
    scheduler = DDPMScheduler()
    latent = SimpleNamespace(
        components={"unet": tiny_unet(), "vae": object(), "scheduler": scheduler}, scheduler=scheduler
    )
    with pytest.raises(TypeError, match=r"'vae' component \(object\) is not a supported VAE"):
        hfi.DiffusionTask.from_pipeline(latent)
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="takes no class labels"):
        hfi.DiffusionTask.from_pipeline(pipeline, label_column="label")
    assert hfi.DiffusionTask.from_pipeline(pipeline).denoiser is pipeline.unet
