"""The Stable Diffusion UNet (``UNetModel``), with the original constructor arguments and module tree.

The attribute tree is the checkpoint format: ``time_embed.{0,2}``, ``input_blocks.N.M``, ``middle_block.{0,1,2}``,
``output_blocks.N.M``, ``out.{0,2}`` (under ``model.diffusion_model.`` in an SD checkpoint). ``input_blocks.N`` /
``output_blocks.N`` are ``TimestepEmbedSequential`` lists of a ``ResBlock`` (``in_layers``, ``emb_layers``,
``out_layers``, ``skip_connection``), then a ``SpatialTransformer`` where attention is used, then a ``Downsample``
(``op``) or ``Upsample`` (``conv``) closing a level.

SD v1 (``configs/.../v1-inference.yaml``): model_channels 320, channel_mult [1, 2, 4, 4], num_res_blocks 2,
attention_resolutions [4, 2, 1], num_heads 8, transformer_depth 1, context_dim 768, use_spatial_transformer True,
legacy False; in_channels 4 (text-to-image) or 9 (inpainting: latent + mask + masked-image latent).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...modules.attention import SpatialTransformer
from ...modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose ``forward(x, emb)`` takes the timestep embedding (B, time_embed_dim) as second input."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``emb`` to timestep blocks and ``context`` to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 (inner two dims for 3D), then a 3x3 conv (``conv``) when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """3x3 stride-2 conv (``op``, padding 1) when ``use_conv``, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv, add the projected timestep embedding (or FiLM it with ``use_scale_shift_norm``),
    GroupNorm-SiLU-dropout-conv (zero-initialised), plus a skip (identity, 1x1 conv, or 3x3 with ``use_conv``).
    ``up``/``down`` resample inside the block (``resblock_updown``)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C, ...), emb (B, emb_channels) -> (B, out_channels, ...)."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # resample between the activation and the conv, on both the branch and the skip
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over positions (used only when ``use_spatial_transformer`` is False): GroupNorm, a 1x1 conv1d
    ``qkv``, multi-head attention, zero-initialised ``proj_out``, residual.

    The ``qkv`` channel layout is (heads, 3, ch) with ``legacy`` order (``use_new_attention_order=False``) and
    (3, heads, ch) otherwise, as the original's QKVAttentionLegacy / QKVAttention.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_checkpoint: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        length = qkv.shape[-1]
        ch = c // self.num_heads
        if self.use_new_attention_order:
            q, k, v = (t.reshape(b * self.num_heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(ch, dim=1)
        # (B*heads, ch, T) -> (B*heads, T, ch) for SDPA, contiguous (a strided view sends CPU SDPA to the math
        # kernel, which builds the T x T matrix); scale 1/sqrt(ch) as the original
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The LDM UNet with timestep embedding and (cross-)attention.

    Arguments are the original's (``model.params.unet_config.params`` of an SD yaml). ``attention_resolutions``
    lists downsampling factors (1, 2, 4, ...) whose levels get attention. ``num_heads`` fixes the head count, or
    ``num_head_channels`` the head width. ``legacy`` (True in LDM configs, False in SD v1) only changes the head
    width of non-transformer attention. ``use_linear_in_transformer`` is SD 2.x's Linear ``proj_in/proj_out``.
    ``use_checkpoint`` recomputes activations in the backward pass (training only). ``use_fp16`` is refused: run
    in float32 under ``torch.autocast`` instead (the original's half-precision conversion was a no-op).
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Optional[int] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: Optional[int] = None, n_embed: Optional[int] = None,
                 legacy: bool = True, use_linear_in_transformer: bool = False):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the width of the cross-attention context)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer is False: cross-attention needs it")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if use_fp16:
            raise ValueError("use_fp16 is not supported: keep the UNet in float32 and run under torch.autocast "
                             "(e.g. --precision autocast)")
        if num_classes is not None and not isinstance(num_classes, int):
            raise ValueError(f"num_classes must be an int (class-conditional) or None, got {num_classes!r}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = [int(r) for r in attention_resolutions]
        channel_mult = [int(m) for m in channel_mult]

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None

        def attention(ch: int, upsample: bool = False) -> nn.Module:
            # head count / width exactly as the original derives them (including the legacy rule). As there,
            # num_heads_upsample reaches only the output blocks' AttentionBlock; their SpatialTransformer uses
            # num_heads like every other level (CompVis openaimodel.py, UNetModel.__init__, output blocks).
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                          use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint)
            return AttentionBlock(ch, use_checkpoint=use_checkpoint,
                                  num_heads=num_heads_upsample if upsample else heads,
                                  num_head_channels=dim_head, use_new_attention_order=use_new_attention_order)

        def resblock(ch: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                            up=up, down=down)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]  # widths of the skips, popped by the output blocks
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (resblock(ch, ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, dims=dims, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, upsample=True))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise (or v / codebook-logit) prediction.

        x: (B, in_channels, H, W), H and W divisible by ``2 ** (len(channel_mult) - 1)``; timesteps: (B,) or a
        scalar, int or float; context: (B, M, context_dim) for cross-attention; y: (B,) class labels iff
        ``num_classes`` is set. Returns (B, out_channels, H, W) (or (B, n_embed, H, W)).
        """
        if x.ndim < 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, ...), got {tuple(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by {factor}")
        if self.context_dim is not None and (context is None or context.ndim != 3
                                             or context.shape[-1] != self.context_dim):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context must be (B, M, {self.context_dim}) for the cross-attention, got {got}")
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y must be given if and only if the model is class-conditional (num_classes set)")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or ({x.shape[0]},), got {tuple(timesteps.shape)}")

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must be ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        hs = []  # skip features, one per input block, consumed in reverse by the output blocks
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        h = h.type(x.dtype)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
