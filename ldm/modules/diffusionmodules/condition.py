"""The paper's condition branch: a small conv encoder over the masked image whose per-level features replace the
decoder's features wherever the mask says "keep" (mask 0).

Features are held in a list indexed by level, never in a dict keyed by tensor shape as the original code does:
``feats[0]`` is at full resolution and feeds the blend before ``norm_out``; ``feats[i + 1]`` is at 1/2**i of the
image size and feeds the input of decoder up level ``i``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

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


MASK_RESIZE_MODES = ("nearest", "area")
# How the last level meets the condition branch (Decoder ``last_blend``): the paper's hard blend of features before
# ``norm_out``; none; or two heads blended in image space through a mask feathered into the kept region.
LAST_BLEND_MODES = ("hard", "none", "feather")


class ConditionEncoder(nn.Module):
    """Masked image (B, in_channels, H, W) -> ``len(widths)`` feature maps.

    Two 3x3 stride-1 convs at full resolution, then one 4x4 stride-2 conv per lower level; ReLU between layers,
    features returned *before* the ReLU, no normalisation (as in the released checkpoints, keys ``layers.N``).

    ASUKA's options (both off in the paper's decoder):
        concat_mask: the first conv also reads the mask, ``cat([masked_image, mask])`` (in_channels + 1 inputs).
        gate_conv: every conv gives twice its width, split into ``x, gate``; the layer's output is
            ``x * clamp(1 - tanh(gate), 0, 1)``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], concat_mask: bool = False, gate_conv: bool = False):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"condition branch needs at least 2 widths, got {list(widths)}")
        self.widths = list(widths)
        self.concat_mask = bool(concat_mask)
        self.gate_conv = bool(gate_conv)
        layers, c_in = [], in_channels + int(self.concat_mask)
        for i, c_out in enumerate(self.widths):
            conv_out = 2 * c_out if self.gate_conv else c_out
            if i < 2:
                layers.append(nn.Conv2d(c_in, conv_out, kernel_size=3, stride=1, padding=1))
            else:
                layers.append(nn.Conv2d(c_in, conv_out, kernel_size=4, stride=2, padding=1))
            c_in = c_out
        self.layers = nn.Sequential(*layers)

    def forward(self, masked_image: torch.Tensor, mask: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """``mask`` (B, 1, H, W) is read only with ``concat_mask``."""
        x = masked_image
        if self.concat_mask:
            if mask is None:
                raise ValueError("this condition branch (concat_mask) needs the mask")
            # the concatenation of channels-last inputs comes out NCHW: keep the caller's layout for every level
            x = torch.cat([masked_image, mask], dim=1).contiguous(memory_format=memory_format_of(masked_image))
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.gate_conv:
                x, gate = x.chunk(2, dim=1)
                x = x * torch.clamp(1 - torch.tanh(gate), 0, 1)
            feats.append(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return feats


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-d tensor stored channels-last (and not also plain contiguous), else
    ``torch.contiguous_format``."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def resize_mask(mask: torch.Tensor, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """The mask (B, 1, H, W) at a decoder level's size.

    ``nearest``: the paper's choice, legacy 'nearest' ('nearest-exact' would pick other pixels); a mask already at
    ``size`` is returned as is. ``area``: ASUKA's choice, the area average, then every value > 0 set to 1, so a
    latent pixel that touches the generated region is generated (applied at every size, full resolution included).
    """
    size = tuple(size)
    if mode == "nearest":
        return mask if tuple(mask.shape[-2:]) == size else F.interpolate(mask, size=size, mode="nearest")
    if mode == "area":
        return (F.interpolate(mask, size=size, mode="area") > 0).to(mask.dtype)
    raise ValueError(f"mask_resize must be one of {MASK_RESIZE_MODES}, got {mode!r}")


def keep_known(h: torch.Tensor, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-guided blend ``h * m + feat * (1 - m)`` (computed as ``lerp(feat, h, m)``) with ``mask`` already at
    ``h``'s size (see :func:`resize_mask`)."""
    if feat.shape[-2:] != h.shape[-2:] or feat.shape[1] != h.shape[1]:
        raise ValueError(f"condition feature {tuple(feat.shape)} does not fit decoder feature {tuple(h.shape)}: "
                         "condition_widths do not match the decoder widths")
    # One pass instead of the original's four (h * m + feat * (1 - m)); torch.lerp is exact at both ends, so with a
    # binary mask the result is bit-identical: h where m == 1, feat where m == 0.
    # (in h's memory format whatever the others': the decoder's layers after the blend keep theirs)
    return torch.lerp(feat.to(h.dtype), h, mask.to(h.dtype)).contiguous(memory_format=memory_format_of(h))


def feather_mask(mask: torch.Tensor, px: int) -> torch.Tensor:
    """The blend weight of the decoder's own output for ``last_blend: feather``: the mask (1 = generate) spread
    ``px`` pixels into the kept region as a linear ramp. A kept pixel at chessboard distance ``d`` from the
    generated region gets ``max(0, (px - d + 1) / px)``: 1 next to the hole, 0 from ``px + 1`` pixels on; the
    generated region stays 1 (a soft mask: the mean of its dilations by 0..``px`` - 1 pixels, then its max with the
    mask).

    >>> m = torch.zeros(1, 1, 1, 6); m[..., 0] = 1
    >>> feather_mask(m, 2)[0, 0, 0].tolist()
    [1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    """
    if px < 1:
        raise ValueError(f"feather_px must be >= 1, got {px}")
    grown, total = mask, torch.zeros_like(mask)
    for _ in range(px):
        grown = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1)
        total = total + grown
    return torch.maximum(mask, total / px)
