"""Token-grid maths of the method: which visual tokens a pixel box touches (trigger localisation,
the masking report) and the square windows of neighbouring tokens that saliency's region
refinement scores. Both work on a family's `VisualLayout`, so an image may hold several grids
(a base view and a high-resolution map) and tokens that see no cell (row separators)."""

from __future__ import annotations

import torch

from disp_runner.models.base import VisualLayout

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive


def tokens_covered(layout: VisualLayout, box: Box) -> list[int]:
    """Indices of the visual tokens whose cell overlaps `box`, in increasing order."""
    x0, y0, x1, y1 = box
    return sorted(token for grid in layout.grids for token, cell in grid.cells()
                  if cell[0] < x1 and cell[2] > x0 and cell[1] < y1 and cell[3] > y0)


def seeing_tokens(layout: VisualLayout) -> int:
    """How many visual tokens see a cell of the image."""
    return sum(grid.rows * grid.cols for grid in layout.grids)


def window_masks(layout: VisualLayout, size: int) -> torch.Tensor:
    """Every size x size window of neighbouring cells of each grid, stride 1, as [W, num_tokens]
    bool (True = in the window). A window larger than its grid is clipped to it."""
    windows = []
    for grid in layout.grids:
        h, w = min(size, grid.rows), min(size, grid.cols)
        for r in range(grid.rows - h + 1):
            for c in range(grid.cols - w + 1):
                window = torch.zeros(layout.num_tokens, dtype=torch.bool)
                window[[grid.token(r + i, c + j) for i in range(h) for j in range(w)]] = True
                windows.append(window)
    return torch.stack(windows) if windows else torch.zeros(0, layout.num_tokens, dtype=torch.bool)
