"""`DiffusionTask`: everything the influence machinery needs to know about a diffusers pipeline.

The task turns dataset rows into denoiser inputs, draws the training noise `(t, ε)` with
generators seeded per example id (so results do not depend on batching or on the number of
processes) and computes the per-draw training loss exactly as diffusers trains it:
`F.mse_loss(pred, target)` with the target given by the scheduler's `prediction_type`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Draws:
    """One row per draw: the timestep, the noise, the horizontal flip and the GGN^model probe `ξ`."""

    timesteps: torch.Tensor  # (S,) long
    noise: torch.Tensor  # (S, C, H, W)
    flip: torch.Tensor  # (S,) bool
    probe: torch.Tensor  # (S, C, H, W), ξ ~ N(0, I) for the Monte-Carlo Fisher

    def __len__(self) -> int:
        return len(self.timesteps)

    def rows(self, index: slice) -> Draws:
        return Draws(self.timesteps[index], self.noise[index], self.flip[index], self.probe[index])


@dataclass
class DenoiserOutput:
    """The denoiser's prediction for a batch of draws, with what the loss and measurements need."""

    prediction: torch.Tensor  # (S, C, H, W)
    target: torch.Tensor  # (S, C, H, W)
    timesteps: torch.Tensor  # (S,)

    def loss_per_draw(self) -> torch.Tensor:
        """`F.mse_loss(pred, target)` of each draw: the mean over the elements of one sample."""
        return (self.prediction - self.target).pow(2).flatten(1).mean(dim=1)


