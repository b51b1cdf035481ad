"""Examples: images (training rows or queries) in the denoiser's space, and the rule that turns images into them.

Images may be PIL images, arrays or tensors. The value range is read from the dtype, never guessed from the
values:

* integers (`uint8` and other integer dtypes, PIL images): [0, 255], mapped to [-1, 1];
* floats: already in [-1, 1] (the diffusers convention); a float image outside [-1, 1] (e.g. a [0, 255]
  image stored as floats) is refused, naming the image, rather than silently mis-scaled.

Arrays are `(H, W)` or `(H, W, C)`, tensors `(C, H, W)` or a batch `(B, C, H, W)`; PIL images are converted to the
model's mode ("L" or "RGB") as diffusers' training scripts do. Images of different sizes are refused by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

FLOAT_TOLERANCE = 1e-3  # float images may exceed [-1, 1] by rounding this much


@dataclass
class Examples:
    """A batch of examples (training images or queries) in the denoiser's space: what each draw starts from.

    `clean[:, 0]` is the clean sample `x0` — the image in [-1, 1], or its scaled VAE latent (the posterior
    mean for an `AutoencoderKL`) — and `clean[:, 1]`, present when the examples may be flipped, the same for
    the mirror image (the latent of a mirrored image is not the mirrored latent). `std` is the scaled
    posterior standard deviation (a draw adds `std · η`), None when the encoding is deterministic.
    `conditioning` holds the denoiser's keyword inputs, one row per example (class labels, text states).
    """

    clean: torch.Tensor  # (B, V, C, H, W), V = 1 or 2 views
    std: torch.Tensor | None = None  # (B, V, C, H, W)
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, rows: slice) -> Examples:
        return Examples(
            self.clean[rows],
            None if self.std is None else self.std[rows],
            {name: value[rows] for name, value in self.conditioning.items()},
        )


def images_to_tensor(images: Any, image_shape: tuple[int, int, int], expected_by: str = "the model") -> torch.Tensor:
    """Images → a float32 tensor `(B, C, H, W)` in [-1, 1] of shape `image_shape` per image (see the module rule);
    `expected_by` names what takes images of that shape, for the message when they do not have it."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        batch = _scaled(images, "The image batch")
    else:
        if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise TypeError(
                f"Expected images (PIL images, arrays or tensors, or a list of them), got {type(images).__name__}."
            )
        if len(images) == 0:
            raise ValueError("No images were given.")
        tensors = [image_tensor(image, image_shape[0], f"Image {position}") for position, image in enumerate(images)]
        for position, tensor in enumerate(tensors):
            if tensor.shape != tensors[0].shape:
                raise ValueError(
                    f"Image {position} has shape (C, H, W) = {tuple(tensor.shape)}, but image 0 has "
                    f"{tuple(tensors[0].shape)}: all images must have the same size."
                )
        batch = torch.stack(tensors)
    if batch.shape[1:] != image_shape:
        raise ValueError(
            f"Images have shape (C, H, W) = {tuple(batch.shape[1:])}, but {expected_by} expects {image_shape} "
            "(channels, height, width). Resize or convert the images first."
        )
    return batch


def image_tensor(image: Any, channels: int, name: str = "The image") -> torch.Tensor:
    """One image → a float32 `(C, H, W)` tensor in [-1, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    if isinstance(image, list):  # datasets' Array2D/Array3D columns come as nested lists
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"{name} is a tensor of shape {tuple(image.shape)}; an image tensor is (C, H, W).")
        return _scaled(image, name)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Unsupported image type {type(image).__name__} ({name}): pass PIL images, arrays or tensors.")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"{name} is an array of shape {image.shape}; an image array is (H, W) or (H, W, C).")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"{name} has dtype {image.dtype}: image arrays hold integers in [0, 255] or floats in [-1, 1].")
    return _scaled(torch.from_numpy(np.array(image)).permute(2, 0, 1), name)  # a copy: arrays may be read-only


def _scaled(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """An integer tensor from [0, 255], or a float tensor checked to lie in [-1, 1], as float32 in [-1, 1]."""
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} has dtype {tensor.dtype}: images hold integers in [0, 255] or floats in [-1, 1].")
    if not tensor.is_floating_point():
        low, high = (int(value) for value in tensor.aminmax())
        if low < 0 or high > 255:
            raise ValueError(f"{name} has integer values in [{low}, {high}]; integer images must be in [0, 255].")
        return tensor.to(torch.float32) / 127.5 - 1.0
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    low, high = (float(value) for value in tensor.aminmax())
    if low < -1 - FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
        hint = " (it looks like a [0, 255] image: pass it as uint8)" if high > 1.5 else ""
        raise ValueError(
            f"{name} has float values in [{low:.3g}, {high:.3g}]; float images must be in [-1, 1]{hint}. "
            "Scale them with x / 127.5 - 1, or pass integer images in [0, 255]."
        )
    return tensor
