"""Bad input gets an error that names the problem."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from conftest import ToyDenoiser, mnist_dataset, tiny_unet
from diffusers import DDPMScheduler
from torch import nn

import hf_influence as hfi


@pytest.fixture
def task():
    return hfi.DiffusionTask(tiny_unet(), DDPMScheduler())


def test_wrong_size_or_channels(task):
    with pytest.raises(ValueError, match=r"expects \(1, 8, 8\)"):
        task.preprocess(np.zeros((16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expects \(1, 8, 8\)"):
        task.preprocess(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        task.preprocess(torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(TypeError, match="Unsupported image type"):
        task.preprocess(["not an image"])
    wrong_size = mnist_dataset(4, 12)
    with pytest.raises(ValueError, match="expects"):
        hfi.fit_factors(task, wrong_size)


def test_missing_image_column(task):
    dataset = mnist_dataset(4, 8).rename_column("image", "picture")
    with pytest.raises(KeyError, match=r"no column 'image'.*picture"):
        hfi.fit_factors(task, dataset)


def test_empty_dataset(task):
    empty = datasets.Dataset.from_dict({"image": [], "id": []})
    with pytest.raises(ValueError, match="empty"):
        hfi.fit_factors(task, empty)


def test_missing_id_column_warns_and_uses_positions(task):
    dataset = mnist_dataset(4, 8)
    with pytest.warns(UserWarning, match="no 'id' column"):
        without_ids = hfi.fit_factors(task, dataset.remove_columns("id"), hfi.FactorConfig(strategy="kfac"))
    with_ids = hfi.fit_factors(task, dataset, hfi.FactorConfig(strategy="kfac"))
    torch.testing.assert_close(without_ids.tensors, with_ids.tensors)


def test_nan_loss(task):
    with torch.no_grad():
        task.denoiser.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        hfi.fit_factors(task, mnist_dataset(4, 8))


def test_invalid_config_values():
    with pytest.raises(ValueError, match="strategy"):
        hfi.FactorConfig(strategy="diagonal")
    with pytest.raises(ValueError, match="approx"):
        hfi.FactorConfig(approx="mean")
    with pytest.raises(ValueError, match="No Linear or Conv2d"):
        hfi.fit_factors(
            hfi.DiffusionTask(tiny_unet(), DDPMScheduler()), mnist_dataset(2, 8), hfi.FactorConfig(module_filter="nope")
        )


def test_unsupported_denoiser_and_scheduler():
    with pytest.raises(TypeError, match="not a supported denoiser"):
        hfi.DiffusionTask(nn.Conv2d(1, 1, 3), DDPMScheduler())
    with pytest.raises(TypeError, match="not a supported scheduler"):
        hfi.DiffusionTask(ToyDenoiser(nn.Conv2d(1, 1, 3, padding=1), 1, 8), object())
