"""The paper's condition branch: a small conv encoder over the masked image whose per-level features replace the
decoder's features wherever the mask says "keep" (mask 0).

Features are held in a list indexed by level, never in a dict keyed by tensor shape as the original code does:
``feats[0]`` is at full resolution and feeds the blend before ``norm_out``; ``feats[i + 1]`` is at 1/2**i of the
image size and feeds the input of decoder up level ``i``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def default_condition_widths(ch: int, ch_mult: Sequence[int]) -> List[int]:
    """Branch widths that match the decoder's feature widths at each blend point (and the released checkpoints).

    >>> default_condition_widths(128, (1, 2, 4, 4))
    [128, 256, 512, 512, 512]
    """
    n = len(ch_mult)
    return [ch * ch_mult[0]] + [ch * ch_mult[min(i + 1, n - 1)] for i in range(n)]


class ConditionEncoder(nn.Module):
    """Masked image (B, in_channels, H, W) -> ``len(widths)`` feature maps.

    Two 3x3 stride-1 convs at full resolution, then one 4x4 stride-2 conv per lower level; ReLU between layers,
    features returned *before* the ReLU, no normalisation (as in the released checkpoints, keys ``layers.N``).
    """

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"condition branch needs at least 2 widths, got {list(widths)}")
        self.widths = list(widths)
        layers, c_in = [], in_channels
        for i, c_out in enumerate(self.widths):
            if i < 2:
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1))
            else:
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            c_in = c_out
        self.layers = nn.Sequential(*layers)

    def forward(self, masked_image: torch.Tensor) -> List[torch.Tensor]:
        feats, x = [], masked_image
        for i, layer in enumerate(self.layers):
            x = layer(x)
            feats.append(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return feats


def keep_known(h: torch.Tensor, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-guided blend ``h * m + feat * (1 - m)`` (computed as ``lerp(feat, h, m)``), with the mask brought to
    ``h``'s size by legacy 'nearest' (the original's choice; 'nearest-exact' would pick other pixels)."""
    if feat.shape[-2:] != h.shape[-2:] or feat.shape[1] != h.shape[1]:
        raise ValueError(f"condition feature {tuple(feat.shape)} does not fit decoder feature {tuple(h.shape)}: "
                         "condition_widths do not match the decoder widths")
    m = mask if mask.shape[-2:] == h.shape[-2:] else F.interpolate(mask, size=h.shape[-2:], mode="nearest")
    # One pass instead of the original's four (h * m + feat * (1 - m)); torch.lerp is exact at both ends, so with a
    # binary mask the result is bit-identical: h where m == 1, feat where m == 0.
    return torch.lerp(feat.to(h.dtype), h, m.to(h.dtype))
