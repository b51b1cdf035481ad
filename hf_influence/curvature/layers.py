"""Layer kinds: how a Linear or Conv2d layer's input and output gradient become the K-FAC vectors.

Every supported layer is seen as `y_r = W a_r + b` at `R` weight-sharing positions `r`:
`a` is `(S, R, d_in)` and the output gradient `g` is `(S, R, d_out)`, one row `S` per draw.
A weight gradient is then `Σ_r g_r a_rᵀ`, with `W` flattened row-major to `(d_out, d_in)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# `module_filter` keeping only the LoRA `A` and `B` layers of a PEFT-adapted denoiser (any adapter name, e.g.
# "...to_q.lora_A.default_0"): attributes a fine-tune shipped as a LoRA, its base weights held fixed. PEFT's
# wrapper layers are not Linear/Conv2d subclasses and their `base_layer`s do not match, so neither is captured.
LORA_ONLY = r"\.lora_[AB]\.[^.]+$"


class LayerKind:
    """How one module type maps to `(a, g)`; subclasses of the module type are handled too."""

    module_type: type[nn.Module] = nn.Module

    @staticmethod
    def activations(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def output_gradients(module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def weight_shape(module: nn.Module) -> tuple[int, int]:
        """(d_out, d_in) of the flattened weight."""
        raise NotImplementedError

    @classmethod
    def summed_gradients(
        cls, module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor, groups: int
    ) -> torch.Tensor:
        """Weight gradients `Σ g aᵀ` (groups, d_out, d_in), summed over positions and over each of
        `groups` equal blocks of consecutive rows (one block per example, or per draw)."""
        a = cls.activations(module, inputs)
        g = cls.output_gradients(module, grad_output)
        return g.reshape(groups, -1, g.shape[-1]).transpose(1, 2) @ a.reshape(groups, -1, a.shape[-1]).to(g.dtype)


class LinearKind(LayerKind):
    """`nn.Linear` on `(S, d_in)` (R = 1) or on tokens `(S, ..., d_in)` (R = number of tokens)."""

    module_type = nn.Linear

    @staticmethod
    def activations(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])

    @staticmethod
    def output_gradients(module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    @staticmethod
    def weight_shape(module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features


class Conv2dKind(LayerKind):
    """`nn.Conv2d`: the positions are the output pixels and `a_r` is the im2col patch, in the `(C_in, k1, k2)`
    order of `W.view(C_out, -1)`. Non-zero padding modes pad first, as the module does.

    A grouped convolution (depthwise ones included) has `W` of shape `(C_out, C_in/groups · k1 · k2)`: output
    channel `i` sees only its group's patch. Its K-FAC activation factor treats the groups' patches as further
    positions — the per-group covariances averaged (`method.md` §3.2: "channel groups are averaged") — and its
    gradient factor is over all output channels. Per-example gradients are exact (`summed_gradients`)."""

    module_type = nn.Conv2d

    @staticmethod
    def _padded(module: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The input and the padding left for the convolution: zero padding by numbers stays implicit,
        "same"/"valid" and other padding modes are applied explicitly, as the module does."""
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return inputs, module.padding
        (k1, k2), (d1, d2) = module.kernel_size, module.dilation
        if module.padding == "valid":
            pads = [0, 0, 0, 0]
        elif module.padding == "same":
            total1, total2 = d1 * (k1 - 1), d2 * (k2 - 1)
            pads = [total2 // 2, total2 - total2 // 2, total1 // 2, total1 - total1 // 2]
        else:
            p1, p2 = module.padding
            pads = [p2, p2, p1, p1]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return (F.pad(inputs, pads, mode=mode) if any(pads) else inputs), (0, 0)

    @staticmethod
    def activations(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        (k1, k2), (d1, d2), (s1, s2) = module.kernel_size, module.dilation, module.stride
        padded, (p1, p2) = Conv2dKind._padded(module, inputs)
        if p1 or p2:
            padded = F.pad(padded, [p2, p2, p1, p1])
        # Strided views instead of F.unfold: one copy into the (position, patch) layout, several times faster.
        patches = padded.unfold(2, d1 * (k1 - 1) + 1, s1).unfold(3, d2 * (k2 - 1) + 1, s2)[..., ::d1, ::d2]
        batch, channels, out1, out2 = patches.shape[:4]
        groups = module.groups
        rows = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, out1 * out2 * groups, channels // groups * k1 * k2)
        return rows

    @classmethod
    def summed_gradients(
        cls, module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor, groups: int
    ) -> torch.Tensor:
        # The convolution's own weight-gradient kernel with one group per block: no patch matrix, ~10x faster.
        padded, padding = cls._padded(module, inputs)
        rows, channels, height, width = padded.shape
        out_channels = grad_output.shape[1]
        per_group = rows // groups
        padded = padded.reshape(groups, per_group, channels, height, width).transpose(0, 1)
        grad_output = grad_output.reshape(groups, per_group, out_channels, *grad_output.shape[2:]).transpose(0, 1)
        weight = torch.nn.grad.conv2d_weight(
            padded.reshape(per_group, groups * channels, height, width).to(grad_output.dtype),
            (groups * out_channels, channels // module.groups, *module.kernel_size),
            grad_output.reshape(per_group, groups * out_channels, *grad_output.shape[3:]),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=groups * module.groups,  # the example blocks, each split into the layer's own groups
        )
        return weight.reshape(groups, out_channels, -1)

    @staticmethod
    def output_gradients(module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.flatten(2).transpose(1, 2)

    @staticmethod
    def weight_shape(module: nn.Module) -> tuple[int, int]:
        return module.out_channels, module.weight[0].numel()


LAYER_KINDS: tuple[type[LayerKind], ...] = (LinearKind, Conv2dKind)


def layer_kind(module: nn.Module) -> type[LayerKind] | None:
    for kind in LAYER_KINDS:
        if isinstance(module, kind.module_type):
            return kind
    return None


def find_layers(
    model: nn.Module, module_filter: str | Callable[[str, nn.Module], bool] | None = None
) -> dict[str, nn.Module]:
    """The supported layers of `model` by qualified name, in registration order.

    `module_filter` is a regex searched in the name, or a callable `(name, module) -> bool`.
    """
    if module_filter is not None and not callable(module_filter):
        if not isinstance(module_filter, str):
            raise TypeError(f"module_filter must be a regular expression (a str) or a callable, got {module_filter!r}.")
        try:
            re.compile(module_filter)
        except re.error as error:
            raise ValueError(f"module_filter={module_filter!r} is not a valid regular expression: {error}.") from None
    layers = {}
    for name, module in model.named_modules():
        if layer_kind(module) is None:
            continue
        if isinstance(module_filter, str) and not re.search(module_filter, name):
            continue
        if callable(module_filter) and not module_filter(name, module):
            continue
        layers[name] = module
    if not layers:
        raise ValueError(
            f"No Linear or Conv2d layer of {type(model).__name__} matches module_filter={module_filter!r}."
        )
    return layers
