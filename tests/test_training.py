"""train_ddpm: it learns, saves a loadable pipeline of EMA weights, resumes exactly, runs on two
processes like one with the combined batch, refuses bad data clearly, and the script runs end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from conftest import mnist_dataset
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import hf_influence as hfi
from hf_influence.training import build_unet

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "train_ddpm.py"


def tiny_config(**overrides) -> hfi.TrainConfig:
    settings = {
        "resolution": 16,
        "channels": 1,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "batch_size": 16,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 0,
        "checkpoint_every": 0,
    }
    return hfi.TrainConfig(**{**settings, **overrides})


def mean_loss(pipeline, dataset) -> float:
    """The training loss of `pipeline` on `dataset`, on the same seeded draws whatever the pipeline."""
    task = hfi.DiffusionTask.from_pipeline(pipeline)
    samples = task.preprocess(dataset["image"])
    with torch.no_grad(), task.eval_mode():
        output, _ = task.run(samples, dataset["id"], 4, slice(0, 4), seed=1, stream="evaluation")
    return output.loss_per_draw().mean().item()


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def digits() -> object:
    return mnist_dataset(64, 16)


def test_training_lowers_the_loss_and_saves_the_ema_pipeline(digits, tmp_path):
    initial = hfi.train_ddpm(digits, tiny_config(max_steps=0), tmp_path / "initial")
    config = tiny_config(max_steps=30, learning_rate=1e-3, checkpoint_every=30)
    trained = hfi.train_ddpm(digits, config, tmp_path / "trained")

    before, after = mean_loss(initial, digits), mean_loss(trained, digits)
    assert after < 0.7 * before, (before, after)

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "trained")
    assert type(loaded).__name__ == "DDPMPipeline"
    assert_same_weights(loaded.unet.state_dict(), trained.unet.state_dict())
    raw = load_file(tmp_path / "trained" / "checkpoints" / "checkpoint-30" / "model.safetensors")
    assert any(not torch.equal(raw[name], value) for name, value in loaded.unet.state_dict().items()), (
        "the saved pipeline should hold the EMA weights, not the last raw weights"
    )
    recorded = json.loads((tmp_path / "trained" / "training_config.json").read_text())
    assert recorded["max_steps"] == 30 and recorded["block_out_channels"] == [8, 16]

    images = loaded(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 16, 16, 1) and np.isfinite(images.images).all()


def test_resumed_training_ends_with_the_uninterrupted_weights(digits, tmp_path):
    # 20 per batch over 64 digits: 4 batches an epoch, so the resumed run restarts mid-epoch and crosses an epoch.
    settings = {"batch_size": 20, "checkpoint_every": 3, "lr_warmup_steps": 2, "learning_rate": 1e-3}
    uninterrupted = hfi.train_ddpm(digits, tiny_config(max_steps=6, **settings), tmp_path / "uninterrupted")
    hfi.train_ddpm(digits, tiny_config(max_steps=3, **settings), tmp_path / "resumed")
    with pytest.raises(FileExistsError, match="resume=True"):
        hfi.train_ddpm(digits, tiny_config(max_steps=6, **settings), tmp_path / "resumed")
    resumed = hfi.train_ddpm(digits, tiny_config(max_steps=6, **settings), tmp_path / "resumed", resume=True)

    assert_same_weights(resumed.unet.state_dict(), uninterrupted.unet.state_dict())
    raw = [
        load_file(tmp_path / run / "checkpoints" / "checkpoint-6" / "model.safetensors")
        for run in ("resumed", "uninterrupted")
    ]
    assert_same_weights(*raw)


def _train_on_two_processes(dataset, config, output_dir) -> None:
    # Forked from pytest's process, whose accelerate state (if any) says "one process": start afresh.
    AcceleratorState._reset_state(reset_partial_state=True)
    hfi.train_ddpm(dataset, config, output_dir, accelerator=Accelerator(cpu=True))


def test_two_processes_train_like_one_with_their_combined_batch(digits, tmp_path):
    config = tiny_config(max_steps=2, batch_size=8)
    debug_launcher(_train_on_two_processes, args=(digits, config, tmp_path / "two"), num_processes=2)
    two = DiffusionPipeline.from_pretrained(tmp_path / "two")
    one = hfi.train_ddpm(digits, tiny_config(max_steps=2, batch_size=16), tmp_path / "one")
    # Attention key biases have a zero gradient (softmax ignores a shift shared by all keys) up to rounding, which
    # Adam scales up to about 1e-2 of a step (lr 1e-4): they agree to 1e-5; every other weight to 1e-6.
    weights = [pipeline.unet.state_dict() for pipeline in (two, one)]
    key_biases = [[state.pop(name) for name in list(state) if name.endswith("to_k.bias")] for state in weights]
    assert_same_weights(*weights)
    torch.testing.assert_close(*key_biases, rtol=0, atol=1e-5)


def test_bad_data_is_refused_with_the_fix(digits, tmp_path):
    with pytest.raises(KeyError, match=r"'picture'.*image-column"):
        hfi.train_ddpm(digits.rename_column("image", "picture"), tiny_config(), tmp_path)
    with pytest.raises(ValueError, match="empty"):
        hfi.train_ddpm(digits.select([]), tiny_config(), tmp_path)
    with pytest.raises(ValueError, match="--resolution"):
        hfi.train_ddpm(digits, tiny_config(resolution=8), tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused where there is no GPU")
def test_fp16_is_refused_on_cpu(digits, tmp_path):
    with pytest.raises(ValueError, match="needs a GPU"):
        hfi.train_ddpm(digits, tiny_config(mixed_precision="fp16"), tmp_path)


def test_script_trains_from_a_saved_dataset(digits, tmp_path):
    digits.save_to_disk(tmp_path / "digits")
    command = [sys.executable, str(SCRIPT), str(tmp_path / "digits"), "--output-dir", str(tmp_path / "ddpm")]
    command += ["--resolution", "16", "--channels", "1", "--block-out-channels", "8", "16", "--layers-per-block", "1"]
    command += ["--norm-num-groups", "4", "--max-steps", "2", "--batch-size", "8", "--lr-warmup-steps", "0"]
    command += ["--no-random-flip", "--checkpoint-every", "0"]
    # This checkout's library, whichever hf_influence is installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "ddpm" / "training_config.json").read_text())
    assert recorded["max_steps"] == 2 and recorded["random_flip"] is False and recorded["block_out_channels"] == [8, 16]
    assert DiffusionPipeline.from_pretrained(tmp_path / "ddpm").unet.config.sample_size == 16


def test_attention_heads_are_as_configured_and_must_divide_the_attention_widths():
    config = hfi.TrainConfig(resolution=16, channels=1, block_out_channels=(16, 32, 32), norm_num_groups=8)
    heads = {
        name: module.heads
        for name, module in build_unet(dataclasses.replace(config, attention_head_dim=None)).named_modules()
        if type(module).__name__ == "Attention"
    }
    assert heads and set(heads.values()) == {1}  # the 32-channel attention level and the middle block: one head
    assert {module.heads for module in build_unet(config).modules() if type(module).__name__ == "Attention"} == {4}
    with pytest.raises(ValueError, match=r"attention_head_dim=12 must divide the width of every level with attention"):
        dataclasses.replace(config, attention_head_dim=12)
