"""Our decoder inside other tools: diffusers pipelines (:mod:`ldm.integrations.diffusers_pipelines`) and ComfyUI
(:mod:`ldm.integrations.comfyui`). Both pair an image / mask batch with the latent batch by one rule,
:func:`pair_batch`."""
from __future__ import annotations

import torch


def pair_batch(t: torch.Tensor, batch: int, name: str, interleave: bool = False) -> torch.Tensor:
    """``t`` (b, ...) for a latent batch ``batch``, as the host tools repeat a mask for their denoiser: b == batch
    as is, b == 1 shared (broadcast by the decoder), b dividing ``batch`` repeated ``batch // b`` times, whole
    (ComfyUI's ``repeat_to_batch_size``, diffusers' B prompts x n images) or image by image with ``interleave``
    (diffusers' ControlNet ``prepare_image``); any other b is a ``ValueError`` naming ``name``."""
    b = t.shape[0]
    if b in (1, batch):
        return t
    if batch % b:
        raise ValueError(f"{name} batch {b} does not pair with the latent batch {batch}: give a {name} of batch 1 "
                         f"(shared by all), {batch}, or a divisor of {batch}")
    n = batch // b
    return t.repeat_interleave(n, dim=0) if interleave else t.repeat(n, *([1] * (t.ndim - 1)))
