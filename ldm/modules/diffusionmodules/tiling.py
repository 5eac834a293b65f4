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
``tests/test_tiling.py`` bounds the difference. A latent no larger than one tile is decoded in one piece (identical
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
    out: Optional[torch.Tensor] = None
    weight = torch.zeros(1, 1, h * scale, w * scale, dtype=torch.float32, device=z.device)
    for y in ys:
        wy = blend_ramp(th * scale, overlap * scale, y == 0, y + th == h, device=z.device)
        for x in xs:
            wx = blend_ramp(tw * scale, overlap * scale, x == 0, x + tw == w, device=z.device)
            py, px = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            z_tile = z[:, :, y:y + th, x:x + tw]
            image_tile = image[:, :, py, px] if image is not None else None
            mask_tile = mask[:, :, py, px] if mask is not None else None
            dec = decode(z_tile, image_tile, mask_tile)
            if out is None:
                out_dtype = dec.dtype
                out = torch.zeros(dec.shape[0], dec.shape[1], h * scale, w * scale, dtype=torch.float32,
                                  device=dec.device)
            wt = wy[:, None] * wx[None, :]
            out[:, :, py, px] += dec.float() * wt
            weight[:, :, py, px] += wt
            del dec  # free the tile's activations before the next one
    out /= weight
    return out.to(out_dtype)
