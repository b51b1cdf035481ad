"""Display: small images scaled up by a whole factor (every pixel a sharp square), and the attribution grid."""

from __future__ import annotations

import numpy as np
from PIL import Image

from hf_influence.display import GRID_CELL, attribution_grid, upscale


def test_small_images_are_scaled_up_by_a_whole_factor():
    pixels = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10  # 6 wide, 4 high
    image = Image.fromarray(pixels)
    shown = upscale(image, 64)  # the longest side, 6, times 11 ≥ 64
    assert shown.size == (66, 44)
    assert np.array_equal(np.asarray(shown)[::11, ::11], pixels)
    assert np.array_equal(np.asarray(shown)[10::11, 10::11], pixels)  # nearest neighbour: no blending
    assert upscale(pixels, 64).size == (66, 44)  # arrays too (datasets in numpy format)
    assert upscale(image, 5).size == (6, 4)  # large enough already: left as it is


def test_attribution_grid_has_a_row_each_for_query_proponents_opponents():
    query = Image.new("L", (8, 8), 255)
    proponents = [Image.new("L", (8, 8), 0)] * 3
    opponents = [Image.new("RGB", (8, 8), (255, 0, 0))] * 2
    grid = attribution_grid(query, proponents, opponents)
    cell = 8 * 8  # 8-pixel images scaled up 8x to GRID_CELL
    assert cell == GRID_CELL and grid.size == (3 * cell, 3 * cell) and grid.mode == "RGB"
    centre = cell // 2
    assert grid.getpixel((centre, centre)) == (255, 255, 255)  # the query
    assert grid.getpixel((cell + centre, centre)) == (255, 255, 255)  # the query row has one image
    assert grid.getpixel((2 * cell + centre, cell + centre)) == (0, 0, 0)  # the third proponent
    assert grid.getpixel((cell + centre, 2 * cell + centre)) == (255, 0, 0)  # the second opponent
    assert grid.getpixel((2 * cell + centre, 2 * cell + centre)) == (255, 255, 255)  # no third opponent
