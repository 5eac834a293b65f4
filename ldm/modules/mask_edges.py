"""The mask's edge, defined here once: the edge pixels themselves (:func:`edge_pixels`), the bands of pixels on
either side of it (:func:`band_masks`, :func:`edge_band`), read by the boundary metrics (:mod:`ldm.metrics`), the
figures of ``scripts/evaluate.py`` and the demo, and the boundary-weighted reconstruction loss
(:mod:`ldm.modules.losses.contperceptual`); and the same mask with jagged edges (:func:`coarsen_mask`, the
robustness rows of ``scripts/evaluate.py`` and the demo).

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


def edge_band(mask: torch.Tensor, band_px: int) -> torch.Tensor:
    """(B,1,H,W) 1 at the pixels within ``band_px`` pixels (chessboard distance) of a pixel of the other region,
    on both sides of the edge: the union of the two bands of :func:`band_masks`; 0 everywhere for a mask of one
    value."""
    inner, outer = band_masks(mask, band_px)
    return inner + outer


def edge_pixels(mask: torch.Tensor) -> torch.Tensor:
    """(...,H,W) bool, True on every pixel that has a 4-neighbour on the other side of the mask edge (both sides
    of it); ``mask`` (...,H,W) or (B,1,H,W), binarised at 0.5."""
    m = mask >= 0.5
    edge = torch.zeros_like(m)
    dx, dy = m[..., :, 1:] != m[..., :, :-1], m[..., 1:, :] != m[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge


def coarsen_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(...,1,H,W) binary mask as drawn on a grid ``factor`` times coarser: each ``factor`` x ``factor`` cell
    (counted from the top left; the last ones padded by repeating the edge) becomes 1 where at least half of it is
    generated, then nearest-upsampled back to H x W: the same mask with jagged, blocky edges."""
    if factor <= 1:
        return mask
    h, w = mask.shape[-2:]
    flat = mask.reshape(-1, 1, h, w).float()
    ph, pw = -h % factor, -w % factor
    padded = F.pad(flat, (0, pw, 0, ph), mode="replicate") if ph or pw else flat
    cells = (F.avg_pool2d(padded, factor) >= 0.5).float()
    up = cells.repeat_interleave(factor, -2).repeat_interleave(factor, -1)[..., :h, :w]
    return up.reshape(mask.shape).to(mask.dtype)
