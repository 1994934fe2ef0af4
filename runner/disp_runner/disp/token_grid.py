"""Token-grid maths of the method: which visual tokens a pixel box touches (trigger localisation,
the masking report) and the square windows of neighbouring tokens that saliency's region
refinement scores."""

from __future__ import annotations

import torch

from disp_runner.models.base import TokenGrid

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive


def tokens_covered(grid: TokenGrid, box: Box) -> list[int]:
    """Indices (row-major) of the visual tokens whose cell overlaps `box`."""
    x0, y0, x1, y1 = box
    return [t for t in range(grid.num_tokens)
            if (cell := grid.box(t))[0] < x1 and cell[2] > x0 and cell[1] < y1 and cell[3] > y0]


def grid_windows(grid: TokenGrid, size: int) -> torch.Tensor:
    """Token indices (row-major) of every size x size window of the grid, stride 1: [W, size²].
    A window larger than the grid is clipped to it."""
    rows, cols = grid.rows, grid.cols
    h, w = min(size, rows), min(size, cols)
    return torch.tensor([[(r + i) * cols + c + j for i in range(h) for j in range(w)]
                         for r in range(rows - h + 1) for c in range(cols - w + 1)], dtype=torch.long)
