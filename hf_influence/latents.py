"""Latent diffusion: the pipeline's VAE maps training images and queries to the denoiser's space.

Images are encoded once per batch (frozen VAE, eval mode, no gradient); what is random stays in the draws:

* `AutoencoderKL`: the encoder gives the posterior `N(μ, diag σ²)`, and each draw takes its own sample
  `z = μ + σ η`, `η ~ N(0, I)` from the draw's generator: the fresh posterior sample per draw of the paper's
  latent runs (`method.md` §3.3, §5.1), as diffusers' training scripts sample `latent_dist.sample()`.
* `VQModel`: the deterministic pre-quantisation latents (`encode(x).latents`), which latent-diffusion models are
  trained on; the decoder quantises.
* `AutoencoderDC` (Sana's deep-compression autoencoder): the deterministic latents (`encode(x).latent`).

The denoiser sees `(z − shift_factor) · scaling_factor` (no shift when the VAE has none), as the pipelines
undo it before decoding. Encodings are returned already scaled: `(μ − shift) · scale` and `σ · scale`.
"""

from __future__ import annotations

from typing import Any

import torch

LATENT_ENCODERS = ("AutoencoderKL", "VQModel", "AutoencoderDC")


def check_vae(vae: Any, component: str = "vae") -> None:
    """Refuse a VAE this module cannot use, naming the pipeline's component (`vae` or `vqvae`)."""
    import diffusers

    if not isinstance(vae, tuple(getattr(diffusers, name) for name in LATENT_ENCODERS)):
        raise TypeError(
            f"The pipeline's {component!r} component ({type(vae).__name__}) is not a supported VAE: "
            f"latent pipelines need one of {LATENT_ENCODERS}."
        )
    if vae.config.get("latents_mean") is not None or vae.config.get("latents_std") is not None:
        raise ValueError(
            f"The pipeline's {component!r} component ({type(vae).__name__}) normalises latents per channel "
            "(latents_mean / latents_std), which is not supported; only scaling_factor and shift_factor are."
        )


class LatentEncoder:
    """A pipeline's frozen VAE as the map from images to the denoiser's clean samples.

    Args:
        vae: an `AutoencoderKL` or `VQModel` (or a subclass).
        component: the pipeline's name for it ("vae" or "vqvae"), for error messages.
    """

    def __init__(self, vae: Any, component: str = "vae") -> None:
        from diffusers import AutoencoderKL

        check_vae(vae, component)
        config = vae.config
        self.vae = vae
        self.stochastic: bool = isinstance(vae, AutoencoderKL)
        self.scaling_factor: float = float(config.get("scaling_factor") or 1.0)
        self.shift_factor: float = float(config.get("shift_factor") or 0.0)
        blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels")
        self.downsampling: int = 2 ** (len(blocks) - 1)
        self.image_channels: int = int(config.in_channels)

    def image_shape(self, sample_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The `(C, H, W)` of the images whose latents have `sample_shape`."""
        _, height, width = sample_shape
        return (self.image_channels, height * self.downsampling, width * self.downsampling)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images `(B, C, H, W)` in [-1, 1] → the scaled latent mean and standard deviation (None for a VQModel)."""
        was_training = self.vae.training
        self.vae.eval()
        try:
            parameter = next(self.vae.parameters())
            encoded = self.vae.encode(pixels.to(parameter.device, parameter.dtype))
        finally:
            self.vae.train(was_training)
        if self.stochastic:
            posterior = encoded.latent_dist
            mean, std = posterior.mean, posterior.std
        else:  # VQModel: `latents`; AutoencoderDC: `latent`
            mean, std = getattr(encoded, "latents", None), None
            mean = encoded.latent if mean is None else mean
        mean = (mean - self.shift_factor) * self.scaling_factor
        return mean, None if std is None else std * self.scaling_factor
