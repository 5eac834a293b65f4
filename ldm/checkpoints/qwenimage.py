"""Qwen-Image's VAE files <-> our 2-D tensors (:mod:`ldm.modules.diffusionmodules.qwenimage`).

Two layouts come in:

* **Wan-2.1 / Qwen-Image single file** (ComfyUI's ``qwen_image_vae.safetensors``, Wan's ``Wan2.1_VAE.pth``): the
  names of ``comfy.ldm.wan.vae.WanVAE``, which are ours (``encoder.conv1``, ``encoder.downsamples.N.residual.2``,
  ``decoder.upsamples.N.resample.1``, ``decoder.middle.1.to_qkv``, ``decoder.head.2`` ...), except the top-level
  quant convs ``conv1`` / ``conv2`` (ours ``quant_conv`` / ``post_quant_conv``);
* **diffusers' ``AutoencoderKLQwenImage``** folder: ``conv_in``, ``down_blocks.N`` (the same flat list as Wan's
  ``downsamples``), ``up_blocks.J.resnets.R`` / ``up_blocks.J.upsamplers.0`` (Wan's flat ``upsamples`` grouped by
  level), ``mid_block.{resnets,attentions}``, ``norm_out`` / ``conv_out``, ``norm1`` / ``conv1`` / ``norm2`` /
  ``conv2`` / ``conv_shortcut`` for ``residual.{0,2,3,6}`` / ``shortcut`` (the renaming of diffusers'
  ``convert_wan_vae_to_diffusers``, for any number of blocks).

Both hold 3-D tensors: causal conv kernels (O, I, T, k, k) and RMS-norm gains (C, 1, 1, 1). On one frame a causal
conv reads only its last temporal slice (module docstring of the network), so loading keeps ``w[:, :, -1]``; the
temporal up / downsamplers' ``time_conv`` never runs on one frame and is dropped (logged). The export writes the
2-D kernels back as 3-D ones with zeros in the earlier temporal slices and zero ``time_conv``: the same network on
images (T = 1, every Qwen-Image pipeline), not on videos.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..checkpoints.files import CheckpointError, StateDict
from ..latent_spaces import LATENT_SPACES, PerChannel
from ..modules.diffusionmodules.qwenimage import QWENIMAGE_TEMPORAL_DOWNSAMPLE

log = logging.getLogger(__name__)

QWENIMAGE_CLASS = "AutoencoderKLQwenImage"
QWENIMAGE = LATENT_SPACES["qwenimage"]
# AutoencoderKLQwenImage's constructor defaults (diffusers 0.42.1): Qwen-Image's VAE
QWENIMAGE_DEFAULTS = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                      "temperal_downsample": list(QWENIMAGE_TEMPORAL_DOWNSAMPLE)}
WAN_QUANT_CONVS = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))
_RESIDUAL = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
             ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_WHOLE = (("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."),
          ("middle.0.", "mid_block.resnets.0."), ("middle.1.", "mid_block.attentions.0."),
          ("middle.2.", "mid_block.resnets.1."))


def is_wan_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Tensors in Wan-2.1's names (a Qwen-Image single file, or ours)."""
    return "decoder.conv1.weight" in state_dict or "encoder.conv1.weight" in state_dict


def from_wan_layout(state_dict: Mapping[str, torch.Tensor], source: object = "<state dict>") -> StateDict:
    """A Wan-2.1 / Qwen-Image file (3-D tensors; or ours, 2-D) -> our keys and 2-D tensors: top-level ``conv1`` /
    ``conv2`` -> ``quant_conv`` / ``post_quant_conv``, each conv kernel's last temporal slice, gains (C, 1, 1),
    ``time_conv`` dropped."""
    out: StateDict = {}
    temporal = [k for k in state_dict if ".time_conv." in k]
    if temporal:
        log.info("%s: dropped %d time_conv tensors: the temporal resamplers never run on one image", source,
                 len(temporal))
    sliced = 0
    for key, tensor in state_dict.items():
        if ".time_conv." in key:
            continue
        old, new = next(((o, n) for o, n in WAN_QUANT_CONVS if key.startswith(o)), ("", ""))
        key = new + key[len(old):]
        if tensor.ndim == 5 and key.endswith(".weight"):
            tensor, sliced = tensor[:, :, -1], sliced + 1
        elif key.endswith(".gamma") and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], 1, 1)
        elif tensor.ndim == 5:
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}: not a Qwen-Image VAE tensor")
        out[key] = tensor.contiguous()
    if sliced:
        log.info("%s: %d causal 3-D conv kernels -> their last temporal slice (one image)", source, sliced)
    return out


def _decoder_index(n_blocks: int) -> Tuple[Any, Any]:
    """(ours -> diffusers, diffusers -> ours) key maps of the decoder's flat ``upsamples`` list."""
    step = n_blocks + 2  # per level: num_res_blocks + 1 ResidualBlocks, one upsampler

    def to_diffusers(flat: int) -> str:
        level, r = divmod(flat, step)
        return f"up_blocks.{level}.upsamplers.0." if r == n_blocks + 1 else f"up_blocks.{level}.resnets.{r}."

    def to_ours(level: int, r: Optional[int]) -> str:
        return f"upsamples.{level * step + (n_blocks + 1 if r is None else r)}."

    return to_diffusers, to_ours


