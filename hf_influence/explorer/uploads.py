"""An uploaded picture as a query for the model: checked before anything is decoded (size, format, pixel
mode), then converted as training converted images, so that what is attributed is what is shown."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

# Formats PIL can identify that make sense for a picture; anything else is refused by name.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
UPLOAD_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I")


def load_upload_image(
    path: str | Path | None, resolution: tuple[int, int], channels: int, max_bytes: int, max_side: int
) -> PIL.Image.Image:
    """Open an uploaded file as a picture for the model, or raise a ValueError that says what is wrong.

    The file must be a picture PIL can read (PNG, JPEG, WebP, BMP, GIF, TIFF), at most `max_bytes`
    and `max_side` pixels a side (checked from the header, before decoding anything). It is then
    converted to the model's channels (as diffusers' training scripts convert images), centre-cropped
    to the model's aspect ratio and resized to its resolution: what is attributed is what is shown.
    """
    if path is None:
        raise ValueError("Upload an image first.")
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"The file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB.")
    try:
        image = PIL.Image.open(path)
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError) as error:
        raise ValueError(
            f"{path.name} is not a readable image ({type(error).__name__}); upload a PNG, JPEG or WebP picture."
        ) from None
    if image.format not in UPLOAD_FORMATS:
        raise ValueError(f"Images in {image.format} format are not accepted; use one of {', '.join(UPLOAD_FORMATS)}.")
    if max(image.size) > max_side or min(image.size) < 1:
        raise ValueError(
            f"The image is {image.width}×{image.height} pixels; the largest side accepted is {max_side} pixels."
        )
    if image.mode not in UPLOAD_MODES:
        raise ValueError(f"Images in pixel mode {image.mode!r} are not accepted; use greyscale or RGB(A) images.")
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise ValueError(f"{path.name} is damaged and cannot be decoded ({error}).") from None
    if image.mode in ("I;16", "I"):  # 16-bit greyscale → 8-bit
        image = PIL.Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    image = image.convert("RGBA" if image.mode in ("P", "PA", "LA") else image.mode).convert(
        "L" if channels == 1 else "RGB"
    )
    height, width = resolution
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    return image.resize((width, height), PIL.Image.BOX if scale > 1 else PIL.Image.BICUBIC)
