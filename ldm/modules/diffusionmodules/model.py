"""The KL-f8 autoencoder's convolutional parts: SD's Encoder and the one asymmetric Decoder.

Attribute names (``conv_in``, ``mid.block_1``, ``up[i].block[j]``, ``nin_shortcut``, ...) are the checkpoint
format of Stable Diffusion and of the paper's released decoders: change how a block computes, never where it sits.

Every decoder variant of the paper is this one ``Decoder`` class with different numbers:

===========  ====  ==============  ==========
variant      ch    num_res_blocks  condition
===========  ====  ==============  ==========
SD / woc     128   2               False
base         128   2               True
large 1.5x   192   3               True
large 2x     256   5               True
===========  ====  ==============  ==========
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ...modules.diffusionmodules.condition import (
    LAST_BLEND_MODES,
    MASK_RESIZE_MODES,
    ConditionEncoder,
    default_condition_widths,
    feather_mask,
    keep_known,
    memory_format_of,
    resize_mask,
)

# SD's ``ddconfig`` is shared by the Encoder and the Decoder; these of its keys shape the encoder alone.
ENCODER_ONLY_KEYS = ("double_z",)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))``. Without autograd the SiLU runs in place on the fresh GroupNorm output: one full-size
    buffer fewer per call (CPU eager pays for each large allocation in page faults). Compiled, the two fuse."""
    h = norm(x)
    return F.silu(h, inplace=not (torch.is_grad_enabled() and h.requires_grad))


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv (``with_conv``)."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Asymmetric pad (0, 1, 0, 1) then a 3x3 stride-2 conv, as SD's encoder does (no padding inside the conv)."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int = 0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention. The q/k/v/proj_out 1x1 convs are kept (checkpoint format) and applied as
    matrix products over the pixels; the attention runs through ``scaled_dot_product_attention``."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C), one head over all pixels
        # F.linear writes q/k/v contiguous. SDPA's fused kernels need a unit stride along the channels: given the
        # strided view of a (B, C, HW) tensor, CPU SDPA falls back to the math kernel, which materialises the
        # HW x HW attention matrix (+2.3 GiB at 1024 px for the one call).
        q, k, v = (F.linear(tokens, conv.weight.view(c, c), conv.bias)[:, None] for conv in (self.q, self.k, self.v))
        h = F.linear(F.scaled_dot_product_attention(q, k, v)[:, 0], self.proj_out.weight.view(c, c),
                     self.proj_out.bias)
        # (B, HW, C) -> (B, C, H, W) in x's memory format, so the blocks after this one keep theirs
        return x + h.transpose(1, 2).reshape(b, c, hh, ww).contiguous(memory_format=memory_format_of(x))


