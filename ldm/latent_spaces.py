"""The KL-f8 latent spaces this project trains decoders for: channels, quant convs, latent scale and shift, configs.

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

What a file's tensors are (which space, which variant) is read by :mod:`ldm.checkpoints.tensors`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional


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


