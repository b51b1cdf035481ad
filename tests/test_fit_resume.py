"""An interrupted fit resumes from its checkpoint to the factors of an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from conftest import Crash, crash_task_after, mnist_dataset, tiny_unet
from diffusers import DDPMScheduler

import hf_influence as hfi

CONFIG = hfi.FactorConfig(draws_per_example=2, batch_size=4, dtype="float64")


# 10 examples in batches of 2 (4 draws per pass): 5 forward passes per pass over the data.
# Crash in the covariance pass, right after it (before any correction checkpoint), in the correction pass.
@pytest.mark.parametrize("crash_after", [3, 5, 7])
def test_resumed_fit_equals_an_uninterrupted_one(tmp_path, crash_after):
    dataset = mnist_dataset(10, 8)
    task = hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())
    expected = hfi.fit_factors(task, dataset, CONFIG)

    crash_task_after(task, crash_after)
    with pytest.raises(Crash):
        hfi.fit_factors(task, dataset, CONFIG, checkpoint_dir=tmp_path, checkpoint_every=1)
    del task.run
    with pytest.raises(FileExistsError, match="resume=True"):
        hfi.fit_factors(task, dataset, CONFIG, checkpoint_dir=tmp_path, checkpoint_every=1)
    resumed = hfi.fit_factors(task, dataset, CONFIG, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    assert resumed.config == expected.config
    assert resumed.tensors.keys() == expected.tensors.keys()
    for name, value in expected.tensors.items():
        torch.testing.assert_close(resumed.tensors[name], value, rtol=1e-12, atol=1e-15)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # older sums are dropped


def test_resume_with_other_settings_is_refused(tmp_path):
    dataset = mnist_dataset(10, 8)
    task = hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())
    crash_task_after(task, 2)
    with pytest.raises(Crash):
        hfi.fit_factors(task, dataset, CONFIG, checkpoint_dir=tmp_path, checkpoint_every=1)
    del task.run
    other = hfi.FactorConfig(draws_per_example=3, batch_size=4, dtype="float64")
    with pytest.raises(ValueError, match="other settings"):
        hfi.fit_factors(task, dataset, other, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