def cpu_layout(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Without autograd on the CPU, 4-d activations run channels-last: oneDNN's convolutions then skip the layout
    reorders they make around every NCHW call (base decoder with condition, 512 px, 2 threads: 0.92x the time).
    Results stay within float32 rounding of NCHW (another summation order). With autograd the layout is left as
    given: on NCHW weights the channels-last backward was slower (large2 training step at 256 px: 1.16x the time);
    ``main.py --fast`` trains with channels-last weights and batches instead. Other devices: unchanged."""
    if x is None or x.device.type != "cpu" or x.dim() != 4 or torch.is_grad_enabled():
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _attn_or_identity(in_channels: int, attn_type: str) -> nn.Module:
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type must be 'vanilla' or 'none', got {attn_type!r}")


class Encoder(nn.Module):
    """SD's KL-f8 encoder: image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 attn_type: str = "vanilla"):
        super().__init__()
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(_attn_or_identity(block_in, attn_type))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = _attn_or_identity(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1,
                                  padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(cpu_layout(x))
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(norm_silu(self.norm_out, h)).contiguous(memory_format=memory_format_of(x))


class Decoder(nn.Module):
    """SD's decoder, optionally wider/deeper and with the paper's condition branch.

    ``forward(z, image=None, mask=None)``: ``z`` (B, z_channels, h, w) is the output of ``post_quant_conv``;
    ``image`` (B, 3, 8h, 8w) in [-1, 1] and ``mask`` (B, 1, 8h, 8w) with 1 = generate, 0 = keep. With no image/mask
    (or without the condition branch) this is a plain decoder; an all-ones mask gives the same result.
    Inputs are validated by ``AutoencoderKL.decode``; this module assumes they fit.

    ``condition_widths`` (len(ch_mult) + 1 ints) sets the branch widths; by default they follow ``ch``/``ch_mult``
    exactly as in the paper's released checkpoints.

    ASUKA's variant of the branch (its released FLUX.1 decoder: ``concat_mask: true, mask_resize: area``):
    ``concat_mask`` and ``gate_conv`` are :class:`ConditionEncoder` options; ``mask_resize`` ("nearest", the
    paper's, or "area") is how the mask reaches each level's blend (:func:`resize_mask`). The last blend, at full
    resolution before ``norm_out``, uses the mask as given in both.

    ``last_blend`` (not in the paper; docs/decoders.md, "The last blend"): how the full-resolution level meets the
    branch. ``hard`` (default, the paper's and every released decoder's): ``keep_known(h, feats[0], mask)`` before
    ``norm_out``. ``none``: no blend there; the kept region reaches the output through the lower levels' blends
    (``feats[1]`` enters ``up[0]`` at full resolution). ``feather``: the decoder's own output ``head(h)`` and the
    branch's ``head(feats[0])`` (the same ``norm_out``/``conv_out``, each normalised over its own features) blended
    in image space by :func:`feather_mask` (``feather_px`` pixels into the kept region): the edge pair is the
    decoder's alone, and a kept pixel farther than ``feather_px`` from the hole is the branch's alone. Neither adds
    weights: a decoder trained with one layout loads into the others.

    ``gradient_checkpointing`` (off by default; ``decoder_overrides: {gradient_checkpointing: true}``): in training,
    each ResnetBlock, AttnBlock and Upsample keeps only its input and recomputes its activations in the backward pass
    (``torch.utils.checkpoint``, non-reentrant), so the decoder holds one tensor per block instead of all its
    intermediate activations, for one extra forward of the blocks. Outputs and gradients are those without it (the same
    operations, run again). It acts only when autograd records; inference is unchanged.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, attn_type: str = "vanilla", condition: bool = False,
                 condition_widths: Optional[Sequence[int]] = None, concat_mask: bool = False,
                 gate_conv: bool = False, mask_resize: str = "nearest", gradient_checkpointing: bool = False,
                 last_blend: str = "hard", feather_px: int = 4):
        super().__init__()
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        if mask_resize not in MASK_RESIZE_MODES:
            raise ValueError(f"mask_resize must be one of {MASK_RESIZE_MODES}, got {mask_resize!r}")
        self.mask_resize = mask_resize
        if last_blend not in LAST_BLEND_MODES:
            raise ValueError(f"last_blend must be one of {LAST_BLEND_MODES}, got {last_blend!r}")
        if last_blend == "feather" and int(feather_px) < 1:
            raise ValueError(f"feather_px must be >= 1, got {feather_px}")
        self.last_blend = last_blend
        self.feather_px = int(feather_px)

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = _attn_or_identity(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(_attn_or_identity(block_in, attn_type))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)  # up[0] is the full-resolution level, as in the checkpoints

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

        # The attribute must be called `encoder`: released checkpoints store the branch as decoder.encoder.layers.N
        self.encoder: Optional[ConditionEncoder] = None
        if condition:
            widths = list(condition_widths) if condition_widths is not None else default_condition_widths(ch, ch_mult)
            self.encoder = ConditionEncoder(out_ch, widths, concat_mask=concat_mask, gate_conv=gate_conv)

    @property
    def has_condition(self) -> bool:
        return self.encoder is not None

    def forward(self, z: torch.Tensor, image: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, z_channels, h, w) latents -> (B, out_ch, 8h, 8w), in ``z``'s memory format."""
        out_format = memory_format_of(z)
        z, image, mask = cpu_layout(z), cpu_layout(image), cpu_layout(mask)
        feats = None
        if self.encoder is not None and image is not None and mask is not None:
            # feats[0]: full res for the last blend; feats[i + 1]: up[i]
            feats = self.encoder((1 - mask) * image, mask)

        run = self._checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else _call
        h = self.conv_in(z)
        h = run(self.mid.block_2, run(self.mid.attn_1, run(self.mid.block_1, h)))
        for i_level in reversed(range(self.num_resolutions)):
            if feats is not None:
                h = keep_known(h, feats[i_level + 1], resize_mask(mask, h.shape[-2:], self.mask_resize))
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = run(block, h)
                if len(up.attn) > 0:
                    h = run(up.attn[i_block], h)
            if i_level != 0:
                h = run(up.upsample, h)
        if feats is not None and self.last_blend == "hard":
            h = keep_known(h, feats[0], mask)

        if self.give_pre_end:
            return h
        out = self.head(h)
        if feats is not None and self.last_blend == "feather":
            out = torch.lerp(self.head(feats[0]), out, feather_mask(mask, self.feather_px).to(out.dtype))
        return out.contiguous(memory_format=out_format)

    @staticmethod
    def _checkpointed(block: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        if isinstance(block, nn.Identity):
            return h
        return torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Full-resolution features -> image: GroupNorm, SiLU, conv_out (and tanh with ``tanh_out``). A method of
        its own so that ``ldm.fast.compile_blocks`` can compile it as one region."""
        h = self.conv_out(norm_silu(self.norm_out, h))
        return torch.tanh(h) if self.tanh_out else h


def _call(block: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    return block(h)
