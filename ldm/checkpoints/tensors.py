"""What a checkpoint's tensors are, read off the tensors themselves: which latent space, which decoder variant,
which keys of the released files no model reads, and where a single-file checkpoint keeps its VAE.

Files users bring, in our key layout after :func:`autoencoder_state_dict`:

* our / the paper's checkpoints, BFL's ``ae.safetensors`` (FLUX.1) and ASUKA's decoder checkpoint: ``encoder.*``,
  ``decoder.*`` with the LDM names (the last two without quant convs; ASUKA adds the unused ``decoder.up_layers.*``);
* BFL's FLUX.2 ``ae.safetensors`` (``flux2/autoencoder.py``): the same LDM names, but the quant convs sit inside
  the encoder and decoder (``encoder.quant_conv.*``, ``decoder.post_quant_conv.*``: renamed to our top-level
  ``quant_conv.*`` / ``post_quant_conv.*``), plus the latent BatchNorm's ``bn.running_mean`` / ``bn.running_var`` /
  ``bn.num_batches_tracked`` (kept: our model has the same ``bn``);
* single-file SD 1.x/2.x, SDXL and SD 3.x checkpoints: the VAE under ``first_stage_model.`` (some under ``vae.``);
* diffusers ``vae/`` folders, converted by :mod:`ldm.checkpoints.diffusers`.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..checkpoints.files import CheckpointError
from ..latent_spaces import describe_latent_layout

log = logging.getLogger(__name__)


# Keys of the original release that no decoder reads, with the reason (logged when dropped).
UNUSED_PREFIXES = {
    "decoder.up_layers.": "the original decoder's ConvTranspose stack, built but never used",
    "loss.": "training loss weights (LPIPS, discriminator)",
}

# Prefixes under which single-file diffusion checkpoints store their VAE (diffusers' single-file loader reads both).
SINGLE_FILE_VAE_PREFIXES = ("first_stage_model.", "vae.")


def single_file_vae_prefix(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The prefix under which a single-file diffusion checkpoint keeps its VAE; ``None`` when the tensors hold no
    VAE under one of :data:`SINGLE_FILE_VAE_PREFIXES`."""
    return next((p for p in SINGLE_FILE_VAE_PREFIXES if f"{p}encoder.conv_in.weight" in state_dict), None)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The tensors whose keys start with ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def autoencoder_state_dict(state_dict: Mapping[str, torch.Tensor], source: object = "<state dict>"
                           ) -> Dict[str, torch.Tensor]:
    """The autoencoder's tensors in our keys: a single-file diffusion checkpoint gives its VAE (prefix stripped),
    anything with ``encoder.*`` keys at the top (ours, the paper's, BFL's ``ae.safetensors``, ASUKA's) is kept."""
    prefix = None if "encoder.conv_in.weight" in state_dict else single_file_vae_prefix(state_dict)
    if prefix is None:
        state_dict = dict(state_dict)
    else:
        log.info("%s: single-file diffusion checkpoint, using its %s* weights", source, prefix)
        state_dict = strip_prefix(state_dict, prefix)
    return from_bfl_flux2_layout(state_dict, source)


