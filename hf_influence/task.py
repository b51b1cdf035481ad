"""`DiffusionTask`: everything the influence machinery needs to know about a diffusers pipeline.

The task turns dataset rows into `Examples` (the denoiser's clean inputs and their conditioning), draws
everything random about a training step — the timestep, the noise, the flip, the VAE posterior sample, the
classifier-free-guidance dropout and the GGN probe — with generators seeded per example id (so results do
not depend on batching or on the number of processes), and computes the per-draw training loss exactly as
diffusers trains it: `F.mse_loss(pred, target)` with the target of the noise schedule (`noise_schedules.py`).

Supported pipelines: unconditional pixel-space (DDPM, DDIM), latent (a `vae`/`vqvae`: `latents.py`),
class-conditional (DiT), text-to-image (Stable Diffusion 1.x/2.x, SD3: `conditioning.py`), DDPM-family or
flow-matching schedulers, and PEFT LoRA adapters on the denoiser (attributed alone with `LORA_ONLY`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .conditioning import Conditioning, pipeline_conditioning
from .draws import Draws, sample_draws
from .estimators import PLAIN, Estimator
from .examples import Examples, images_to_tensor
from .families import DEFAULT, Family, family_of
from .latents import LatentEncoder, check_vae
from .noise_schedules import PREDICTION_TYPES, NoiseSchedule, noise_schedule
from .pipeline_checks import pipeline_denoiser
from .provenance import ModelProvenance, ModelSource
from .queries import QueryConditions
from .timestep_densities import TimestepDensity, loss_weights
from .validation import check_bool, check_float, check_int, check_str

__all__ = ["PREDICTION_TYPES", "DenoiserOutput", "DiffusionTask", "Draws", "Examples"]


@dataclass
class DenoiserOutput:
    """The denoiser's prediction for a batch of draws, with what the loss and measurements need."""

    prediction: torch.Tensor  # (S, C, H, W)
    target: torch.Tensor  # (S, C, H, W)
    timesteps: torch.Tensor  # (S,) timestep indices
    weights: torch.Tensor | None = None  # (S,) the training loss weighting of each draw's timestep, if any

    def mse_per_draw(self) -> torch.Tensor:
        """`F.mse_loss(pred, target)` of each draw: the mean over the elements of one sample."""
        return (self.prediction - self.target).pow(2).flatten(1).mean(dim=1)

    def loss_per_draw(self) -> torch.Tensor:
        """The training loss of each draw: its MSE, times its timestep's loss weight when training weighted it."""
        mse = self.mse_per_draw()
        return mse if self.weights is None else self.weights * mse


