"""Tiled decoding: decode a large latent in overlapping tiles so peak activation memory depends on the tile size,
not on the image size.

Tiles are ``tile`` latent pixels square and start every ``tile - overlap`` latent pixels (the last row/column is
moved back so it ends at the border, which only widens its overlap). Each tile is decoded on its own, with the
matching crop of ``image`` and ``mask`` for the condition branch, and the decoded tiles are blended by weights that
rise linearly across the middle half of each overlap and are normalised by their sum, so there is no visible seam.
The outer quarter of each overlap is discarded: a local filter of radius below ``overlap * scale / 4`` pixels
would be reproduced exactly (tested).

Limitation (shared with diffusers' ``enable_tiling``): the decoder's GroupNorm layers take their statistics over
the tile, not over the whole image, and convolutions near a tile border see zero padding instead of the neighbour,
so a tiled decode differs slightly from an untiled one. The ramps hide the borders; the per-tile statistics remain.
``tests/models/test_tiling.py`` bounds the difference. A latent no larger than one tile is decoded in one piece
(identical
to the untiled result).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

DecodeFn = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of the tiles along one axis of ``size`` latent pixels (all tiles ``min(tile, size)`` long).

    >>> tile_starts(10, 4, 1)
    [0, 3, 6]
    """
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # the last tile ends at the border
    return starts


def blend_ramp(length: int, overlap: int, at_start: bool, at_end: bool, device=None) -> torch.Tensor:
    """(length,) blend weights of one tile along one axis; ``overlap`` pixels are shared with each neighbour.

    On a side that has a neighbour, the outer quarter of the overlap gets weight 0 (those pixels saw the tile's zero
    padding), the middle half rises linearly, the inner quarter is 1. The neighbour's weights mirror these, so the
    two sum to 1 across the ramp and every pixel keeps a positive total weight. A side at the image border keeps
    weight 1 up to the edge.
    """
    w = torch.ones(length, dtype=torch.float32, device=device)
    overlap = min(overlap, length)
    margin = overlap // 4
    ramp = overlap - 2 * margin
    rise = torch.cat([torch.zeros(margin, device=device),
                      (torch.arange(ramp, dtype=torch.float32, device=device) + 0.5) / max(ramp, 1)])
    if not at_start:
        w[:len(rise)] = torch.minimum(w[:len(rise)], rise)
    if not at_end:
        w[length - len(rise):] = torch.minimum(w[length - len(rise):], rise.flip(0))
    return w


def tiled_decode(decode: DecodeFn, z: torch.Tensor, image: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, *, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """Decode ``z`` (B,C,h,w) tile by tile with ``decode(z_tile, image_tile, mask_tile) -> (B,3,scale*th,scale*tw)``.

    Args:
        tile, overlap: tile side and overlap in latent pixels (``0 <= overlap < tile``).
        scale: image pixels per latent pixel (8 for SD).
        image, mask: (B,3,scale*h,scale*w) / (B,1,scale*h,scale*w) or both None; cropped to each tile's pixels.
            Tile offsets are multiples of ``scale``, so the nearest-downsampled mask inside a tile equals the crop
            of the whole image's downsampled mask.

    Returns (B,3,scale*h,scale*w) in the dtype of the decoded tiles. Accumulation is float32.
    """
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return decode(z, image, mask)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    # The tiles form a grid and each tile's weight is a product wy(row) * wx(column), so the sum of all weights at
    # a pixel is (sum of the wy) * (sum of the wx): normalising each axis once replaces a full-resolution weight
    # buffer, its per-tile accumulation and the final division.
    wys = _normalised_ramps(ys, th, h, overlap, scale, z.device)
    wxs = _normalised_ramps(xs, tw, w, overlap, scale, z.device)
    out: Optional[torch.Tensor] = None
    for y, wy in zip(ys, wys):
        for x, wx in zip(xs, wxs):
            py, px = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            z_tile = z[:, :, y:y + th, x:x + tw]
            image_tile = image[:, :, py, px] if image is not None else None
            mask_tile = mask[:, :, py, px] if mask is not None else None
            dec = decode(z_tile, image_tile, mask_tile)
            if out is None:
                out_dtype = dec.dtype
                out = torch.zeros(dec.shape[0], dec.shape[1], h * scale, w * scale, dtype=torch.float32,
                                  device=dec.device)
            out[:, :, py, px].addcmul_(dec, wy[:, None] * wx[None, :])  # one pass, no float copy of the tile
            del dec  # free the tile's activations before the next one
    return out.to(out_dtype)


def _normalised_ramps(starts: List[int], length: int, size: int, overlap: int, scale: int,
                      device) -> List[torch.Tensor]:
    """The blend ramps of the tiles at ``starts`` along one axis (image pixels), divided by their sum, so that the
    weights of the tiles covering any pixel add up to 1."""
    ramps = [blend_ramp(length * scale, overlap * scale, s == 0, s + length == size, device=device) for s in starts]
    total = torch.zeros(size * scale, dtype=torch.float32, device=device)
    for s, r in zip(starts, ramps):
        total[s * scale:(s + length) * scale] += r
    return [r / total[s * scale:(s + length) * scale] for s, r in zip(starts, ramps)]