def _rename_block(rest: str, pairs: Sequence[Tuple[str, str]], forward: bool) -> str:
    for ours, theirs in pairs:
        a, b = (ours, theirs) if forward else (theirs, ours)
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def ours_to_diffusers_keys(key: str, num_res_blocks: int) -> str:
    """One of our (Wan-named) keys -> diffusers' ``AutoencoderKLQwenImage`` key."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    part, rest = key.split(".", 1)
    m = re.match(r"(downsamples|upsamples)\.(\d+)\.(.*)$", rest)
    if m:
        kind, index, inner = m.group(1), int(m.group(2)), m.group(3)
        head = f"down_blocks.{index}." if kind == "downsamples" else _decoder_index(num_res_blocks)[0](index)
        return f"{part}.{head}{_rename_block(inner, _RESIDUAL, True)}"
    renamed = _rename_block(rest, _WHOLE, True)
    m = re.match(r"(mid_block\.resnets\.\d\.)(.*)$", renamed)
    if m:
        renamed = m.group(1) + _rename_block(m.group(2), _RESIDUAL, True)
    return f"{part}.{renamed}"


def diffusers_to_ours_keys(key: str, num_res_blocks: int) -> str:
    """Inverse of :func:`ours_to_diffusers_keys`."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    part, rest = key.split(".", 1)
    m = re.match(r"down_blocks\.(\d+)\.(.*)$", rest)
    if m:
        return f"{part}.downsamples.{m.group(1)}.{_rename_block(m.group(2), _RESIDUAL, False)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", rest)
    if m:
        r = None if m.group(3) is None else int(m.group(3))
        head = _decoder_index(num_res_blocks)[1](int(m.group(1)), r)
        return f"{part}.{head}{_rename_block(m.group(4), _RESIDUAL, False)}"
    m = re.match(r"(mid_block\.resnets\.\d\.)(.*)$", rest)
    if m:
        rest = m.group(1) + _rename_block(m.group(2), _RESIDUAL, False)
    return f"{part}.{_rename_block(rest, _WHOLE, False)}"


def diffusers_qwenimage_to_ours(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                                source: object = "<state dict>") -> Tuple[StateDict, Dict[str, Any]]:
    """An ``AutoencoderKLQwenImage`` state dict + config -> ``(our tensors, decoder_overrides)``."""
    cfg = {**QWENIMAGE_DEFAULTS, **config}
    if list(cfg.get("attn_scales") or []):
        raise CheckpointError(f"{source}: attn_scales {cfg['attn_scales']}: ours has attention only in the middle")
    n = int(cfg["num_res_blocks"])
    renamed = {diffusers_to_ours_keys(k, n): v for k, v in state_dict.items()}
    return from_wan_layout(renamed, source), {"ch": int(cfg["base_dim"]), "ch_mult": list(cfg["dim_mult"]),
                                              "num_res_blocks": n, "condition": False}


