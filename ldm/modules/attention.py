"""The SD UNet's transformer parts: ``SpatialTransformer`` -> ``BasicTransformerBlock`` -> ``CrossAttention`` and a
GEGLU ``FeedForward``.

Attribute names (``proj_in``, ``transformer_blocks.N.{attn1,attn2,ff,norm1,norm2,norm3}``, ``to_q/to_k/to_v``,
``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``) are the checkpoint format of SD v1/v2. All attention goes through
``torch.nn.functional.scaled_dot_product_attention``, which picks a fused kernel where one exists.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.diffusionmodules.model import Normalize
from ..modules.diffusionmodules.util import checkpoint, zero_module


class GEGLU(nn.Module):
    """``x W_a * gelu(x W_b)`` with both halves from one Linear (``proj``: dim_in -> 2 dim_out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """(B, N, dim) -> (B, N, dim_out): GEGLU (``glu``) or Linear + GELU to ``mult * dim``, dropout, Linear."""

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (B, N, query_dim) over context (B, M, context_dim); self-attention when
    ``context`` is None. Scale ``dim_head ** -0.5``; q/k/v projections have no bias, ``to_out.0`` has one."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} != query batch {x.shape[0]}")
        b, n, _ = x.shape
        # (B, L, heads * d) -> (B, heads, L, d): the layout SDPA expects
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over ``context`` and a GEGLU feed-forward, each residual.
    (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: Optional[int] = None,
                 gated_ff: bool = True, checkpoint: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        # recomputation only pays off when a backward pass will follow
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint and self.training)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: (B, C, H, W) -> (B, C, H, W), residual.

    GroupNorm(32, eps 1e-6), ``proj_in`` to ``n_heads * d_head`` (1x1 conv in SD v1; a Linear after flattening with
    ``use_linear``, as SD 2.x), ``depth`` transformer blocks attending over ``context`` (B, M, context_dim), and a
    zero-initialised ``proj_out`` back to C.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[int] = None, use_linear: bool = False, use_checkpoint: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                  checkpoint=use_checkpoint)
            for _ in range(depth)])
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
