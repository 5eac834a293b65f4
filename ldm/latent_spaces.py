"""The KL-f8 latent spaces this project trains decoders for: channels, quant convs, latent normalisation, configs.

A latent space is configuration, not code: ``AutoencoderKL(embed_dim, use_quant_conv, scaling_factor,
shift_factor, latents_mean, latents_std, latent_batch_norm)``. The numbers below are those of the released models'
diffusers VAE configs (``vae/config.json``); BFL's FLUX.1 code carries the same scale and shift.

======  ============  ========  ===========  ===========  =======  ======
name    models        channels  quant convs  normalised   scale    shift
======  ============  ========  ===========  ===========  =======  ======
sd      SD 1.x / 2.x  4         yes          scale_shift  0.18215  0
sdxl    SDXL          4         yes          scale_shift  0.13025  0
sd3     SD 3 / 3.5    16        no           scale_shift  1.5305   0.0609
flux    FLUX.1        16        no           scale_shift  0.3611   0.1159
flux2   FLUX.2        32        yes          batch_norm   (1)      (0)
======  ============  ========  ===========  ===========  =======  ======

How the diffusion model's latents are made from the VAE's (:meth:`ldm.models.autoencoder.AutoencoderKL.scale_latents`):

* ``scale_shift``: ``(z - shift) * scale``, one scalar pair (the rows above but FLUX.2);
* ``per_channel``: ``(z - latents_mean) * scale / latents_std`` with one mean and std per latent channel, as
  diffusers' SDXL pipelines apply a VAE config's ``latents_mean`` / ``latents_std`` (Playground v2.5);
* ``batch_norm``: FLUX.2's. The latent is cut into 2x2 patches (:func:`patchify_latents`: (B, C, h, w) ->
  (B, 4C, h/2, w/2)), each of the 4C channels is normalised with the running mean and variance of the VAE's
  ``bn`` BatchNorm (``(x - running_mean) / sqrt(running_var + eps)``; statistics read from the checkpoint, never
  updated), and put back (:func:`unpatchify_latents`). The result keeps the VAE's layout (B, C, h, w); the FLUX.2
  pipelines' own latents are that result patchified (and packed into tokens).

SD 1.x and SDXL (and SD 3.x and FLUX.1) have the same tensor shapes: a file tells the family, not the model.

What a file's tensors are (which space, which variant) is read by :mod:`ldm.checkpoints.tensors`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

# the ways latents are normalised for the diffusion model (see the module docstring)
NORMALIZATIONS = ("scale_shift", "per_channel", "batch_norm")


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    name: str
    models: str
    channels: int
    quant_conv: bool
    scaling_factor: float
    shift_factor: float
    config_dir: str
    fp16_safe: bool = True  # SDXL's VAE overflows in float16 (diffusers' force_upcast): float32 or bfloat16 there
    normalization: str = "scale_shift"  # one of NORMALIZATIONS


LATENT_SPACES: Dict[str, LatentSpace] = {s.name: s for s in (
    LatentSpace("sd", "SD 1.x / 2.x", 4, True, 0.18215, 0.0, "configs/autoencoder/"),
    LatentSpace("sdxl", "SDXL", 4, True, 0.13025, 0.0, "configs/autoencoder/sdxl/", fp16_safe=False),
    LatentSpace("sd3", "SD 3.x", 16, False, 1.5305, 0.0609, "configs/autoencoder/sd3/"),
    LatentSpace("flux", "FLUX.1", 16, False, 0.3611, 0.1159, "configs/autoencoder/flux/"),
    # diffusers' AutoencoderKLFlux2 (and BFL's FLUX.2 AutoEncoder) has quant convs and no scale or shift: its
    # pipelines normalise with the BatchNorm statistics over 2x2 patches
    LatentSpace("flux2", "FLUX.2", 32, True, 1.0, 0.0, "configs/autoencoder/flux2/", normalization="batch_norm"),
)}
SD = LATENT_SPACES["sd"]


def latent_space_of(model: object) -> Optional[LatentSpace]:
    """The known latent space of an ``AutoencoderKL`` (by channels, quant convs, normalisation kind, scale and
    shift), if any."""
    key = (getattr(model, "embed_dim", None), getattr(model, "use_quant_conv", None),
           getattr(model, "latent_normalization", "scale_shift"), getattr(model, "scaling_factor", None),
           getattr(model, "shift_factor", None))
    return next((s for s in LATENT_SPACES.values()
                 if (s.channels, s.quant_conv, s.normalization, s.scaling_factor, s.shift_factor) == key), None)


def matching_spaces(channels: int, quant_conv: bool) -> List[LatentSpace]:
    return [s for s in LATENT_SPACES.values() if (s.channels, s.quant_conv) == (channels, quant_conv)]


def describe_latent_layout(channels: int, quant_conv: bool) -> str:
    """'16 latent channels without quant convs (SD 3.x or FLUX.1: configs/autoencoder/sd3/ or ...)'."""
    what = f"{channels} latent channels {'with' if quant_conv else 'without'} quant convs"
    spaces = matching_spaces(channels, quant_conv)
    if not spaces:
        return f"{what}, which is none of the known latent spaces ({', '.join(LATENT_SPACES)})"
    return (f"{what}, the layout of {' or '.join(s.models for s in spaces)} "
            f"({' or '.join(s.config_dir for s in spaces)})")




# ---------------------------------------------------------------------------------------------- patches
def patchify_latents(z: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """(B, C, h, w) -> (B, C*p*p, h/p, w/p): channel ``c*p*p + i*p + j`` holds pixel ``(i, j)`` of each p x p patch
    of channel ``c`` (BFL's FLUX.2 ``rearrange("c (h i) (w j) -> (c i j) h w")``, diffusers'
    ``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = z.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latents {tuple(z.shape)}: height and width must be multiples of the patch size {p}")
    return z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify_latents(x: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify_latents`: (B, C*p*p, h/p, w/p) -> (B, C, h, w)."""
    b, cpp, h, w = x.shape
    p = patch_size
    if cpp % (p * p):
        raise ValueError(f"patchified latents {tuple(x.shape)}: channels must be a multiple of {p * p}")
    return x.reshape(b, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, cpp // (p * p), h * p, w * p)
