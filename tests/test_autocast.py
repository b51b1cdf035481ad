"""Fitting under `torch.autocast(bfloat16)`: the network runs in bf16, the covariance products stay fp32."""

from __future__ import annotations

import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

import hf_influence as hfi


def test_covariances_are_fp32_products_under_bf16_autocast(digits8) -> None:
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    train = digits8.select(range(8))
    config = hfi.FactorConfig(batch_size=16, draws_per_example=2)
    exact = hfi.fit_factors(task, train, config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = hfi.fit_factors(task, train, config)
    # conv_in sees the fp32 noisy sample itself: its A must be the fp32 product, not a bf16-rounded one
    # (an autocast matmul would be off by ~1e-3 relative).
    first = "conv_in.activation_covariance"
    torch.testing.assert_close(mixed.tensors[first], exact.tensors[first], rtol=1e-6, atol=1e-7)
    assert mixed.tensors[first].dtype == torch.float32
    # Deeper layers see bf16 activations: close to the fp32 fit, not equal.
    for name, value in exact.tensors.items():
        if name.endswith("_covariance"):
            error = (mixed.tensors[name] - value).norm() / value.norm()
            assert error < 0.05, (name, error)
