"""The mask's edge: the bands of pixels on either side of it, read by the boundary metrics
(:mod:`ldm.metrics`) and the boundary-weighted reconstruction loss (:mod:`ldm.modules.losses.contperceptual`).

Masks are (B,1,H,W), 1 = generate, 0 = keep, binarised at 0.5.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

DEFAULT_BAND_PX = 8


def _within(pixels: torch.Tensor, band_px: int) -> torch.Tensor:
    """(B,1,H,W) 1 wherever a pixel of ``pixels`` lies within ``band_px`` (chessboard distance), itself included:
    a (2K+1)x(2K+1) max filter (a dilation); outside the image counts as no pixel."""
    return F.max_pool2d(pixels, kernel_size=2 * band_px + 1, stride=1, padding=band_px)


def band_masks(mask: torch.Tensor, band_px: int = DEFAULT_BAND_PX) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inner, outer), each (B,1,H,W) in {0,1}: generated pixels (mask 1) within ``band_px`` pixels (chessboard
    distance, max(|dy|, |dx|) <= band_px) of a kept pixel, and kept pixels within ``band_px`` of a generated one."""
    if int(band_px) != band_px or band_px < 1:
        raise ValueError(f"band_px must be a whole number >= 1, got {band_px!r}")
    m = (mask >= 0.5).float()
    return m * _within(1 - m, int(band_px)), (1 - m) * _within(m, int(band_px))
