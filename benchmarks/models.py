"""The benchmark model of the issues: a 1.1 M-parameter diffusers `UNet2DModel` for 32×32 greyscale digits."""

from __future__ import annotations


def benchmark_unet():
    """`UNet2DModel` with attention at 16×16, seeded so every benchmark and library gets the same weights."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
