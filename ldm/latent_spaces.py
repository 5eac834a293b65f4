"""The KL-f8 latent spaces in common use, and how to tell from a file's tensors which one it holds.

A latent space is configuration, not code: ``AutoencoderKL(embed_dim, use_quant_conv, scaling_factor,
shift_factor)``. The numbers below are those of the released models' diffusers ``AutoencoderKL`` configs
(``vae/config.json``); BFL's FLUX.1 code carries the same scale and shift.

=====  ============  ========  ===========  =======  ======
name   models        channels  quant convs  scale    shift
=====  ============  ========  ===========  =======  ======
sd     SD 1.x / 2.x  4         yes          0.18215  0
sdxl   SDXL          4         yes          0.13025  0
sd3    SD 3 / 3.5    16        no           1.5305   0.0609
flux   FLUX.1        16        no           0.3611   0.1159
=====  ============  ========  ===========  =======  ======

SD 1.x and SDXL (and SD 3.x and FLUX.1) have the same tensor shapes: a file tells the family, not the model.

Files users bring, in our key layout after :func:`autoencoder_state_dict`:

* our / the paper's checkpoints, BFL's ``ae.safetensors`` (FLUX.1) and ASUKA's decoder checkpoint: ``encoder.*``,
  ``decoder.*`` with the LDM names (the last two without quant convs; ASUKA adds the unused ``decoder.up_layers.*``);
* single-file SD 1.x/2.x, SDXL and SD 3.x checkpoints: the VAE under ``first_stage_model.`` (some under ``vae.``);
* diffusers ``vae/`` folders, converted by :mod:`ldm.diffusers_interop`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Mapping, Optional, Tuple

import torch

log = logging.getLogger(__name__)


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


LATENT_SPACES: Dict[str, LatentSpace] = {s.name: s for s in (
    LatentSpace("sd", "SD 1.x / 2.x", 4, True, 0.18215, 0.0, "configs/autoencoder/"),
    LatentSpace("sdxl", "SDXL", 4, True, 0.13025, 0.0, "configs/autoencoder/sdxl/", fp16_safe=False),
    LatentSpace("sd3", "SD 3.x", 16, False, 1.5305, 0.0609, "configs/autoencoder/sd3/"),
    LatentSpace("flux", "FLUX.1", 16, False, 0.3611, 0.1159, "configs/autoencoder/flux/"),
)}
SD = LATENT_SPACES["sd"]

# Prefixes under which single-file diffusion checkpoints store their VAE (diffusers' single-file loader reads both).
SINGLE_FILE_VAE_PREFIXES = ("first_stage_model.", "vae.")


def autoencoder_state_dict(state_dict: Mapping[str, torch.Tensor], source: object = "<state dict>"
                           ) -> Dict[str, torch.Tensor]:
    """The autoencoder's tensors in our keys: a single-file diffusion checkpoint gives its VAE (prefix stripped),
    anything with ``encoder.*`` keys at the top (ours, the paper's, BFL's ``ae.safetensors``, ASUKA's) is kept."""
    if "encoder.conv_in.weight" in state_dict:
        return dict(state_dict)
    for prefix in SINGLE_FILE_VAE_PREFIXES:
        if f"{prefix}encoder.conv_in.weight" in state_dict:
            log.info("%s: single-file diffusion checkpoint, using its %s* weights", source, prefix)
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def latent_layout(state_dict: Mapping[str, torch.Tensor]) -> Optional[Tuple[int, bool]]:
    """``(latent channels, has quant convs)`` of an autoencoder state dict in our keys, ``None`` if it has no
    encoder or decoder to read them from."""
    quant = "quant_conv.weight" in state_dict or "post_quant_conv.weight" in state_dict
    if "post_quant_conv.weight" in state_dict:
        return int(state_dict["post_quant_conv.weight"].shape[0]), quant
    if "decoder.conv_in.weight" in state_dict:
        return int(state_dict["decoder.conv_in.weight"].shape[1]), quant
    if "encoder.conv_out.weight" in state_dict:
        return int(state_dict["encoder.conv_out.weight"].shape[0]) // 2, quant
    return None


def latent_space_of(model: object) -> Optional[LatentSpace]:
    """The known latent space of an ``AutoencoderKL`` (by channels, quant convs, scale and shift), if any."""
    key = (getattr(model, "embed_dim", None), getattr(model, "use_quant_conv", None),
           getattr(model, "scaling_factor", None), getattr(model, "shift_factor", None))
    return next((s for s in LATENT_SPACES.values()
                 if (s.channels, s.quant_conv, s.scaling_factor, s.shift_factor) == key), None)


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


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which latent space the tensors look like, for error messages."""
    layout = latent_layout(state_dict)
    if layout is None:
        return "the tensors hold no encoder or decoder to tell their latent space"
    return "the tensors have " + describe_latent_layout(*layout)
