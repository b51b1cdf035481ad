"""`train_ddpm`: train an unconditional DDPM (`UNet2DModel` + `DDPMScheduler`) with `accelerate`.

Training uses the same image preprocessing, draws and loss as the influence machinery
(`DiffusionTask`), so the model is attributed under exactly the objective it was trained on. Each
step's noise, timesteps and flips are seeded by (seed, step, example position) and each epoch's
order by (seed, epoch): a run resumed from a checkpoint ends with the same weights as one that was
never interrupted. The saved pipeline holds the EMA weights, the model that is attributed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .distributed import Ranks
from .files import atomic_write_text
from .task import DiffusionTask

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_CONFIG_NAME = "training_config.json"  # the TrainConfig, written beside the saved pipeline
TRAINING_STATE = "training_state.json"
# The EMA warm-up of the paper's recipes (method.md §1.2): decay = min(ema_decay, 1 - (1 + step) ** -0.75).
EMA_POWER = 0.75


@dataclass
class TrainConfig:
    """How to train a DDPM. The defaults are the paper's CIFAR-2 recipe (method.md §1.2), except the
    UNet's dropout and time-embedding details, which stay at diffusers' defaults.

    Attributes:
        image_column: dataset column holding the training images.
        label_column: dataset column with class labels; recorded with the model, not used yet
            (training is unconditional).
        resolution: image height and width; the images must already have this size.
        channels: image channels (1 for greyscale, 3 for RGB); PIL images are converted to match.
        block_out_channels: UNet widths, one down/up block per entry, halving the resolution each time.
        layers_per_block: ResNet layers per UNet block.
        attention: whether the down block at index (n - 1) // 2 of n, and its mirrored up block, use
            attention (AttnDownBlock2D / AttnUpBlock2D); for 4 blocks at 32×32 that is the 16×16 level,
            as in the paper's CIFAR UNet. The middle block has attention either way.
        attention_head_dim: channels per attention head (diffusers' default 8; None: one head as wide as its
            level); it must divide the width of every level with attention. On a CPU a small UNet trains faster
            with fewer, wider heads (the demo's 32-channel levels: one head, 1.7× the steps per second of four).
        norm_num_groups: GroupNorm groups; must divide every entry of block_out_channels.
        num_train_timesteps: diffusion steps T of the DDPMScheduler.
        beta_schedule: DDPMScheduler beta schedule ("linear" from 1e-4 to 0.02, "scaled_linear",
            "squaredcos_cap_v2", ...).
        prediction_type: what the UNet predicts: "epsilon", "v_prediction" or "sample".
        max_steps: optimisation steps to train for (in total, counting steps before a resume).
        batch_size: examples per step on each process.
        learning_rate: AdamW learning rate (default betas, weight decay `weight_decay`).
        weight_decay: AdamW weight decay.
        lr_scheduler: a `diffusers.optimization.get_scheduler` name ("cosine", "constant_with_warmup",
            "linear", ...), spanning max_steps; a resumed run must keep max_steps for it to match.
        lr_warmup_steps: steps of linear learning-rate warm-up.
        grad_clip: maximum gradient norm (clipped before each step).
        ema_decay: maximum decay of the exponential moving average of the weights (with warm-up); the
            saved pipeline holds the EMA weights.
        random_flip: whether to flip each training image horizontally at random (fresh at every step).
        seed: seeds the UNet's initialisation, the data order and every draw of (t, ε, flip).
        checkpoint_every: save the full training state every this many steps into
            output_dir/checkpoints (0 never does).
        mixed_precision: "no" (fp32), "fp16" (GPU only) or "bf16"; used when train_ddpm builds the
            Accelerator; a given Accelerator must have the same setting.
    """

    image_column: str = "image"
    label_column: str | None = None
    resolution: int = 32
    channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    attention: bool = True
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    max_steps: int = 32000
    batch_size: int = 128
    learning_rate: float = 1e-4
    weight_decay: float = 1e-6
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 3200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    random_flip: bool = True
    seed: int = 0
    checkpoint_every: int = 1000
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        choices = {
            "prediction_type": ("epsilon", "v_prediction", "sample"),
            "mixed_precision": ("no", "fp16", "bf16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if (
            min(
                self.resolution,
                self.channels,
                self.layers_per_block,
                self.batch_size,
                1 if self.attention_head_dim is None else self.attention_head_dim,
                len(self.block_out_channels),
            )
            < 1
        ):
            raise ValueError(
                "resolution, channels, layers_per_block, batch_size, attention_head_dim and block_out_channels "
                "must be positive."
            )
        if min(self.max_steps, self.lr_warmup_steps, self.checkpoint_every) < 0:
            raise ValueError("max_steps, lr_warmup_steps and checkpoint_every cannot be negative.")
        if any(width % self.norm_num_groups for width in self.block_out_channels):
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry "
                f"{self.block_out_channels}."
            )
        levels = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % levels:
            raise ValueError(
                f"resolution={self.resolution} must be divisible by {levels}: the UNet halves it at each of its "
                f"{len(self.block_out_channels) - 1} downsamplings."
            )
        attention_widths = sorted({self.block_out_channels[level] for level in self.attention_levels})
        if self.attention_head_dim and any(width % self.attention_head_dim for width in attention_widths):
            raise ValueError(
                f"attention_head_dim={self.attention_head_dim} must divide the width of every level with attention "
                f"{attention_widths}."
            )

    @property
    def attention_level(self) -> int | None:
        """The down block (and its mirrored up block) with attention, if any."""
        return (len(self.block_out_channels) - 1) // 2 if self.attention else None

    @property
    def attention_levels(self) -> list[int]:
        """Levels whose width an attention layer has: the attention block's and the middle block's (the last)."""
        middle = len(self.block_out_channels) - 1
        return [middle] if self.attention_level is None else [self.attention_level, middle]


def build_unet(config: TrainConfig) -> Any:
    """A randomly initialised `UNet2DModel` for `config`; the same seed gives the same weights."""
    from diffusers import UNet2DModel

    levels = range(len(config.block_out_channels))
    down = ["AttnDownBlock2D" if level == config.attention_level else "DownBlock2D" for level in levels]
    up = ["AttnUpBlock2D" if level == config.attention_level else "UpBlock2D" for level in reversed(levels)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return UNet2DModel(
            sample_size=config.resolution,
            in_channels=config.channels,
            out_channels=config.channels,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            attention_head_dim=config.attention_head_dim,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=config.norm_num_groups,
        )


class _EpochShuffle(torch.utils.data.Sampler[int]):
    """A permutation of the rows seeded by (seed, epoch); the training loop sets `epoch`.

    `accelerate` shards the batches of this sampler over processes; it does not reseed it.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class _PositionedRows(torch.utils.data.Dataset):
    """(row position, image) of a map-style dataset: the position keys the row's draws."""

    def __init__(self, dataset: Any, image_column: str) -> None:
        self.dataset, self.image_column = dataset, image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> tuple[int, Any]:
        return position, self.dataset[position][self.image_column]


class _PositionedStream(torch.utils.data.IterableDataset):
    """(position in this epoch's order, image) of a streaming dataset, shuffled by (seed, epoch)."""

    def __init__(self, dataset: Any, image_column: str, seed: int) -> None:
        self.dataset, self.image_column, self.epoch = dataset.shuffle(seed=seed), image_column, 0

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        self.dataset.set_epoch(self.epoch)
        for position, row in enumerate(self.dataset):
            yield position, row[self.image_column]


def _first_row(dataset: Any, column: str) -> dict[str, Any]:
    row = next(iter(dataset), None)
    if row is None:
        raise ValueError("The dataset is empty: there is nothing to train on.")
    if column not in row:
        raise KeyError(
            f"The dataset has no column {column!r} (its columns are {sorted(row)}); "
            "set image_column (--image-column) to the column with the images."
        )
    return row


def _check_image(task: DiffusionTask, image: Any, config: TrainConfig) -> None:
    """Fail before training starts, with the fix, when the images do not fit the model."""
    try:
        task.preprocess([image])
    except ValueError as error:
        raise ValueError(
            f"{error} The model is configured for {config.channels}-channel {config.resolution}×{config.resolution} "
            "images: set resolution (--resolution) and channels to the data's, or resize the images first "
            "(e.g. dataset.map with PIL's Image.resize)."
        ) from error


def _data_loader(dataset: Any, config: TrainConfig, task: DiffusionTask) -> tuple[Any, Any]:
    """A DataLoader of (row positions, preprocessed images), and the object whose `epoch` sets its order."""
    import datasets

    if hasattr(dataset, "select_columns"):  # decode only the images
        dataset = dataset.select_columns([config.image_column])
    if isinstance(dataset, datasets.IterableDataset):
        rows = order = _PositionedStream(dataset, config.image_column, config.seed)
        sampler = None
    else:
        rows = _PositionedRows(dataset, config.image_column)
        sampler = order = _EpochShuffle(len(dataset), config.seed)

    def collate(items: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        positions, images = zip(*items, strict=True)
        return torch.tensor(positions), task.preprocess(list(images))

    loader = torch.utils.data.DataLoader(rows, batch_size=config.batch_size, sampler=sampler, collate_fn=collate)
    return loader, order


def _batches(accelerator: Any, loader: Any, order: Any, epoch: int, skip: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, batch index within it, batch) forever, starting `skip` batches into `epoch`."""
    while True:
        order.epoch = epoch
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for index, batch in enumerate(batches, start=skip):
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    found = [path for path in checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if (path / TRAINING_STATE).is_file()]
    return max(found, key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def train_ddpm(
    dataset: Any,
    config: TrainConfig | None = None,
    output_dir: str | Path = "ddpm",
    accelerator: Any = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Any:
    """Train a DDPM on `dataset`'s images and save the `DDPMPipeline` (EMA UNet + scheduler) to `output_dir`.

    `output_dir` must be new or empty — or hold this function's checkpoints with `resume=True` — unless
    `overwrite=True`: it is checked before training, so nothing a user had there is replaced by surprise.

    `dataset` is a `datasets` Dataset or IterableDataset (or any sequence of rows with the image
    column). With `resume=True` training continues from the latest checkpoint in
    output_dir/checkpoints. Works under `accelerate launch`: each process takes its share of every
    epoch and the pipeline is saved by the main process. Draws are keyed by row position, not by
    process, so N processes with batch_size B train like one process with N·B (up to float rounding,
    where each epoch's batches are full). Returns the pipeline on every process.
    """
    config = config or TrainConfig()
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, resume, overwrite)
    checkpoints = output_dir / "checkpoints"
    accelerator = _accelerator_for(config, accelerator)
    latest = _checkpoint_to_resume(checkpoints, resume)
    run = _set_up(dataset, config, accelerator)
    position = _restore(run, latest) if latest is not None else _Position()
    run.ema.to(accelerator.device)
    _train(run, position, checkpoints)
    return _save_pipeline(run, output_dir)


@dataclass
class _Run:
    """What a training run steps: the model as `accelerate` prepared it, beside the plain UNet the EMA
    follows, and the data whose order the loop sets each epoch."""

    config: TrainConfig
    accelerator: Any
    task: DiffusionTask
    unet: Any
    model: Any
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    loader: Any
    order: Any


@dataclass
class _Position:
    """Where training stands: optimiser steps taken, and the epoch and batch the next step reads."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0


def _accelerator_for(config: TrainConfig, accelerator: Any) -> Any:
    """The given Accelerator, checked against the config, or one built from it."""
    from accelerate import Accelerator, PartialState

    device = PartialState().device if accelerator is None else accelerator.device
    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 mixed precision needs a GPU (accelerate ignores it on CPU): use bf16 or 'no'.")
    if accelerator is None:
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
    elif accelerator.mixed_precision != config.mixed_precision:
        raise ValueError(
            f"The Accelerator uses mixed_precision={accelerator.mixed_precision!r} but the config asks for "
            f"{config.mixed_precision!r}: make them agree."
        )
    Ranks(accelerator)  # refuses a multi-process launch in which every rank would train alone
    return accelerator


def _check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    from .artifacts import describe_folder

    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir} is a file, not a folder: choose a folder to save the pipeline in.")
    contents = {path.name for path in output_dir.iterdir()} if output_dir.is_dir() else set()
    if not contents or overwrite or (resume and "checkpoints" in contents):
        return
    raise FileExistsError(
        f"{output_dir} already holds {describe_folder(output_dir)}; training would replace its files. Choose a new "
        "or empty folder, pass resume=True (--resume) to continue its checkpoints, or overwrite=True (--overwrite)."
    )


def _checkpoint_to_resume(checkpoints: Path, resume: bool) -> Path | None:
    """The latest checkpoint when resuming; refuses to start over a folder that holds another run's."""
    latest = _latest_checkpoint(checkpoints)
    if latest is not None and not resume:
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints of another run: pass resume=True (--resume) to continue it, "
            "or choose another output_dir."
        )
    if resume and latest is None:
        warnings.warn(f"No checkpoint in {checkpoints}: training starts from step 0.", stacklevel=3)
    return latest


def _set_up(dataset: Any, config: TrainConfig, accelerator: Any) -> _Run:
    """A fresh run: the seeded UNet, its scheduler and task, the data, the optimiser and the EMA, all
    prepared by `accelerate` (a resumed run builds the same, then loads its checkpoint over it)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    unet = build_unet(config)
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
    )
    task = DiffusionTask(unet, scheduler, image_column=config.image_column, random_flip=config.random_flip)
    _check_image(task, _first_row(dataset, config.image_column)[config.image_column], config)

    loader, order = _data_loader(dataset, config, task)
    # fused: one kernel for all parameters (7 % of the demo's step on a CPU, more on a GPU).
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
    )
    # accelerate steps the learning-rate scheduler once per process at every optimiser step.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=EMA_POWER, foreach=True)
    accelerator.register_for_checkpointing(ema)
    return _Run(config, accelerator, task, unet, model, optimizer, lr_scheduler, ema, loader, order)


def _restore(run: _Run, checkpoint: Path) -> _Position:
    """Load a checkpoint's state (model, optimiser, schedules, EMA, RNGs) into the run; where it stopped."""
    run.accelerator.load_state(str(checkpoint))
    return _Position(**json.loads((checkpoint / TRAINING_STATE).read_text()))


def _train(run: _Run, position: _Position, checkpoints: Path) -> None:
    """Step from `position` to config.max_steps, checkpointing every config.checkpoint_every steps."""
    config, accelerator = run.config, run.accelerator
    run.model.train()
    progress = tqdm(
        total=config.max_steps, initial=position.step, desc="Training", disable=not accelerator.is_main_process
    )
    batches = _batches(accelerator, run.loader, run.order, position.epoch, position.next_batch)
    step = position.step
    while step < config.max_steps:
        epoch, index, (positions, images) = next(batches)
        loss = _training_step(run, step, positions, images)
        step += 1
        logs = {"loss": loss, "lr": run.lr_scheduler.get_last_lr()[0]}
        accelerator.log(logs, step=step)
        progress.update()
        progress.set_postfix(loss=f"{logs['loss']:.4f}")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            _save_checkpoint(run, checkpoints, _Position(step, epoch, index + 1))
    progress.close()


def _training_step(run: _Run, step: int, positions: torch.Tensor, images: torch.Tensor) -> float:
    """One optimiser step on a batch, with the draws of (seed, step, row position); returns the loss."""
    task, model = run.task, run.model
    draws = task.draw(positions.tolist(), 1, run.config.seed, f"training-step-{step}", augment=True)
    clean, noisy = task.noisy_inputs(images, draws, repeats=1)
    timesteps = draws.timesteps.to(clean.device)
    target = task.target(clean, draws.noise.to(clean), timesteps)
    loss = F.mse_loss(model(noisy, timesteps).sample.float(), target)
    run.accelerator.backward(loss)
    run.accelerator.clip_grad_norm_(model.parameters(), run.config.grad_clip)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.step(run.unet.parameters())
    return loss.item()


def _save_checkpoint(run: _Run, checkpoints: Path, position: _Position) -> None:
    """The full training state, then where training stands, written last: a checkpoint without it is
    incomplete and never resumed from."""
    path = checkpoints / f"{CHECKPOINT_PREFIX}{position.step}"
    run.accelerator.save_state(str(path))
    if run.accelerator.is_main_process:
        atomic_write_text(path / TRAINING_STATE, json.dumps(asdict(position)))
    run.accelerator.wait_for_everyone()


def _save_pipeline(run: _Run, output_dir: Path) -> Any:
    """The DDPMPipeline of the EMA weights, saved with the TrainConfig beside it (what later reads the
    data as training did looks there)."""
    from diffusers import DDPMPipeline

    unet = run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False)
    run.ema.copy_to(unet.parameters())
    pipeline = DDPMPipeline(unet=unet, scheduler=run.task.scheduler)
    if run.accelerator.is_main_process:
        pipeline.save_pretrained(output_dir)
        (output_dir / TRAINING_CONFIG_NAME).write_text(json.dumps(asdict(run.config), indent=2))
    run.accelerator.wait_for_everyone()
    return pipeline
