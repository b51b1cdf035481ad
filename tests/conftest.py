"""Shared fixtures: tiny denoisers built from configs (random weights) and real MNIST digits."""

from __future__ import annotations

import os
import shutil
import tempfile
from types import SimpleNamespace
from urllib.parse import urlsplit

from hub_server import reserve_endpoint

# The Hub: the HF libraries read these once, at import, so they are set before any of them is imported. Every
# Hub call of the test session goes to the local Hub of the `hub` fixture (tests/hub_server.py) on a free port,
# never to huggingface.co; downloads are cached in a throwaway HF_HOME (no saved token, no user cache). Xet is
# off: the local Hub serves plain HTTP and git-LFS. A user's HF_TOKEN is left alone (the local Hub treats any
# token but its own as anonymous); tests pass `hub.token` explicitly.
os.environ["HF_ENDPOINT"] = reserve_endpoint()
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_influence_tests_hf_home_")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import datasets
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

import hf_influence as hfi
from hf_influence.data import mnist_demo_dataset

# One thread: on 2 shared cores, 2 torch threads per process can run 10-80x slower when anything else runs.
torch.set_num_threads(1)


class ToyDenoiser(nn.Module):
    """Any image-to-image `net` dressed as a diffusers denoiser (`config`, `.sample` output).

    The timestep is ignored: enough for exact-GGN checks of single layers and small nets.
    """

    def __init__(self, net: nn.Module, channels: int, size: int) -> None:
        super().__init__()
        self.net = net
        self.config = SimpleNamespace(sample_size=size, in_channels=channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.net(sample))


def toy_task(net: nn.Module, channels: int, size: int, **kwargs) -> hfi.DiffusionTask:
    return hfi.DiffusionTask(ToyDenoiser(net, channels, size), DDPMScheduler(), **kwargs)


class Crash(Exception):
    """Stands for a preempted or killed job."""


def crash_task_after(task: hfi.DiffusionTask, calls: int) -> None:
    """Make the task's forward passes raise `Crash` after `calls` of them; `del task.run` undoes it."""
    original, count = task.run, [0]

    def run(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Crash
        return original(*args, **kwargs)

    task.run = run


# Two levels, the second with attention: every layer kind of a real UNet, small enough for exact checks on CPU.
TINY_UNET_LAYOUT = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}


def tiny_unet(sample_size: int = 8, channels: int = 1, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel of `TINY_UNET_LAYOUT` with seeded random weights."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, **TINY_UNET_LAYOUT)


def mnist_dataset(count: int, size: int) -> datasets.Dataset:
    """`count` real MNIST digits with PIL `image`, `label` and stable `id` columns."""
    return mnist_demo_dataset(count, size)


@pytest.fixture
def unet_task() -> hfi.DiffusionTask:
    return hfi.DiffusionTask(tiny_unet(), DDPMScheduler())


@pytest.fixture(scope="session")
def digits8() -> datasets.Dataset:
    return mnist_dataset(32, 8)


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory):
    """The local Hub at HF_ENDPOINT (`hub_server.LocalHub`), started by the first test that asks for it."""
    from hub_server import LocalHub
    from huggingface_hub import constants

    endpoint = os.environ["HF_ENDPOINT"]
    if endpoint != constants.ENDPOINT or not constants.HF_HUB_DISABLE_XET:
        raise RuntimeError(
            f"huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT={endpoint} and "
            f"HF_HUB_DISABLE_XET=1 (it reads ENDPOINT={constants.ENDPOINT}): a pytest plugin imports it too early."
        )
    local_hub = LocalHub(port=urlsplit(endpoint).port, root=tmp_path_factory.mktemp("hub"))
    local_hub.start()
    yield local_hub
    local_hub.stop()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Forget accelerate's process-wide state after each test: `debug_launcher` forks, and a child that inherits
    a state initialised in this process (by any in-process Accelerator) believes it runs alone."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["HF_HOME"], ignore_errors=True)
