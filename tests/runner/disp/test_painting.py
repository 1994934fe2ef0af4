"""masking.space: pixels — the salient cells painted over: in the border colour, or drawn in from
around them so a trigger over an object is replaced by the object's surface."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from disp_api import MaskingFill
from disp_runner.disp.masking import paint_token_cells
from disp_runner.models.base import TokenGrid, VisualLayout

LAYOUT = VisualLayout(num_tokens=36, grids=(TokenGrid(rows=6, cols=6, cell_height=8, cell_width=8),))
BACKGROUND, OBJECT, TRIGGER = (250, 250, 250), (200, 30, 30), (0, 0, 0)


def _scene() -> Image.Image:
    """A 48x48 scene: a red square over the middle 4x4 cells, a black patch in the cell at row 2,
    column 2 (token 14), well inside the object."""
    pixels = np.full((48, 48, 3), BACKGROUND, dtype=np.uint8)
    pixels[8:40, 8:40] = OBJECT
    pixels[17:23, 17:23] = TRIGGER
    return Image.fromarray(pixels)


def _cell(image: Image.Image, token: int) -> np.ndarray:
    x0, y0, x1, y1 = dict(LAYOUT.grids[0].cells())[token]
    return np.asarray(image)[y0:y1, x0:x1].reshape(-1, 3).astype(int)


def test_the_border_fill_paints_the_cell_in_the_background_colour():
    painted = paint_token_cells(_scene(), LAYOUT, [14])
    assert (_cell(painted, 14) == BACKGROUND).all()  # the trigger is gone, and the object's part with it


def test_inpainting_replaces_a_trigger_inside_an_object_by_the_objects_colour_and_touches_nothing_else():
    scene = _scene()
    painted = paint_token_cells(scene, LAYOUT, [14], MaskingFill.INPAINT)
    cell = _cell(painted, 14)
    assert np.abs(cell - OBJECT).max() <= 2, cell  # no trigger pixel and no background left in the cell
    outside = np.ones((48, 48), dtype=bool)
    outside[16:24, 16:24] = False
    assert np.array_equal(np.asarray(painted)[outside], np.asarray(scene)[outside])


def test_inpainting_a_cell_on_the_objects_edge_draws_in_both_sides():
    # Token 7 (row 1, column 1): the object's top-left corner cell, whose outer neighbours are background.
    cell = _cell(paint_token_cells(_scene(), LAYOUT, [7], MaskingFill.INPAINT), 7)
    closest = [min((BACKGROUND, OBJECT), key=lambda colour: np.abs(pixel - colour).sum()) for pixel in cell]
    assert closest.count(BACKGROUND) and closest.count(OBJECT)


@pytest.mark.parametrize("fill", list(MaskingFill))
def test_no_token_or_every_token(fill):
    scene = _scene()
    assert np.array_equal(np.asarray(paint_token_cells(scene, LAYOUT, [], fill)), np.asarray(scene))
    # Every cell painted: nothing is left to draw from, so the border colour it is, whatever the fill.
    everything = paint_token_cells(scene, LAYOUT, list(range(36)), fill)
    assert (np.asarray(everything).reshape(-1, 3) == BACKGROUND).all()
