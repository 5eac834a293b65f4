"""A checkpoint's tensors -> the ``AutoencoderKL`` config that builds them: variant, condition branch options and
latent space, so that a file loads without naming a config (the ComfyUI loader, ``convert_checkpoint.py``).

The main path (widths, blocks per level, latent channels, quant convs) is read by
:meth:`ldm.checkpoints.diffusers.AutoencoderLayout.from_state_dict`; the condition branch is read here, since
ASUKA's (``concat_mask``, optionally ``gate_conv``) has no diffusers counterpart:

* ``concat_mask``: the first branch conv reads one channel more than the image has (the mask);
* ``gate_conv``: every branch conv gives twice its width (``x, gate``), so layer 0 has twice the outputs layer 1 reads.

One thing is not in the tensors: how the mask is resized to each level. The only released decoder with
``concat_mask`` is ASUKA's, which resizes by area (``mask_resize: area``, configs/autoencoder/flux/asuka.yaml); the
paper's decoders use nearest. The latent space is read from the channels and quant convs (:func:`default_latent_space`).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from ..checkpoints.diffusers import AutoencoderLayout
from ..checkpoints.files import CheckpointError
from ..checkpoints.qwenimage import config_of_state_dict as qwenimage_config_of
from ..checkpoints.tensors import BRANCH, autoencoder_state_dict, condition_branch, drop_unused_keys
from ..latent_spaces import LATENT_SPACES, SD, LatentSpace, describe_latent_layout, matching_spaces
from ..modules.diffusionmodules.condition import default_condition_widths
from ..modules.diffusionmodules.qwenimage import qwenimage_condition_widths

FLUX = LATENT_SPACES["flux"]


def default_latent_space(channels: int, quant_conv: bool, concat_mask: bool = False) -> Optional[LatentSpace]:
    """The latent space a file of this layout is taken to be when nobody says: the only known one with these
    channels and quant convs; SD 1.x for 4 channels with quant convs (the paper's; SDXL's VAE has the same tensors
    and must be named); FLUX.1 for ASUKA's branch (``concat_mask``: its only release). ``None``: no known space or
    more than one (SD 3.x and FLUX.1 share 16 channels without quant convs)."""
    if (channels, quant_conv) == (SD.channels, SD.quant_conv):
        return SD
    if concat_mask and (channels, quant_conv) == (FLUX.channels, FLUX.quant_conv):
        return FLUX
    spaces = matching_spaces(channels, quant_conv)
    return spaces[0] if len(spaces) == 1 else None


def qwenimage_autoencoder_config(sd: Mapping[str, torch.Tensor], latent_space: Optional[str],
                                 source: object) -> Dict[str, Any]:
    """:func:`autoencoder_config` for a Qwen-Image VAE (Wan-2.1 names, :mod:`ldm.checkpoints.qwenimage`)."""
    if latent_space not in (None, "qwenimage"):
        raise CheckpointError(f"{source}: holds Qwen-Image's VAE (Wan-2.1 names), not latent space {latent_space}")
    ddconfig, overrides = qwenimage_config_of(sd, source)
    branch = condition_branch(sd, ddconfig["out_ch"])
    overrides["condition"] = branch is not None
    if branch is not None:
        if branch["concat_mask"] or branch["gate_conv"]:
            raise CheckpointError(f"{source}: ASUKA's condition-branch options are not built for Qwen-Image")
        if branch["condition_widths"] != qwenimage_condition_widths(overrides.get("ch", ddconfig["ch"]),
                                                                    ddconfig["ch_mult"]):
            overrides["condition_widths"] = branch["condition_widths"]
    space = LATENT_SPACES["qwenimage"]
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"architecture": "qwenimage", "embed_dim": ddconfig["z_channels"], "use_quant_conv": True,
                       **space.normalization.to_params(), "lossconfig": {"target": "torch.nn.Identity"},
                       "ddconfig": ddconfig, "decoder_overrides": overrides}}


def autoencoder_config(state_dict: Mapping[str, torch.Tensor], latent_space: Optional[str] = None,
                       source: object = "<state dict>") -> Dict[str, Any]:
    """The inference config (``{"target", "params"}``, loss ``torch.nn.Identity``) of the ``AutoencoderKL`` whose
    state dict ``state_dict`` is (any of our formats' tensors in our keys; a single-file diffusion checkpoint gives
    its VAE). ``latent_space``: a name of :data:`ldm.latent_spaces.LATENT_SPACES`, checked against the tensors;
    ``None`` = :func:`default_latent_space`. Raises :class:`CheckpointError` naming ``source`` for tensors that are
    no autoencoder of ours, or whose latent space is not known or not the one asked for."""
    sd = drop_unused_keys(autoencoder_state_dict(state_dict, source=source))
    if "decoder.conv1.weight" in sd:
        return qwenimage_autoencoder_config(sd, latent_space, source)
    absent = [k for k in ("encoder.conv_in.weight", "decoder.conv_out.weight") if k not in sd]
    if absent:
        raise CheckpointError(f"{source}: not an autoencoder checkpoint this project reads: no {' or '.join(absent)} "
                              f"(first keys: {', '.join(sorted(sd)[:4])}); a VAE here needs its encoder and decoder")
    main_path = {k: v for k, v in sd.items() if not k.startswith(BRANCH)}
    try:
        layout = AutoencoderLayout.from_state_dict(main_path)
        ddconfig, overrides = layout.to_ldm_config()
        branch = condition_branch(sd, layout.out_channels)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: not an autoencoder checkpoint this project reads: {e}") from None
    what = describe_latent_layout(layout.latent_channels, layout.quant_conv)
    if latent_space is not None:
        if latent_space not in LATENT_SPACES:
            raise CheckpointError(f"latent space {latent_space!r}: not one of {', '.join(LATENT_SPACES)}")
        space = LATENT_SPACES[latent_space]
        if (space.channels, space.quant_conv) != (layout.latent_channels, layout.quant_conv):
            raise CheckpointError(f"{source}: latent space {latent_space} ({space.models}) has {space.channels} "
                                  f"latent channels {'with' if space.quant_conv else 'without'} quant convs, the "
                                  f"file has {what}")
    else:
        space = default_latent_space(layout.latent_channels, layout.quant_conv,
                                     concat_mask=bool(branch and branch["concat_mask"]))
        if space is None:
            names = [s.name for s in matching_spaces(layout.latent_channels, layout.quant_conv)]
            raise CheckpointError(f"{source}: the file has {what}: say which latent space it is "
                                  f"({' or '.join(names) or 'none is known'})")
    overrides["condition"] = branch is not None
    overrides.pop("condition_widths", None)
    if branch is not None:
        if branch["condition_widths"] != default_condition_widths(overrides["ch"], overrides["ch_mult"]):
            overrides["condition_widths"] = branch["condition_widths"]
        if branch["concat_mask"]:
            overrides.update(concat_mask=True, mask_resize="area")  # ASUKA's rule (module docstring)
        if branch["gate_conv"]:
            overrides["gate_conv"] = True
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": layout.latent_channels, "use_quant_conv": layout.quant_conv,
                       **space.normalization.to_params(),
                       "lossconfig": {"target": "torch.nn.Identity"}, "ddconfig": ddconfig,
                       "decoder_overrides": overrides}}

