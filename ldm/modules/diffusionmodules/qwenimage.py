"""Qwen-Image's VAE (Wan-2.1's) on one image, as a 2-D network: encoder, and the asymmetric decoder family.

Qwen-Image's VAE (diffusers' ``AutoencoderKLQwenImage``, ComfyUI's ``comfy.ldm.wan.vae.WanVAE``) is a causal 3-D
VAE. For one image (T = 1) it is a 2-D network:

* causal padding puts two zero frames before the first one, so a 3x3x3 causal conv at T = 1 equals a 2-D 3x3
  conv with the kernel's last temporal slice ``w[:, :, -1]`` (a 1x1x1 conv: ``w[:, :, 0]``);
* the RMS norm (``F.normalize`` over channels, times ``sqrt(C) * gamma``) and the mid-block attention work per
  frame;
* the temporal up / downsamplers' ``time_conv`` does not run on the first frame (the diffusers and Wan code skip it
  there), so an image never reads it.

Module and key names are Wan-2.1's (the layout of Qwen-Image's single file ``qwen_image_vae.safetensors``):
``conv1``, ``downsamples.N`` / ``upsamples.N`` (one flat list of ResidualBlocks and Resamples),
``residual.{0,2,3,6}`` (norm, conv, norm, conv), ``shortcut``, ``middle.{0,1,2}``, ``head.{0,2}``; 2-D tensors
here (:mod:`ldm.checkpoints.qwenimage` converts from and to the 3-D files and diffusers' names).

Unlike SD's decoder, each upsampler halves the width (``dim -> dim // 2``), so the next level reads half of the
width the previous one wrote; the condition branch's widths follow (:func:`qwenimage_condition_widths`). The
branch and its blending are the paper's, shared with SD's decoder (:mod:`ldm.modules.diffusionmodules.condition`).

===========  ====  ==============  ==========
variant      ch    num_res_blocks  condition
===========  ====  ==============  ==========
vanilla      96    2               False
base         96    2               True
large 1.5x   144   3               True
large 2x     192   5               True
===========  ====  ==============  ==========
(the paper's ratios on Qwen-Image's base width 96: 1.5x and 2x the width, 3 and 5 blocks per level)
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ...modules.diffusionmodules.condition import (
    MASK_RESIZE_MODES,
    ConditionEncoder,
    keep_known,
    resize_mask,
)

# Qwen-Image's VAE: AutoencoderKLQwenImage's defaults (diffusers 0.42.1)
QWENIMAGE_TEMPORAL_DOWNSAMPLE = (False, True, True)


def qwenimage_condition_widths(ch: int, ch_mult: Sequence[int]) -> List[int]:
    """Branch widths that match the decoder's feature widths at each blend point: ``ch * ch_mult[0]`` at full
    resolution before the head, then the input width of each level from the highest resolution: half the width of
    the level below (its upsampler halves it), and ``ch * ch_mult[-1]`` at the lowest.

    >>> qwenimage_condition_widths(96, (1, 2, 4, 4))
    [96, 96, 192, 192, 384]
    """
    n = len(ch_mult)
    return [ch * ch_mult[0]] + [ch * ch_mult[i + 1] // 2 for i in range(n - 1)] + [ch * ch_mult[-1]]


class RMSNorm(nn.Module):
    """Qwen-Image's RMS norm over channels: ``F.normalize(x, dim=1) * sqrt(C) * gamma`` (in float32 for half
    inputs, as diffusers does). ``gamma``: (C, 1, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        return F.normalize(x.float() if half else x, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """``shortcut(x) + conv(silu(norm(conv(silu(norm(x))))))``; Wan's ``residual`` Sequential (keys
    ``residual.{0,2,3,6}``)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), nn.Conv2d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_dim, out_dim, 3, padding=1))
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of one frame, RMS-normed; ``to_qkv`` and ``proj`` 1x1 convs."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, 1, c * 3, h * w).transpose(-1, -2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return x + self.proj(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    """x2 nearest-exact (in float32, as diffusers), then a 3x3 conv that halves the width (key ``resample.1``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample[1](self.resample[0](x.float()).to(x.dtype))


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1), then a 3x3 stride-2 conv (key ``resample.1``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), nn.Conv2d(dim, out, 3, padding=1))


def _check_common(attn_resolutions: Sequence[int], temporal_downsample: Sequence[bool], ch_mult: Sequence[int]):
    if list(attn_resolutions):
        raise ValueError(f"attn_resolutions {list(attn_resolutions)}: Qwen-Image's VAE has attention only in the "
                         "middle block (attn_scales [])")
    if len(temporal_downsample) != len(ch_mult) - 1:
        raise ValueError(f"temporal_downsample needs one entry per downsampling ({len(ch_mult) - 1}), got "
                         f"{list(temporal_downsample)}")


class QwenImageEncoder(nn.Module):
    """Qwen-Image's encoder at T = 1: image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f).

    ``ddconfig`` keys as SD's (``ch`` = Qwen-Image's ``base_dim``, ``ch_mult`` = ``dim_mult``); ``out_ch`` and
    ``resolution`` are accepted for the shared ``ddconfig`` and unused. ``temporal_downsample`` (Qwen-Image's
    ``temperal_downsample``) says which downsamplers have a ``time_conv`` in the 3-D files (not run for an
    image; the export writes it)."""

    def __init__(self, *, ch: int = 96, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 z_channels: int = 16, double_z: bool = True, in_channels: int = 3, out_ch: int = 3,
                 dropout: float = 0.0, attn_resolutions: Sequence[int] = (), resolution: Optional[int] = None,
                 temporal_downsample: Sequence[bool] = QWENIMAGE_TEMPORAL_DOWNSAMPLE):
        super().__init__()
        _check_common(attn_resolutions, temporal_downsample, ch_mult)
        self.temporal_downsample = [bool(t) for t in temporal_downsample]
        dims = [ch * m for m in [1, *ch_mult]]
        self.conv1 = nn.Conv2d(in_channels, dims[0], 3, padding=1)
        layers: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(ch_mult) - 1:
                layers.append(Downsample(out_dim))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1], dropout)
        self.head = _head(dims[-1], 2 * z_channels if double_z else z_channels)

    @property
    def conv_in(self) -> nn.Conv2d:
        return self.conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class QwenImageDecoder(nn.Module):
    """Qwen-Image's decoder at T = 1, optionally wider / deeper and with the paper's condition branch.

    ``forward(z, image=None, mask=None)`` as :class:`ldm.modules.diffusionmodules.model.Decoder`'s: ``z`` (B,
    z_channels, h, w) is the output of ``post_quant_conv``; ``image`` (B, 3, 8h, 8w) in [-1, 1], ``mask`` (B, 1,
    8h, 8w), 1 = generate. The condition features replace the decoder's where the mask keeps, at the input of every
    level and before the head (:func:`qwenimage_condition_widths`); the branch is the one of SD's decoder
    (``condition_widths``, ``concat_mask``, ``gate_conv``, ``mask_resize``). The output is not clamped (diffusers'
    ``decode`` clamps to [-1, 1]; every pipeline's postprocessing clamps the same).
    ``temporal_downsample``: the encoder's (reversed here), for the export's ``time_conv`` keys.
    ``gradient_checkpointing``: as SD's decoder, per block.
    """

    def __init__(self, *, ch: int = 96, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, z_channels: int = 16, in_channels: int = 3, dropout: float = 0.0,
                 attn_resolutions: Sequence[int] = (), resolution: Optional[int] = None,
                 temporal_downsample: Sequence[bool] = QWENIMAGE_TEMPORAL_DOWNSAMPLE, condition: bool = False,
                 condition_widths: Optional[Sequence[int]] = None, concat_mask: bool = False,
                 gate_conv: bool = False, mask_resize: str = "nearest", gradient_checkpointing: bool = False):
        super().__init__()
        _check_common(attn_resolutions, temporal_downsample, ch_mult)
        if mask_resize not in MASK_RESIZE_MODES:
            raise ValueError(f"mask_resize must be one of {MASK_RESIZE_MODES}, got {mask_resize!r}")
        self.mask_resize = mask_resize
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.temporal_upsample = [bool(t) for t in temporal_downsample][::-1]
        self.num_resolutions = n = len(ch_mult)
        dims = [ch * m for m in [ch_mult[-1], *ch_mult[::-1]]]
        self.conv1 = nn.Conv2d(z_channels, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        layers: List[nn.Module] = []
        # position in ``upsamples`` of each level's first block -> our level index (0 = full resolution)
        self.level_starts = {}
        for j, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim // 2 if j > 0 else in_dim  # the upsampler before halved it
            self.level_starts[len(layers)] = n - 1 - j
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if j != n - 1:
                layers.append(Upsample(out_dim))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], out_ch)
        # ``encoder``, as in SD's decoder: the condition branch's checkpoint keys are decoder.encoder.layers.N
        self.encoder: Optional[ConditionEncoder] = None
        if condition:
            widths = (list(condition_widths) if condition_widths is not None
                      else qwenimage_condition_widths(ch, ch_mult))
            self.encoder = ConditionEncoder(out_ch, widths, concat_mask=concat_mask, gate_conv=gate_conv)

    @property
    def has_condition(self) -> bool:
        return self.encoder is not None

    @property
    def conv_in(self) -> nn.Conv2d:
        return self.conv1

    @property
    def conv_out(self) -> nn.Conv2d:
        return self.head[2]

    def forward(self, z: torch.Tensor, image: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        feats = None
        if self.encoder is not None and image is not None and mask is not None:
            feats = self.encoder((1 - mask) * image, mask)  # feats[0]: before the head; feats[i + 1]: level i
        run = self._checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else _call
        h = run(self.middle, self.conv1(z))
        for index, layer in enumerate(self.upsamples):
            level = self.level_starts.get(index)
            if feats is not None and level is not None:
                h = keep_known(h, feats[level + 1], resize_mask(mask, h.shape[-2:], self.mask_resize))
            h = run(layer, h)
        if feats is not None:
            h = keep_known(h, feats[0], mask)
        return self.head(h)

    @staticmethod
    def _checkpointed(block: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)


def _call(block: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    return block(h)