class DiffusionTask:
    """Adapter over a diffusers pipeline's denoiser, scheduler, VAE and conditioning.

    Args:
        denoiser: the network whose parameters are attributed (e.g. `UNet2DModel`): a diffusers model called as
            `denoiser(x_t, timestep=t, **conditioning)` (its family says how `x_t` and `t` are passed).
        scheduler: a DDPM-family (`alphas_cumprod`) or flow-matching diffusers scheduler.
        image_column: dataset column holding the training images.
        random_flip: whether training applied random horizontal flips; if so, training-side
            draws (factor fitting and training gradients) flip at random, queries never do.
        vae: for latent diffusion, the pipeline's `AutoencoderKL`, `VQModel` or `AutoencoderDC` (frozen).
        conditioning: how a dataset column conditions the denoiser (`conditioning.py`); None when unconditional.
        condition_dropout: the probability with which training replaced a caption by "" (or a class by the null
            class) for classifier-free guidance; training-side draws drop at that rate, queries never do.
        source: where the pipeline was read from (the factors' provenance).
        family: the pipeline's family (`families/`): packing, timestep convention, density; default the plain one.
        sample_shape: `(C, H, W)` of the denoiser's clean sample; default `config.in_channels × sample_size²`.
        timestep_density: the training timestep density (`timestep_densities.py`: a `TimestepDensity` or its
            name); default the family's (uniform for DDPM-family models, logit-normal for SD3, shifted for Flux).
        loss_weighting: the training loss weighting of flow-matching models ("none", "sigma_sqrt", "cosmap").
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler: Any,
        image_column: str = "image",
        random_flip: bool = False,
        vae: nn.Module | None = None,
        conditioning: Conditioning | None = None,
        condition_dropout: float = 0.0,
        source: ModelSource | None = None,
        family: Family | None = None,
        sample_shape: tuple[int, int, int] | None = None,
        timestep_density: TimestepDensity | str | None = None,
        loss_weighting: str = "none",
    ) -> None:
        config = getattr(denoiser, "config", None)
        if (
            config is None
            or not hasattr(config, "in_channels")
            or (sample_shape is None and not hasattr(config, "sample_size"))
        ):
            raise TypeError(
                f"{type(denoiser).__name__} is not a supported denoiser: expected a diffusers model "
                "with config.sample_size and config.in_channels (e.g. UNet2DModel), or a sample_shape."
            )
        check_str("image_column", image_column)
        check_bool("random_flip", random_flip)
        condition_dropout = check_float("condition_dropout", condition_dropout, minimum=0)
        if condition_dropout >= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}.")
        if condition_dropout > 0 and conditioning is None:
            raise ValueError("condition_dropout needs a conditional pipeline (a label or caption column).")

        self.denoiser = denoiser
        self.scheduler = scheduler
        self.schedule: NoiseSchedule = noise_schedule(scheduler)
        self.image_column = image_column
        self.random_flip = random_flip
        self.latents = None if vae is None else LatentEncoder(vae)
        self.conditioning = conditioning
        self.condition_dropout = condition_dropout
        self.source = source or ModelSource()
        self.family = family or DEFAULT
        self.prediction_type: str = self.schedule.prediction_type
        self.num_train_timesteps: int = self.schedule.num_train_timesteps
        shape = sample_shape or DEFAULT.sample_shape(None, denoiser, None, 1)
        self.channels, self.resolution = int(shape[0]), (int(shape[1]), int(shape[2]))
        # Learned variance (DiT, PixArt): the extra output channels are not part of the simple loss (the
        # pipelines split them off the same way), so the prediction is the first `channels` ones.
        self.learned_variance: bool = getattr(config, "out_channels", None) == 2 * int(config.in_channels)
        self.image_shape: tuple[int, int, int] = (
            self.sample_shape if self.latents is None else self.latents.image_shape(self.sample_shape)
        )
        if isinstance(timestep_density, str):
            timestep_density = TimestepDensity(timestep_density)
        self.timestep_density = timestep_density or TimestepDensity("uniform")
        self.loss_weighting = loss_weighting
        self._loss_weights = loss_weights(loss_weighting, self.schedule)
        self._null_conditioning: dict[str, torch.Tensor] | None = None
        if condition_dropout > 0:
            self._null_conditioning = conditioning.null()  # fail early when there is no null input
        self._fingerprint: tuple[Any, str] | None = None  # (the weights' version key, their hash)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pipeline(
        cls,
        pipeline: Any,
        image_column: str = "image",
        label_column: str | None = None,
        caption_column: str | None = None,
        random_flip: bool = False,
        condition_dropout: float = 0.0,
        source: ModelSource | None = None,
        resolution: int | None = None,
        timestep_density: TimestepDensity | str | None = None,
        loss_weighting: str = "none",
        conditioning_options: dict[str, Any] | None = None,
    ) -> DiffusionTask:
        """Build the task from a loaded diffusers pipeline: its `unet` or `transformer`, its `scheduler`, its VAE
        (latent pipelines), and the class labels of `label_column` (DiT) or the captions of `caption_column`
        (text-to-image: given to the denoiser as the pipeline's own `__call__` gives them). `source` says where the
        pipeline was read from; `resolution` is the training images' side in pixels (default: the denoiser's);
        `conditioning_options` are the family's (SDXL: `original_size_column`, `crop_column`; Flux:
        `guidance_scale`).

        A component this library cannot handle gets an error naming it.
        """
        _, denoiser, components = pipeline_denoiser(pipeline)
        vae_name = next((name for name in ("vae", "vqvae") if name in components), None)
        vae = None if vae_name is None else components[vae_name]
        if vae is not None:
            check_vae(vae, vae_name)
        family = family_of(pipeline)
        downsampling = 1 if vae is None else LatentEncoder(vae, vae_name).downsampling
        if resolution is not None:
            resolution = check_int("resolution", resolution, minimum=1)
        sample_shape = family.sample_shape(pipeline, denoiser, resolution, downsampling)
        image_shape = sample_shape if vae is None else LatentEncoder(vae, vae_name).image_shape(sample_shape)
        conditioning = pipeline_conditioning(
            pipeline, denoiser, label_column, caption_column, image_shape, conditioning_options
        )
        if timestep_density is None:
            timestep_density = family.density(pipeline, noise_schedule(pipeline.scheduler), sample_shape)
        return cls(
            denoiser,
            pipeline.scheduler,
            image_column=image_column,
            random_flip=random_flip,
            vae=vae,
            conditioning=conditioning,
            condition_dropout=condition_dropout,
            source=source,
            family=family,
            sample_shape=sample_shape,
            timestep_density=timestep_density,
            loss_weighting=loss_weighting,
        )

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str,
        revision: str | None = None,
        pipeline_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> DiffusionTask:
        """Load a diffusers pipeline (Hub id or local folder) and build the task from it, reading the data as
        training did (`pipelines.load_pipeline`); the task's `source` records the repo id and the commit it was
        read at (the factors' provenance).

        `pipeline_kwargs` go to `DiffusionPipeline.from_pretrained` (e.g. `text_encoder_3=None,
        tokenizer_3=None` for SD3 without T5); `kwargs` (image_column, label_column, caption_column,
        random_flip, condition_dropout) to `from_pipeline`."""
        from .pipelines import load_pipeline

        return load_pipeline(repo_or_dir, revision, pipeline_kwargs=pipeline_kwargs, **kwargs)[1]

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """`(C, H, W)` of the denoiser's input and prediction (latents for a latent pipeline)."""
        return (self.channels, *self.resolution)

    @property
    def sample_numel(self) -> int:
        return int(np.prod(self.sample_shape))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """`ᾱ_t` of a DDPM-family schedule."""
        return self.schedule.alphas_cumprod

    @property
    def betas(self) -> torch.Tensor:
        """`β_t` of a DDPM-family schedule."""
        return self.schedule.betas

    @property
    def columns(self) -> list[str]:
        """The dataset columns the task reads: the images, and the labels or captions of a conditional task."""
        return [self.image_column, *(self.conditioning.columns if self.conditioning is not None else ())]

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
        """A hash of the denoiser's parameter names, shapes and values (LoRA adapters included): factors and
        indices record it so they are never silently used with another model.

        The hash is kept while the weights stay as they are: it is recomputed when a parameter is added or
        replaced (a LoRA loaded), changed in place (an optimiser step, `load_state_dict`) or its values differ
        where a cheap sample of each tensor looks (edits through `.data`, which autograd does not count)."""
        key = _weights_key(self.denoiser)
        if self._fingerprint is None or self._fingerprint[0] != key:
            digest = hashlib.blake2b(digest_size=16)
            for name, param in self.denoiser.state_dict().items():
                value = param.detach().to("cpu", torch.float32).contiguous()
                digest.update(f"{name}:{tuple(value.shape)};".encode())
                digest.update(value.numpy().tobytes())
            self._fingerprint = (key, digest.hexdigest())
        return self._fingerprint[1]

    def provenance(self) -> ModelProvenance:
        """The model as factors and indices record it: where it came from, its class and its fingerprint."""
        return ModelProvenance(
            self.source.repo_id, self.source.revision, type(self.denoiser).__name__, self.fingerprint()
        )

    # ------------------------------------------------------------------ data

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images → a float tensor `(B, C, H, W)` in [-1, 1] at the pipeline's image size (the denoiser's, or its
        VAE's input for a latent pipeline). The value range follows the dtype (`examples.py`): integers and PIL
        images are [0, 255], floats must already be in [-1, 1]; PIL images are converted to the model's mode."""
        return images_to_tensor(images, self.image_shape, "the denoiser" if self.latents is None else "the VAE")

    def examples(
        self,
        images: Any,
        labels: Sequence[Any] | None = None,
        prompts: Sequence[str] | None = None,
        augment: bool = False,
    ) -> Examples:
        """Images and their conditioning → `Examples`: encoded by the VAE for a latent pipeline, with the
        class `labels` (DiT) or `prompts` (text-to-image) encoded for a conditional one.

        `augment` also encodes the mirror images, for draws with the training flips (training rows).
        """
        pixels = self.preprocess(images)
        conditions = self.query_conditions(labels, prompts, len(pixels))
        return self.encode(pixels, conditions, augment)

    def examples_from_rows(self, rows: Sequence[dict[str, Any]]) -> Examples:
        """Training rows (with the task's image column, and label or caption column) → `Examples`."""
        pixels = self.preprocess([row[self.image_column] for row in rows])
        conditions = None if self.conditioning is None else self.conditioning.values(rows)
        return self.encode(pixels, conditions, augment=True)

    def encode(self, pixels: torch.Tensor, conditions: Sequence[Any] | None = None, augment: bool = False) -> Examples:
        """Preprocessed images `(B, C, H, W)` and one label or caption each → `Examples` (VAE encoding once
        per batch, no gradient); with `augment` and training flips, the mirror images too."""
        views = [pixels, pixels.flip(-1)] if augment and self.random_flip else [pixels]
        std = None
        if self.latents is None:
            clean = torch.stack(views, dim=1)
        else:
            encoded = [self.latents.encode(view) for view in views]
            clean = torch.stack([mean for mean, _ in encoded], dim=1)
            if encoded[0][1] is not None:
                std = torch.stack([deviation for _, deviation in encoded], dim=1)
            if clean.shape[2:] != self.sample_shape:
                raise ValueError(
                    f"The VAE encodes these images to latents of shape {tuple(clean.shape[2:])}, but the denoiser "
                    f"expects {self.sample_shape}."
                )
        loss_dtype = self._loss_dtype()
        if self.conditioning is None:
            if conditions is not None:
                raise ValueError("This pipeline is unconditional: it takes no labels or captions.")
            inputs = {}
        else:
            if conditions is None or len(conditions) != len(pixels):
                raise ValueError(
                    f"This pipeline is conditioned on {self.conditioning.kind}: give one per image "
                    f"({len(pixels)} images)."
                )
            inputs = self.conditioning.encode(conditions)
        return Examples(
            clean.to(self.device, loss_dtype), None if std is None else std.to(self.device, loss_dtype), inputs
        )

    def query_conditions(
        self, labels: Sequence[Any] | None, prompts: Sequence[str] | None, count: int
    ) -> list[Any] | None:
        """The query-side conditioning of `count` queries (`queries.QueryConditions`): one class id per query for
        a class-conditional task, one prompt for a text one (one value is used for every query), None for an
        unconditional one."""
        conditions = QueryConditions.for_task(self, count, labels, prompts)
        return conditions.labels if conditions.labels is not None else conditions.prompts

    def as_examples(self, examples: Examples | torch.Tensor) -> Examples:
        """`Examples` as they are; a tensor `(B, C, H, W)` as clean samples in the denoiser's space (pixels in
        [-1, 1] for a pixel pipeline, scaled latents for a latent one) of an unconditional pipeline."""
        if isinstance(examples, Examples):
            return examples
        if examples.shape[1:] != self.sample_shape:
            raise ValueError(
                f"Examples have shape {tuple(examples.shape[1:])} but the denoiser takes {self.sample_shape}: "
                "turn images into Examples with task.examples(images, ...) first."
            )
        if self.conditioning is not None:
            raise ValueError(
                f"This pipeline is conditioned on {self.conditioning.kind}: pass Examples from "
                f"task.examples(images, {self.conditioning.kind}=...) instead of a tensor."
            )
        views = [examples, examples.flip(-1)] if self.random_flip else [examples]
        return Examples(torch.stack(views, dim=1))

    # ------------------------------------------------------------------ draws and loss

    def draw(
        self,
        example_ids: Sequence[Any],
        num_draws: int,
        seed: int,
        stream: str,
        augment: bool = False,
        timestep: int | None = None,
        estimator: Estimator = PLAIN,
    ) -> Draws:
        """`num_draws` draws for each example, rows ordered example-major (see `draws.py`)."""
        return sample_draws(self, example_ids, num_draws, seed, stream, augment, timestep, estimator)

    def run(
        self,
        examples: Examples | torch.Tensor,
        ids: Sequence[Any],
        num_draws: int,
        draw_rows: slice,
        seed: int,
        stream: str,
        augment: bool = False,
        timestep: int | None = None,
        estimator: Estimator = PLAIN,
    ) -> tuple[DenoiserOutput, Draws]:
        """Draws `draw_rows` of each example's `num_draws` (seeded by id) and the denoiser's output on them."""
        draws = self.draw(ids, num_draws, seed, stream, augment=augment, timestep=timestep, estimator=estimator)
        if (draw_rows.start, draw_rows.stop) != (0, num_draws):
            if len(ids) != 1:
                raise ValueError("A subset of draws can only be taken for one example at a time.")
            draws = draws.rows(draw_rows)
        output = self.predict(examples, draws, repeats=len(draws) // len(ids))
        if not torch.isfinite(output.prediction).all():
            raise FloatingPointError(
                f"The denoiser returned NaN or infinite values for examples {list(ids)}: "
                "check the model weights and the input images."
            )
        return output, draws

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's training target (ε, v or x0 per `prediction_type`; `ε − x0` for flow matching)."""
        return self.schedule.target(clean, noise, timesteps)

    def noisy_inputs(
        self, examples: Examples | torch.Tensor, draws: Draws, repeats: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, noisy): each example's `x0` repeated `repeats` times (example-major), flipped, sampled from
        the VAE posterior and noised per `draws`.

        Computed in fp32 (fp64 for an fp64 model), as diffusers computes the loss of half models.
        """
        examples = self.as_examples(examples)
        device, loss_dtype = self.device, self._loss_dtype()
        rows = torch.arange(len(examples), device=device).repeat_interleave(repeats)
        view = draws.flip.to(device).long()
        if examples.clean.shape[1] == 1:
            if draws.flip.any():
                raise ValueError(
                    "These draws flip, but the examples have no mirror view: build them with augment=True."
                )
            view = torch.zeros_like(view)
        clean = examples.clean.to(device, loss_dtype)[rows, view]
        if examples.std is not None:
            if draws.latent_noise is None:
                raise ValueError("The examples have a VAE posterior, but the draws no posterior noise.")
            clean = clean + examples.std.to(device, loss_dtype)[rows, view] * draws.latent_noise.to(device, loss_dtype)
        noise = draws.noise.to(device, loss_dtype)
        return clean, self.schedule.noisy(clean, noise, draws.timesteps.to(device))

    def denoiser_inputs(self, examples: Examples, draws: Draws, repeats: int) -> dict[str, torch.Tensor]:
        """The conditioning keyword inputs per draw, the null input where a draw drops it."""
        inputs = {}
        for name, value in examples.conditioning.items():
            value = value.to(self.device).repeat_interleave(repeats, dim=0)
            if draws.drop is not None and draws.drop.any() and name in self._null_conditioning:
                null = self._null_conditioning[name].to(value.device).expand_as(value)
                drop = draws.drop.to(value.device).view(-1, *([1] * (value.dim() - 1)))
                value = torch.where(drop, null, value)
            inputs[name] = value.to(self.dtype) if value.is_floating_point() else value
        return inputs

    def predict(self, examples: Examples | torch.Tensor, draws: Draws, repeats: int) -> DenoiserOutput:
        """The denoiser's prediction and training target on `examples` noised per `draws`."""
        examples = self.as_examples(examples)
        clean, noisy = self.noisy_inputs(examples, draws, repeats)
        timesteps = draws.timesteps.to(self.device)
        inputs = self.denoiser_inputs(examples, draws, repeats)
        if self.conditioning is not None:
            inputs = self.conditioning.call_inputs(inputs)
        model_timesteps = self.family.model_timestep(self.schedule.model_timesteps(timesteps))
        output = self.denoiser(self.family.pack(noisy.to(self.dtype)), timestep=model_timesteps, **inputs)
        prediction = output[0] if isinstance(output, tuple) else output.sample
        prediction = self.family.unpack(prediction, self.sample_shape)
        if self.learned_variance:
            prediction = prediction[:, : self.channels]
        noise = draws.noise.to(self.device, clean.dtype)
        weights = None if self._loss_weights is None else self._loss_weights.to(self.device)[timesteps].to(clean.dtype)
        return DenoiserOutput(prediction.to(clean.dtype), self.target(clean, noise, timesteps), timesteps, weights)

    def _loss_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32


def _weights_key(model: nn.Module) -> tuple:
    """What changes when the weights change, cheaply: each tensor's name, storage, autograd version and a
    sample of at most 16 of its values."""
    tensors = model.state_dict(keep_vars=True)
    samples = [
        value.detach().flatten()[:: max(1, value.numel() // 16)][:16].to(torch.float32) for value in tensors.values()
    ]
    values = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    layout = tuple((name, value.data_ptr(), value._version, tuple(value.shape)) for name, value in tensors.items())
    return layout, values
