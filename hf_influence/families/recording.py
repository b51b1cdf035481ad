"""Recording the denoiser's inputs as the pipeline itself builds them.

A text-to-image pipeline's `__call__` encodes prompts (one or several text encoders, pooled embeddings, masks,
position ids, SDXL's time ids, Flux's guidance) and calls the denoiser. Rather than re-implementing each
pipeline's encoding, `record_denoiser_call` runs the pipeline's own `__call__` for one step and stops it at its
first call into the denoiser, keeping the arguments: exactly what generation gives the denoiser. Nothing is
denoised or decoded. The pipeline runs on a copy with its own scheduler, so the caller's pipeline is untouched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn


class _Recorded(Exception):
    """Raised by the hook on the denoiser's first call: the pipeline stops there."""


@dataclass
class DenoiserCall:
    """The positional and keyword arguments of one call into the denoiser."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def recording_copy(pipeline: Any) -> Any:
    """A shallow copy of `pipeline` sharing every model but with a scheduler of its own (a `__call__` sets the
    scheduler's timesteps)."""
    recorder = copy.copy(pipeline)
    recorder.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    return recorder


def record_denoiser_call(pipeline: Any, denoiser: nn.Module, **call_kwargs: Any) -> DenoiserCall:
    """The arguments `pipeline(**call_kwargs)` gives `denoiser` first (one inference step, latent output)."""
    recorded: list[DenoiserCall] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        recorded.append(DenoiserCall(args, kwargs))
        raise _Recorded

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipeline(**call_kwargs, num_inference_steps=1, output_type="latent")
    except _Recorded:
        pass
    finally:
        handle.remove()
    if not recorded:
        raise RuntimeError(f"{type(pipeline).__name__}.__call__ finished without calling its denoiser.")
    return recorded[0]
