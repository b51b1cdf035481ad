"""Layer capture: hooks that hand each layer's input `a` and output gradient `g` to a consumer.

A forward hook records the input exactly as the module receives it (after any explicit padding
done by the caller, as in diffusers' downsamplers) and the module's output. `backward(value)` then
asks autograd for the gradient of `value` with respect to the recorded outputs only: parameter
gradients are never formed, which saves a third of the backward pass and leaves `.grad` untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .layers import LayerKind, layer_kind

ForwardFn = Callable[[str, nn.Module, type[LayerKind], torch.Tensor], None]
BackwardFn = Callable[[str, nn.Module, type[LayerKind], torch.Tensor, torch.Tensor], None]


@dataclass
class _Call:
    name: str
    module: nn.Module
    kind: type[LayerKind]
    inputs: torch.Tensor
    output: torch.Tensor
    version: int


class LayerCapture:
    """Context manager registering forward hooks on `layers`.

    `on_forward(name, module, kind, input)` runs at each call of a layer; after the forward pass,
    `backward(value)` calls `on_backward(name, module, kind, input, grad_output)` for each call.
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        on_forward: ForwardFn | None = None,
        on_backward: BackwardFn | None = None,
    ) -> None:
        self.layers = layers
        self.on_forward = on_forward
        self.on_backward = on_backward
        self._calls: list[_Call] = []
        self._handles: list = []

    def __enter__(self) -> LayerCapture:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name, layer_kind(module))))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()

    def _hook(self, name: str, kind: type[LayerKind]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"Layer {name!r} was not called with a tensor as its first argument.")
            inputs = args[0].detach()
            if self.on_forward is not None:
                self.on_forward(name, module, kind, inputs)
            if self.on_backward is not None and output.requires_grad:
                self._calls.append(_Call(name, module, kind, inputs, output, output._version))

        return hook

    def backward(self, value: torch.Tensor, retain_graph: bool = False) -> None:
        """Backpropagate the scalar `value` to the recorded layer outputs and hand over the gradients.

        With `retain_graph`, the forward pass can be backpropagated again (another `value`)."""
        calls = self._calls
        if not retain_graph:
            self._calls = []
        for call in calls:
            if call.output._version != call.version:
                raise RuntimeError(
                    f"The output of layer {call.name!r} was modified in place after the layer ran; "
                    "its gradient cannot be captured. Exclude the layer with module_filter."
                )
        grads = torch.autograd.grad(
            value, [call.output for call in calls], allow_unused=True, retain_graph=retain_graph
        )
        for call, grad in zip(calls, grads, strict=True):
            if grad is not None:
                self.on_backward(call.name, call.module, call.kind, call.inputs, grad)
