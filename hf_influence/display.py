"""Showing images at a readable size: small images (a 16×16 digit) are scaled up by a whole factor with
nearest-neighbour sampling, so that every pixel stays a sharp square and what is shown is exactly what
was scored; and the attribution grid of a query, its proponents and its opponents."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

GRID_CELL = 64  # smallest side of a cell in an attribution grid, in pixels


def whole_factor(side: int, min_side: int) -> int:
    """The smallest whole factor that scales `side` up to at least `min_side` (1 when it is already)."""
    return max(1, math.ceil(min_side / side))


def upscale(image: Any, min_side: int) -> PIL.Image.Image:
    """`image` (PIL or an array) scaled up by a whole factor, nearest neighbour, to a longest side of at
    least `min_side` pixels."""
    if not isinstance(image, PIL.Image.Image):
        image = PIL.Image.fromarray(np.asarray(image))
    factor = whole_factor(max(image.size), min_side)
    return image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST)


def attribution_grid(query: Any, proponents: Sequence[Any], opponents: Sequence[Any]) -> PIL.Image.Image:
    """Three rows of square cells: the query, its proponents, its opponents; each cell is the query's
    side scaled up by a whole factor to at least GRID_CELL pixels."""
    side = max(query.size)
    cell = side * whole_factor(side, GRID_CELL)
    columns = max(1, len(proponents), len(opponents))
    grid = PIL.Image.new("RGB", (columns * cell, 3 * cell), "white")
    for row, images in enumerate(([query], proponents, opponents)):
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell), PIL.Image.NEAREST), (column * cell, row * cell))
    return grid
