"""A smoke test against the real Hugging Face Hub: runs only when HF_TOKEN is set (it is skipped in CI, which has
no network). It pushes tiny factors to a new private repo of the token's user, loads them back by id, and deletes
the repo. It runs in a subprocess, because this test session points HF_ENDPOINT at the local Hub."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import tempfile, uuid
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from huggingface_hub import HfApi
    import hf_influence as hfi
    from hf_influence.data import mnist_demo_dataset

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    task = hfi.DiffusionTask(unet, DDPMScheduler())
    factors = hfi.fit_factors(task, mnist_demo_dataset(8, 8), hfi.FactorConfig(batch_size=8))
    api = HfApi()
    repo = f"{api.whoami()['name']}/hf-influence-smoke-{uuid.uuid4().hex[:8]}"
    try:
        factors.push_to_hub(repo, private=True)
        loaded = hfi.InfluenceFactors.from_pretrained(repo, task=task, cache_dir=tempfile.mkdtemp())
        torch.testing.assert_close(loaded.tensors, factors.tensors, rtol=0, atol=0)
        print("smoke ok", repo)
    finally:
        api.delete_repo(repo, missing_ok=True)
    """
)


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="the real-Hub smoke test needs HF_TOKEN (and a network)")
def test_factors_round_trip_on_the_real_hub(tmp_path):
    environment = {name: value for name, value in os.environ.items() if name not in ("HF_ENDPOINT", "HF_HUB_OFFLINE")}
    environment["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoke ok" in result.stdout