# BFL's FLUX.2 AutoEncoder keeps the quant convs inside encoder / decoder: (its prefix, ours)
BFL_FLUX2_QUANT_CONVS = (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv."))


def from_bfl_flux2_layout(state_dict: Mapping[str, torch.Tensor], source: object = "<state dict>"
                          ) -> Dict[str, torch.Tensor]:
    """BFL's FLUX.2 key layout (``encoder.quant_conv.*``, ``decoder.post_quant_conv.*``) -> ours (top-level
    ``quant_conv.*``, ``post_quant_conv.*``); any other state dict is returned unchanged."""
    if not any(k.startswith(tuple(theirs for theirs, _ in BFL_FLUX2_QUANT_CONVS)) for k in state_dict):
        return dict(state_dict)
    clash = [k for k in state_dict if k.startswith(tuple(ours for _, ours in BFL_FLUX2_QUANT_CONVS))]
    if clash:
        raise CheckpointError(f"{source}: has both BFL's FLUX.2 encoder.quant_conv / decoder.post_quant_conv and "
                              f"top-level {clash[0]}: which quant convs are meant is ambiguous")
    log.info("%s: BFL FLUX.2 key layout (quant convs inside encoder / decoder)", source)
    return _rename_prefixes(state_dict, BFL_FLUX2_QUANT_CONVS)


def to_bfl_flux2_layout(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`from_bfl_flux2_layout`: our keys -> BFL's FLUX.2 ``ae.safetensors`` layout."""
    return _rename_prefixes(state_dict, [(ours, theirs) for theirs, ours in BFL_FLUX2_QUANT_CONVS])


def _rename_prefixes(state_dict: Mapping[str, torch.Tensor], renames) -> Dict[str, torch.Tensor]:
    """Keys starting with the first of a ``(old, new)`` prefix pair get the second instead."""
    out = {}
    for k, v in state_dict.items():
        old, new = next(((o, n) for o, n in renames if k.startswith(o)), ("", ""))
        out[new + k[len(old):]] = v
    return out


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


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which latent space the tensors look like, for error messages."""
    layout = latent_layout(state_dict)
    if layout is None:
        return "the tensors hold no encoder or decoder to tell their latent space"
    bn = " and latent BatchNorm statistics (bn.*)" if "bn.running_mean" in state_dict else ""
    return "the tensors have " + describe_latent_layout(*layout) + bn


def drop_unused_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Without the original release's keys that no decoder reads (:data:`UNUSED_PREFIXES`), logged."""
    kept = dict(state_dict)
    for prefix, reason in UNUSED_PREFIXES.items():
        dropped = [k for k in kept if k.startswith(prefix)]
        for k in dropped:
            del kept[k]
        if dropped:
            log.info("dropped %d keys under %r: %s", len(dropped), prefix, reason)
    return kept


# Known decoder shapes of released checkpoints -> the variant and its SD 1.x config (used in load error messages).
# The other latent spaces have the same variants under configs/autoencoder/{sdxl,sd3,flux}/asymmetric_*.yaml.
_VARIANT_CONFIGS = {
    (128, 2): "base (configs/autoencoder/autoencoder_kl_32x32x4.yaml, asymmetric_base.yaml)",
    (192, 3): "large 1.5x (configs/autoencoder/autoencoder_kl_32x32x4_large.yaml, asymmetric_large.yaml)",
    (256, 5): "large 2x (configs/autoencoder/autoencoder_kl_32x32x4_large2.yaml, asymmetric_large2.yaml)",
    (96, 2): "BFL's small FLUX.2 decoder (configs/autoencoder/flux2/small_decoder.yaml)",
}


def level_widths(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Tuple[List[int], int]:
    """``(width of each level, ResNet blocks per level)`` of ``encoder.down.`` or ``decoder.up.`` (level 0 = full
    resolution), read off the keys and shapes: the one reader of an architecture from tensors (error messages here,
    the diffusers layout in :mod:`ldm.checkpoints.diffusers`). Unreadable: :class:`CheckpointError`."""
    found: Dict[int, set] = {}
    for k in state_dict:
        m = re.match(re.escape(prefix) + r"(\d+)\.block\.(\d+)\.", k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not found or sorted(found) != list(range(len(found))):
        raise CheckpointError(f"cannot read the levels of {prefix}* from the checkpoint keys")
    blocks = {len(v) for v in found.values()}
    if len(blocks) != 1:
        raise CheckpointError(f"{prefix}*: levels have different numbers of blocks")
    widths = []
    for i in range(len(found)):
        key = f"{prefix}{i}.block.0.conv1.weight"
        if key not in state_dict:
            raise CheckpointError(f"not an autoencoder state dict in our key layout: {key} is missing")
        widths.append(int(state_dict[key].shape[0]))
    return widths, blocks.pop()


# where our checkpoints keep the decoder's condition branch (the original release's name): its layers are
# decoder.encoder.layers.N.{weight,bias}
BRANCH = "decoder.encoder."
BRANCH_LAYERS = BRANCH + "layers."


def condition_branch(state_dict: Mapping[str, torch.Tensor], out_channels: int) -> Optional[Dict[str, Any]]:
    """``{condition_widths, concat_mask, gate_conv}`` of the decoder's condition branch read off its tensors
    (``out_channels``: the image's channels; ASUKA's ``concat_mask`` reads one more, its ``gate_conv`` doubles the
    outputs), ``None`` without one; :class:`CheckpointError` for a branch of neither shape."""
    n = len({k[len(BRANCH_LAYERS):].split(".")[0] for k in state_dict if k.startswith(BRANCH_LAYERS)})
    if n == 0:
        return None
    shapes = []
    for i in range(n):
        if f"{BRANCH_LAYERS}{i}.weight" not in state_dict:
            raise CheckpointError(f"condition branch without {BRANCH_LAYERS}{i}.weight (its layers are not "
                                  f"0..{n - 1})")
        shapes.append(tuple(state_dict[f"{BRANCH_LAYERS}{i}.weight"].shape))
    concat_mask = shapes[0][1] == out_channels + 1
    if shapes[0][1] not in (out_channels, out_channels + 1):
        raise CheckpointError(f"{BRANCH_LAYERS}0.weight reads {shapes[0][1]} channels: neither the image "
                              f"({out_channels}) nor image + mask ({out_channels + 1})")
    gate_conv = n > 1 and shapes[0][0] == 2 * shapes[1][1]
    widths = [s[0] // 2 if gate_conv else s[0] for s in shapes]
    return {"condition_widths": widths, "concat_mask": concat_mask, "gate_conv": gate_conv}


def describe_decoder_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Guess the decoder variant of a checkpoint from its tensors, for error messages."""
    try:
        out_ch = state_dict["decoder.conv_out.weight"].shape[0]
        widths, blocks = level_widths(state_dict, "decoder.up.")
    except (KeyError, CheckpointError, AttributeError, IndexError):
        return "the checkpoint has no recognisable decoder (no decoder.conv_out.weight)"
    ch, nrb = widths[0], blocks - 1
    known = _VARIANT_CONFIGS.get((ch, nrb), "no released variant")
    try:
        branch = condition_branch(state_dict, out_ch)
    except CheckpointError as e:
        branch, condition = None, f"unreadable ({e})"
    else:
        condition = "absent" if branch is None else "present"
    if branch is not None and branch["concat_mask"]:
        condition = "present, reading the mask too (concat_mask: ASUKA, configs/autoencoder/flux/asuka.yaml)"
    return (f"the checkpoint's decoder has ch={ch}, num_res_blocks={nrb}, condition branch {condition}; "
            f"{describe_state_dict(state_dict)}: it matches {known}")
