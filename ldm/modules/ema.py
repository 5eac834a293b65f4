"""Exponential moving average of a model's trainable parameters, stored the way SD checkpoints store it.

``LitEma`` keeps one buffer per trainable parameter, named after the parameter with every ``.`` removed (buffer
names may not contain dots): ``diffusion_model.input_blocks.0.0.weight`` -> ``diffusion_modelinput_blocks00weight``,
so a ``LatentDiffusion`` checkpoint holds ``model_ema.diffusion_modelinput_blocks00weight`` next to
``model_ema.decay`` and ``model_ema.num_updates``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadow of ``model``'s parameters that require grad.

    ``forward(model)`` updates ``shadow -= (1 - d) * (shadow - param)`` with ``d = decay``, or, with
    ``use_num_upates`` (the original's spelling), ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
    average warms up. ``copy_to(model)`` writes the shadow into the model; ``store``/``restore`` keep and bring back
    the live weights around an EMA evaluation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be between 0 and 1, got {decay}")
        self.m_name2s_name: Dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        # -1 switches the warm-up off
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s_name = name.replace(".", "")
            if s_name in self.m_name2s_name.values():
                raise ValueError(f"parameter {name!r} collides with another one once dots are removed ({s_name!r})")
            self.m_name2s_name[name] = s_name
            self.register_buffer(s_name, p.detach().clone())
        self.collected_params: List[torch.Tensor] = []

    def _pairs(self, model: nn.Module):
        """(model parameter, shadow buffer) for each tracked parameter; refuses a model that does not match."""
        shadow = dict(self.named_buffers())
        params = dict(model.named_parameters())
        missing = [n for n in self.m_name2s_name if n not in params]
        if missing:
            raise ValueError(f"model lacks {len(missing)} parameters tracked by the EMA, e.g. {missing[:3]}")
        for name, p in params.items():
            if p.requires_grad != (name in self.m_name2s_name):
                raise ValueError(f"parameter {name!r}: requires_grad={p.requires_grad} but the EMA "
                                 f"{'tracks' if name in self.m_name2s_name else 'does not track'} it")
            if p.requires_grad:
                yield p, shadow[self.m_name2s_name[name]]

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = torch.minimum(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        for p, s in self._pairs(model):
            s.sub_(one_minus_decay.to(s.dtype) * (s - p.to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s tracked parameters with the EMA weights."""
        for p, s in self._pairs(model):
            p.copy_(s)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` (the live weights) for :meth:`restore`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the weights saved by :meth:`store` back into ``parameters`` (same order)."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise ValueError(f"restore got {len(parameters)} parameters, store kept {len(self.collected_params)}")
        for saved, p in zip(self.collected_params, parameters):
            p.copy_(saved)