def ddconfig_of_diffusers(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Our ``ddconfig`` (architecture ``qwenimage``) for an ``AutoencoderKLQwenImage`` config."""
    cfg = {**QWENIMAGE_DEFAULTS, **config}
    return {"ch": int(cfg["base_dim"]), "ch_mult": list(cfg["dim_mult"]), "num_res_blocks": int(cfg["num_res_blocks"]),
            "z_channels": int(cfg["z_dim"]), "double_z": True, "in_channels": int(cfg.get("input_channels", 3)),
            "out_ch": int(cfg.get("input_channels", 3)), "dropout": 0.0,
            "temporal_downsample": [bool(t) for t in cfg["temperal_downsample"]]}


def _causal(key: str) -> bool:
    """A diffusers key of a causal 3-D conv (``QwenImageCausalConv3d``); the resamplers' and attention's convs are
    2-D there too."""
    return key.endswith((".weight", ".bias")) and ".resample." not in key and ".attentions." not in key


def ours_to_diffusers_qwenimage(state_dict: Mapping[str, torch.Tensor], ddconfig: Mapping[str, Any],
                                normalization: Optional[PerChannel] = None
                                ) -> Tuple[StateDict, Dict[str, Any]]:
    """Our Qwen-Image VAE (no condition branch: diffusers' class has none) -> ``(AutoencoderKLQwenImage state
    dict, config)``. 2-D kernels become causal 3-D ones (zeros before the last temporal slice), ``time_conv``
    zeros (module docstring)."""
    branch = [k for k in state_dict if k.startswith("decoder.encoder.")]
    if branch:
        raise CheckpointError("diffusers' AutoencoderKLQwenImage has no condition branch (decoder.encoder.*): only "
                              "a vanilla Qwen-Image decoder (condition: false) exports to it")
    norm = QWENIMAGE.normalization if normalization is None else normalization
    n = int(ddconfig["num_res_blocks"])
    temporal = [bool(t) for t in ddconfig.get("temporal_downsample", QWENIMAGE_TEMPORAL_DOWNSAMPLE)]
    out: StateDict = {}
    for key, tensor in state_dict.items():
        if key.startswith(("loss.", "bn.")):
            continue
        new = ours_to_diffusers_keys(key, n)
        if new.endswith(".gamma") and ".attentions." not in new:
            tensor = tensor.reshape(tensor.shape[0], 1, 1, 1)
        elif _causal(new) and new.endswith(".weight"):
            o, i, kh, kw = tensor.shape
            full = tensor.new_zeros(o, i, kh, kh, kw)
            full[:, :, -1] = tensor
            tensor = full
        out[new] = tensor
    dims = [int(ddconfig["ch"]) * m for m in ddconfig["ch_mult"]]
    for k, flag in enumerate(temporal):
        if flag:  # the downsampler of encoder level k: after its num_res_blocks ResidualBlocks
            index, dim = k * (n + 1) + n, dims[k]
            ref = out[f"encoder.down_blocks.{index}.resample.1.weight"]
            out[f"encoder.down_blocks.{index}.time_conv.weight"] = ref.new_zeros(dim, dim, 3, 1, 1)
            out[f"encoder.down_blocks.{index}.time_conv.bias"] = ref.new_zeros(dim)
    dec_dims = [int(ddconfig["ch"]) * m for m in [ddconfig["ch_mult"][-1], *ddconfig["ch_mult"][::-1]]]
    for j, flag in enumerate(temporal[::-1]):
        if flag:
            dim = dec_dims[j + 1]
            ref = out[f"decoder.up_blocks.{j}.upsamplers.0.resample.1.weight"]
            out[f"decoder.up_blocks.{j}.upsamplers.0.time_conv.weight"] = ref.new_zeros(dim * 2, dim, 3, 1, 1)
            out[f"decoder.up_blocks.{j}.upsamplers.0.time_conv.bias"] = ref.new_zeros(dim * 2)
    config = {"_class_name": QWENIMAGE_CLASS, "base_dim": int(ddconfig["ch"]), "z_dim": int(ddconfig["z_channels"]),
              "dim_mult": list(ddconfig["ch_mult"]), "num_res_blocks": n, "attn_scales": [],
              "temperal_downsample": temporal, "dropout": 0.0,
              "input_channels": int(ddconfig.get("in_channels", 3)), **norm.to_diffusers()}
    return out, config


def _flat_widths(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Tuple[Dict[int, int], List[int]]:
    """``{flat index: output width}`` of the ResidualBlocks under ``prefix`` and the flat indices of its
    resamplers."""
    blocks, resamplers = {}, []
    for key, tensor in state_dict.items():
        m = re.match(re.escape(prefix) + r"(\d+)\.(residual\.2|resample\.1)\.weight$", key)
        if m and m.group(2) == "residual.2":
            blocks[int(m.group(1))] = int(tensor.shape[0])
        elif m:
            resamplers.append(int(m.group(1)))
    return blocks, sorted(resamplers)


def config_of_state_dict(state_dict: Mapping[str, torch.Tensor], source: object = "<state dict>"
                         ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(ddconfig, decoder_overrides)`` of a Qwen-Image VAE in our keys (after :func:`from_wan_layout`), read off
    its tensors: widths, blocks per level, the decoder's own width and depth where they differ from the encoder's
    (the asymmetric variants), and the condition branch (``decoder.encoder.layers.*``). ``temporal_downsample`` is
    Qwen-Image's (its ``time_conv`` is not in our tensors)."""
    try:
        ch = int(state_dict["encoder.conv1.weight"].shape[0])
        enc_blocks, enc_down = _flat_widths(state_dict, "encoder.downsamples.")
        dec_blocks, _ = _flat_widths(state_dict, "decoder.upsamples.")
        levels = len(enc_down) + 1
        n_enc = len(enc_blocks) // levels  # per level: n_enc ResidualBlocks, then a downsampler
        ch_mult = [enc_blocks[level * (n_enc + 1)] // ch for level in range(levels)]
        n_dec = len(dec_blocks) // levels - 1  # per level: n_dec + 1 ResidualBlocks, then an upsampler
        dec_ch = int(state_dict["decoder.head.2.weight"].shape[1]) // ch_mult[0]
        z = int(state_dict["post_quant_conv.weight"].shape[0])
    except (KeyError, ZeroDivisionError, IndexError) as e:
        raise CheckpointError(f"{source}: not a Qwen-Image VAE in Wan-2.1's names ({e!r} unreadable)") from None
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
                "ch_mult": ch_mult, "num_res_blocks": n_enc, "attn_resolutions": [], "dropout": 0.0,
                "temporal_downsample": list(QWENIMAGE_TEMPORAL_DOWNSAMPLE)}
    overrides: Dict[str, Any] = {k: v for k, v in (("ch", dec_ch), ("num_res_blocks", n_dec)) if v != ddconfig[k]}
    return ddconfig, overrides
