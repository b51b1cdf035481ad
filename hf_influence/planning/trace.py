"""One meta forward and backward pass of a draw: its FLOPs, each layer's weight-sharing positions and input
size, and the numbers autograd saves for the backward pass (a draw's activation memory).

Nothing global changes: FLOPs are counted by `FlopCounterMode`, saved tensors by a `saved_tensors_hooks`
context, and fused attention by `_FusedAttentionCount`, a thread-local `TorchFunctionMode` active only inside
the pass (`torch.nn.functional.scaled_dot_product_attention` itself is never replaced).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..curvature.layers import layer_kind


@dataclass
class Trace:
    """What one meta forward and backward pass of a draw shows."""

    forward_backward_flops: int
    positions: dict[str, int]
    layer_input_numel: dict[str, int]
    saved_numel: int


class _SavedNumbers:
    """Counts the numbers autograd saves for the backward pass (parameters and views aside), as the pack hook
    of `torch.autograd.graph.saved_tensors_hooks`."""

    def __init__(self, parameters: set[int]) -> None:
        self.parameters = parameters
        self.numel = 0
        self._paused = False

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._paused and id(tensor) not in self.parameters and tensor._base is None:
            self.numel += tensor.numel()
        return tensor

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside: for ops whose saved tensors are counted another way."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield


class _FusedAttentionCount(TorchFunctionMode):
    """Counts `scaled_dot_product_attention` as GPU fused kernels save it.

    On the meta device attention runs its math path, which saves the L × L attention probabilities; GPUs run
    fused kernels (flash / memory-efficient) that save only q, k, v, the output and a log-sum-exp per row.
    Inside this mode each call runs unchanged with the saved-tensor counting paused, and those numbers are
    added instead. Every other torch function passes through, with the mode off while it runs (as modes do):
    an attention call nested in another overridable torch function (`F.multi_head_attention_forward`, i.e.
    `nn.MultiheadAttention`; no planned diffusers denoiser uses it) is counted as the math path saves it."""

    def __init__(self, saved: _SavedNumbers) -> None:
        super().__init__()
        self.saved = saved

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not _ATTENTION:
            return func(*args, **kwargs)
        query, key, value = (args[i] if i < len(args) else kwargs[name] for i, name in enumerate(_QKV))
        with self.saved.paused():
            output = func(*args, **kwargs)
        self.saved.numel += query.numel() + key.numel() + value.numel() + output.numel() + query[..., 0].numel()
        return output


_ATTENTION = F.scaled_dot_product_attention  # the public function, as a mode receives it
_QKV = ("query", "key", "value")


def trace_draw(model: nn.Module, inputs: dict[str, Any], layers: dict[str, nn.Module]) -> Trace:
    """Count FLOPs (forward, and backward to the inputs as fitting runs it: no weight gradients), each
    layer's weight-sharing positions and input size, and the numbers autograd saves, for one draw."""
    from torch.utils.flop_counter import FlopCounterMode

    positions: dict[str, int] = {}
    input_numel: dict[str, int] = {}
    saved = _SavedNumbers({id(p) for p in model.parameters()})
    handles = [
        module.register_forward_hook(_shape_recorder(name, positions, input_numel)) for name, module in layers.items()
    ]
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter, saved.counting(), _FusedAttentionCount(saved):
            output = model(**inputs)
            output = output.sample if hasattr(output, "sample") else output[0]
            output.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    return Trace(counter.get_total_flops(), positions, input_numel, saved.numel)


def _shape_recorder(name: str, positions: dict[str, int], input_numel: dict[str, int]) -> Callable:
    """A forward hook writing a layer's positions per example (output numbers / d_out) and input numbers."""

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        d_out = layer_kind(module).weight_shape(module)[0]
        positions[name] = output.numel() // (output.shape[0] * d_out)
        input_numel[name] = args[0].numel() // args[0].shape[0]

    return record