def example_generator(seed: int, stream: str, example_id: Any) -> torch.Generator:
    """A CPU generator that depends only on (seed, stream, example id).

    Seeding by id (not by position in a batch or a rank's shard) makes every draw reproducible
    whatever the batch size, the order of the data or the number of processes.
    """
    digest = hashlib.blake2b(f"{seed}/{stream}/{example_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class DiffusionTask:
    """Adapter over a diffusers pipeline's denoiser and scheduler.

    Args:
        denoiser: the network whose parameters are attributed (e.g. `UNet2DModel`).
        scheduler: a diffusers noise scheduler with `alphas_cumprod` (DDPM, DDIM, ...).
        image_column: dataset column holding the training images.
        label_column, caption_column: conditioning columns (for later pipeline kinds).
        random_flip: whether training applied random horizontal flips; if so, training-side
            draws (factor fitting and training gradients) flip at random, queries never do.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler: Any,
        image_column: str = "image",
        label_column: str | None = None,
        caption_column: str | None = None,
        random_flip: bool = False,
    ) -> None:
        if label_column is not None or caption_column is not None:
            raise NotImplementedError(
                "Conditional pipelines (label_column / caption_column) are not supported yet: "
                "only unconditional pixel-space pipelines (DDPMPipeline, DDIMPipeline) are."
            )
        config = getattr(denoiser, "config", None)
        if config is None or not hasattr(config, "sample_size") or not hasattr(config, "in_channels"):
            raise TypeError(
                f"{type(denoiser).__name__} is not a supported denoiser: expected a diffusers model "
                "with config.sample_size and config.in_channels (e.g. UNet2DModel)."
            )
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(
                f"{type(scheduler).__name__} is not a supported scheduler: it has no alphas_cumprod "
                "(DDPMScheduler, DDIMScheduler and other DDPM-family schedulers do)."
            )
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")

        self.denoiser = denoiser
        self.scheduler = scheduler
        self.image_column = image_column
        self.random_flip = random_flip
        self.prediction_type: str = prediction_type
        self.num_train_timesteps: int = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float64)
        self.betas = scheduler.betas.detach().to(torch.float64)
        size = config.sample_size
        self.resolution: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.channels: int = int(config.in_channels)
        self._fingerprint: str | None = None
        # Where the pipeline came from ({repo_id, revision}); from_pretrained fills in the commit.
        self.source: dict[str, Any] = {"repo_id": None, "revision": None}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(
        cls,
        pipeline: Any,
        image_column: str = "image",
        label_column: str | None = None,
        caption_column: str | None = None,
        random_flip: bool = False,
    ) -> DiffusionTask:
        """Build the task from a loaded diffusers pipeline (its `unet` and `scheduler`)."""
        components = getattr(pipeline, "components", {})
        denoiser = components.get("unet") or components.get("transformer")
        if denoiser is None:
            raise TypeError(
                f"{type(pipeline).__name__} has no `unet` or `transformer` component; "
                f"its components are {sorted(components)}."
            )
        if components.get("vae") is not None:
            raise NotImplementedError(
                f"{type(pipeline).__name__} is a latent pipeline (it has a VAE): latent diffusion is not supported yet."
            )
        return cls(
            denoiser,
            pipeline.scheduler,
            image_column=image_column,
            label_column=label_column,
            caption_column=caption_column,
            random_flip=random_flip,
        )

    @classmethod
    def from_pretrained(cls, repo_or_dir: str, revision: str | None = None, **kwargs: Any) -> DiffusionTask:
        """Load a diffusers pipeline (Hub id or local folder) and build the task from it; the task's
        `source` records the repo id and the commit it was read at (the factors' provenance)."""
        from diffusers import DiffusionPipeline

        from .hub import download_pipeline

        folder, source = download_pipeline(repo_or_dir, revision)
        task = cls.from_pipeline(DiffusionPipeline.from_pretrained(folder), **kwargs)
        task.source = source
        return task

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.resolution)

    @property
    def sample_numel(self) -> int:
        return int(np.prod(self.sample_shape))

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run the denoiser in eval mode (no dropout), restoring its mode afterwards.

        Fitting, queries and training gradients all use eval mode; the reference code took training
        gradients in train mode, but dropout would break the per-id seeding of every draw."""
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            yield
        finally:
            self.denoiser.train(was_training)

    def fingerprint(self) -> str:
        """A hash of the denoiser's parameter names, shapes and values: factors and indices record it
        so they are never silently used with another model."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            for name, param in self.denoiser.state_dict().items():
                value = param.detach().to("cpu", torch.float32).contiguous()
                digest.update(f"{name}:{tuple(value.shape)};".encode())
                digest.update(value.numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------------ data

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images (PIL, arrays `HW`/`HWC` in [0, 255] or [0, 1], or tensors `CHW`/`BCHW` already in
        [-1, 1]) → a float tensor `(B, C, H, W)` in [-1, 1] at the denoiser's resolution.

        PIL images are converted to the denoiser's mode ("L" or "RGB"), as diffusers' training
        scripts do; arrays and tensors must already have the right channels and size.
        """
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            batch = images
        else:
            if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)):
                images = [images]
            if len(images) == 0:
                raise ValueError("No images were given.")
            batch = torch.stack([self._image_to_tensor(image) for image in images])
        if batch.shape[1:] != self.sample_shape:
            raise ValueError(
                f"Images have shape (C, H, W) = {tuple(batch.shape[1:])}, but the denoiser expects "
                f"{self.sample_shape} (channels, height, width). Resize or convert the images first."
            )
        if not torch.isfinite(batch).all():
            raise ValueError("Images contain NaN or infinite values.")
        return batch.to(torch.float32)

    def _image_to_tensor(self, image: Any) -> torch.Tensor:
        if isinstance(image, PIL.Image.Image):
            image = np.asarray(image.convert("L" if self.channels == 1 else "RGB"))
        if isinstance(image, list):  # datasets' Array2D/Array3D columns come as nested lists
            image = np.asarray(image)
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise ValueError(f"An image tensor must be (C, H, W) in [-1, 1]; got shape {tuple(image.shape)}.")
            return image.to(torch.float32)
        if not isinstance(image, np.ndarray):
            raise TypeError(f"Unsupported image type {type(image).__name__}: pass PIL images, arrays or tensors.")
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ValueError(f"An image array must be (H, W) or (H, W, C); got shape {array.shape}.")
        scale = 255.0 if array.dtype == np.uint8 or array.max(initial=0) > 1.0 else 1.0
        tensor = torch.from_numpy(array.astype(np.float32) / scale).permute(2, 0, 1)
        return tensor * 2.0 - 1.0

    # ------------------------------------------------------------------ draws and loss

    def draw(
        self,
        example_ids: Sequence[Any],
        num_draws: int,
        seed: int,
        stream: str,
        augment: bool = False,
        timestep: int | None = None,
    ) -> Draws:
        """`num_draws` independent draws for each example, rows ordered example-major.

        `stream` names the purpose ("fit", "correction", "train", "query", ...) so that different
        stages never reuse draws. `timestep` fixes t instead of drawing it uniformly.
        """
        timesteps, noise, flips, probes = [], [], [], []
        for example_id in example_ids:
            generator = example_generator(seed, stream, example_id)
            t = torch.randint(0, self.num_train_timesteps, (num_draws,), generator=generator)
            timesteps.append(torch.full_like(t, timestep) if timestep is not None else t)
            noise.append(torch.randn((num_draws, *self.sample_shape), generator=generator))
            flip = torch.rand(num_draws, generator=generator) < 0.5
            flips.append(flip if augment and self.random_flip else torch.zeros_like(flip))
            probes.append(torch.randn((num_draws, *self.sample_shape), generator=generator))
        return Draws(torch.cat(timesteps), torch.cat(noise), torch.cat(flips), torch.cat(probes))

    def run(
        self,
        samples: torch.Tensor,
        ids: Sequence[Any],
        num_draws: int,
        draw_rows: slice,
        seed: int,
        stream: str,
        augment: bool = False,
        timestep: int | None = None,
    ) -> tuple[DenoiserOutput, Draws]:
        """Draws `draw_rows` of each example's `num_draws` (seeded by id) and the denoiser's output on them."""
        draws = self.draw(ids, num_draws, seed, stream, augment=augment, timestep=timestep)
        if (draw_rows.start, draw_rows.stop) != (0, num_draws):
            if len(ids) != 1:
                raise ValueError("A subset of draws can only be taken for one example at a time.")
            draws = draws.rows(draw_rows)
        output = self.predict(samples, draws, repeats=len(draws) // len(ids))
        if not torch.isfinite(output.prediction).all():
            raise FloatingPointError(
                f"The denoiser returned NaN or infinite values for examples {list(ids)}: "
                "check the model weights and the input images."
            )
        return output, draws

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's training target for the scheduler's `prediction_type`."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return clean
        alpha_bar = self._per_row(self.alphas_cumprod, timesteps, clean)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean

    def epsilon_mse_factor(self, timesteps: torch.Tensor) -> torch.Tensor:
        """c_t with ‖ε̂ − ε‖² = c_t ‖pred − target‖²: converts the training loss to ε-space (for the ELBO)."""
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        if self.prediction_type == "epsilon":
            return torch.ones_like(alpha_bar)
        if self.prediction_type == "v_prediction":
            return alpha_bar
        return alpha_bar / (1 - alpha_bar)

    def noisy_inputs(self, samples: torch.Tensor, draws: Draws, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, noisy): `samples` repeated `repeats` times (example-major), flipped and noised per `draws`.

        Computed in fp32 (fp64 for an fp64 model), as diffusers computes the loss of half models.
        """
        loss_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        device = self.device
        clean = samples.to(device, loss_dtype).repeat_interleave(repeats, dim=0)
        flip = draws.flip.to(device).view(-1, 1, 1, 1)
        clean = torch.where(flip, clean.flip(-1), clean)
        alpha_bar = self._per_row(self.alphas_cumprod, draws.timesteps.to(device), clean)
        noisy = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * draws.noise.to(device, loss_dtype)
        return clean, noisy

    def predict(self, samples: torch.Tensor, draws: Draws, repeats: int) -> DenoiserOutput:
        """The denoiser's prediction and training target on `samples` noised per `draws`."""
        clean, noisy = self.noisy_inputs(samples, draws, repeats)
        timesteps = draws.timesteps.to(self.device)
        prediction = self.denoiser(noisy.to(self.dtype), timesteps).sample.to(clean.dtype)
        noise = draws.noise.to(self.device, clean.dtype)
        return DenoiserOutput(prediction, self.target(clean, noise, timesteps), timesteps)

    @staticmethod
    def _per_row(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(timesteps.device)[timesteps].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
