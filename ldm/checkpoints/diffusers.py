"""Our checkpoints <-> diffusers ``AsymmetricAutoencoderKL`` / ``AutoencoderKL`` / ``AutoencoderKLFlux2`` folders.

Key mapping (ours = the original LDM names, which the paper's release uses; diffusers names on the right):

==========================================  ====================================================
``{enc,dec}oder.conv_in`` / ``conv_out``    unchanged
``encoder.down.{i}.block.{j}``              ``encoder.down_blocks.{i}.resnets.{j}``
``encoder.down.{i}.downsample``             ``encoder.down_blocks.{i}.downsamplers.0``
``decoder.up.{i}.block.{j}``                ``decoder.up_blocks.{n-1-i}.resnets.{j}`` (diffusers counts from the
                                            lowest resolution, we count from the highest)
``decoder.up.{i}.upsample``                 ``decoder.up_blocks.{n-1-i}.upsamplers.0``
``*.nin_shortcut``                          ``*.conv_shortcut``
``*.mid.block_{1,2}``                       ``*.mid_block.resnets.{0,1}``
``*.mid.attn_1.{q,k,v,proj_out,norm}``      ``*.mid_block.attentions.0.{to_q,to_k,to_v,to_out.0,group_norm}``; the 1x1
                                            conv weights (C,C,1,1) are Linear weights (C,C) there
``*.norm_out``                              ``*.conv_norm_out``
``decoder.encoder.layers.{k}``              ``decoder.condition_encoder.layers.{k}``
``quant_conv``, ``post_quant_conv``         unchanged (absent in SD 3.x / FLUX.1 VAEs, see below)
``decoder.up_layers.*``, ``loss.*``         dropped (never used by the decoder; training-only)
==========================================  ====================================================

VAEs without quant convs (SD 3.x, FLUX.1: ``use_quant_conv: false``) export to ``AutoencoderKL`` with
``use_quant_conv`` / ``use_post_quant_conv`` false. ``AsymmetricAutoencoderKL`` always has both convs, so there they
are written as identity 1x1 convs (weight = identity matrix, bias 0): exact in float32 (each output channel is
``1 * x + 0 * others + 0``), and read back as "no quant convs" (an exact identity pair is dropped on import).
Under TF32 convolutions on NVIDIA GPUs (``torch.backends.cudnn.allow_tf32``, on by default) an identity conv
rounds its input to TF32, a relative error of about 1e-3.

The latent space's normalisation (:mod:`ldm.latent_spaces`: ``scaling_factor`` and ``shift_factor`` where not 0,
or ``latents_mean`` / ``latents_std``) goes to ``config.json``; diffusers' ``AsymmetricAutoencoderKL``
has no ``shift_factor`` argument and logs that it ignores the entry, which is kept for the way back.

diffusers' ``MaskConditionEncoder`` always builds 5 layers (it is written for 4-level decoders). A decoder with
fewer levels uses only the first ``levels + 1``; diffusers looks features up by shape, and the extra layers run at
resolutions below every blend point, so they are never read. They are written as zeros and dropped on the way back.

FLUX.2's VAE is diffusers' ``AutoencoderKLFlux2``: the same encoder / decoder keys as ``AutoencoderKL`` plus the
latent BatchNorm ``bn.running_mean`` / ``bn.running_var`` / ``bn.num_batches_tracked`` (the same keys as ours), and
``decoder_block_out_channels`` for a decoder narrower than the encoder (BFL's small decoder). ``config.json`` carries
``batch_norm_eps`` and ``patch_size`` instead of a scale and shift. A FLUX.2 decoder with condition branch has no
diffusers class: ``AsymmetricAutoencoderKL`` cannot hold the BatchNorm statistics (its pipelines and
``from_pretrained`` would drop them), so such an export is refused.

Architectures are read from the tensors themselves (:class:`AutoencoderLayout`), so converting needs no config; a
config, when given, is checked against them.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..checkpoints.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    PathLike,
    StateDict,
    is_model_export,
    read_diffusers_files,
)
from ..checkpoints.qwenimage import QWENIMAGE_CLASS, diffusers_qwenimage_to_ours, ours_to_diffusers_qwenimage
from ..checkpoints.tensors import drop_unused_keys, level_widths
from ..latent_spaces import FLUX2_BATCH_NORM, SD, Normalization, PatchBatchNorm
from ..modules.diffusionmodules.condition import default_condition_widths
from ..util import check_output, default_file_mode, write_failed

log = logging.getLogger(__name__)

ASYMMETRIC_CLASS = "AsymmetricAutoencoderKL"
SYMMETRIC_CLASS = "AutoencoderKL"
FLUX2_CLASS = "AutoencoderKLFlux2"
DIFFUSERS_CONDITION_LAYERS = 5
NORM_GROUPS = 32  # our GroupNorm (ldm Normalize) always uses 32 groups

# (ours, diffusers) fragments that rename the same way in both directions; level indices are handled separately.
_RENAMES: Tuple[Tuple[str, str], ...] = (
    (".nin_shortcut.", ".conv_shortcut."),
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".norm_out.", ".conv_norm_out."),
)
# diffusers before 0.14 named the attention projections differently; from_pretrained still accepts them.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
# AutoencoderKLFlux2's constructor defaults (diffusers 0.42.1): FLUX.2's VAE
# (its patch_size / batch_norm_eps: ldm.latent_spaces.FLUX2_BATCH_NORM)
FLUX2_DEFAULTS = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 32}
_NO_ASUKA_BRANCH = ("diffusers' MaskConditionDecoder has no counterpart of ASUKA's condition-branch options "
                    "(concat_mask, gate_conv, mask_resize: area): such a decoder cannot be converted")
_ATTENTION_WEIGHT = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_OURS_LEVEL = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.")
_DIFFUSERS_LEVEL = re.compile(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|"
                              r"upsamplers\.0)\.")


def diffusers_condition_widths(first: int, last: int) -> List[int]:
    """Widths of diffusers' 5 ``MaskConditionEncoder`` layers for ``block_out_channels`` ``[first, ..., last]``:
    doubling from ``first``, capped at ``last``, and ``last`` for the lowest resolution.

    >>> diffusers_condition_widths(128, 512)
    [128, 256, 512, 512, 512]
    """
    widths, width = [], first
    for _ in range(DIFFUSERS_CONDITION_LAYERS - 1):
        width = min(width, last)
        widths.append(width)
        width *= 2
    return widths + [last]


@dataclasses.dataclass(frozen=True)
class AutoencoderLayout:
    """What a converter needs to know about a KL autoencoder, in the terms both libraries share.

    Widths are per level, highest resolution first; ``*_blocks`` = ResNet blocks per level (our
    ``num_res_blocks``: the decoder has ``decoder_blocks + 1`` per level, as in both libraries);
    ``condition_widths`` = the condition branch's layer widths, ``None`` without the branch.
    """

    in_channels: int
    out_channels: int
    latent_channels: int
    encoder_widths: Tuple[int, ...]
    encoder_blocks: int
    decoder_widths: Tuple[int, ...]
    decoder_blocks: int
    condition_widths: Optional[Tuple[int, ...]]
    quant_conv: bool = True
    batch_norm: bool = False  # FLUX.2's latent BatchNorm statistics (bn.*)

    @property
    def symmetric(self) -> bool:
        """Decoder as wide and deep as the encoder and without condition branch: diffusers' plain AutoencoderKL."""
        return (self.condition_widths is None and self.decoder_widths == self.encoder_widths
                and self.decoder_blocks == self.encoder_blocks)

    @property
    def diffusers_class(self) -> str:
        if self.batch_norm:
            if self.condition_widths is not None:
                raise CheckpointError(
                    "a decoder with condition branch in FLUX.2's latent space (latent BatchNorm statistics bn.*) has "
                    f"no diffusers class: {ASYMMETRIC_CLASS} has no BatchNorm to hold them (its from_pretrained would "
                    f"drop them) and {FLUX2_CLASS} no condition branch; keep it in our format, or export its "
                    "decoder without the branch (configs/autoencoder/flux2/vanilla.yaml)")
            if self.decoder_blocks != self.encoder_blocks:
                raise CheckpointError(
                    f"{FLUX2_CLASS} has one layers_per_block for encoder and decoder; this decoder has "
                    f"{self.decoder_blocks} blocks per level, the encoder {self.encoder_blocks}")
            return FLUX2_CLASS
        if self.condition_widths is not None:
            return ASYMMETRIC_CLASS
        if self.symmetric:
            return SYMMETRIC_CLASS
        raise CheckpointError(
            "a decoder without condition branch that differs from the encoder "
            f"(encoder widths {list(self.encoder_widths)} x {self.encoder_blocks} blocks, decoder "
            f"{list(self.decoder_widths)} x {self.decoder_blocks}) has no diffusers class: AsymmetricAutoencoderKL "
            "needs the condition branch, AutoencoderKL a decoder equal to the encoder")

    def describe(self) -> str:
        cond = (f"condition branch {list(self.condition_widths)}" if self.condition_widths is not None
                else "no condition branch")
        return (f"encoder widths {list(self.encoder_widths)} x {self.encoder_blocks} blocks; decoder widths "
                f"{list(self.decoder_widths)} x {self.decoder_blocks} (+1) blocks, {cond}; "
                f"latent channels {self.latent_channels}, {'with' if self.quant_conv else 'no'} quant convs"
                + (", latent BatchNorm statistics (FLUX.2)" if self.batch_norm else ""))

    # ------------------------------------------------------------------ our side
    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "AutoencoderLayout":
        """Read the layout off a state dict in our keys (``encoder.*``, ``decoder.*``, ``quant_conv.*`` ...)."""
        def shape(key: str) -> Tuple[int, ...]:
            if key not in state_dict:
                raise CheckpointError(f"not an autoencoder state dict in our key layout: {key} is missing "
                                      f"(first keys: {', '.join(sorted(state_dict)[:4])})")
            return tuple(state_dict[key].shape)

        attn = [k for k in state_dict if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)]
        if attn:
            raise CheckpointError(f"attention inside the resolution levels ({attn[0]}, attn_resolutions non-empty) "
                                  "has no diffusers counterpart")

        enc_widths, enc_blocks = level_widths(state_dict, "encoder.down.")
        dec_widths, dec_blocks = level_widths(state_dict, "decoder.up.")
        if shape("encoder.conv_in.weight")[0] != enc_widths[0]:
            raise CheckpointError("encoder.conv_in is narrower than the first level (ch_mult[0] != 1): diffusers' "
                                  "Encoder cannot hold it")
        z_enc = shape("encoder.conv_out.weight")[0] // 2
        z_dec = shape("decoder.conv_in.weight")[1]
        quant = "quant_conv.weight" in state_dict or "post_quant_conv.weight" in state_dict
        latent = shape("quant_conv.weight")[0] // 2 if quant else z_enc
        if not latent == z_enc == z_dec == (shape("post_quant_conv.weight")[0] if quant else latent):
            raise CheckpointError(f"latent channels differ (encoder {z_enc}, quant_conv {latent}, decoder {z_dec}): "
                                  "diffusers has one latent_channels")
        n_cond = len({k.split(".")[3] for k in state_dict if k.startswith("decoder.encoder.layers.")})
        if n_cond and shape("decoder.encoder.layers.0.weight")[1] != shape("decoder.conv_out.weight")[0]:
            raise CheckpointError(_NO_ASUKA_BRANCH + " (this condition branch reads the mask: concat_mask)")
        cond = tuple(shape(f"decoder.encoder.layers.{k}.weight")[0] for k in range(n_cond)) if n_cond else None
        return cls(in_channels=shape("encoder.conv_in.weight")[1], out_channels=shape("decoder.conv_out.weight")[0],
                   latent_channels=latent, encoder_widths=tuple(enc_widths), encoder_blocks=enc_blocks,
                   decoder_widths=tuple(dec_widths), decoder_blocks=dec_blocks - 1, condition_widths=cond,
                   quant_conv=quant, batch_norm="bn.running_mean" in state_dict)

    @classmethod
    def from_ldm_config(cls, ddconfig: Mapping[str, Any], decoder_overrides: Optional[Mapping[str, Any]] = None,
                        embed_dim: Optional[int] = None, use_quant_conv: bool = True,
                        batch_norm: bool = False) -> "AutoencoderLayout":
        """The layout an ``AutoencoderKL(ddconfig, decoder_overrides=..., embed_dim=..., use_quant_conv=...,
        latent_batch_norm=...)`` builds (``batch_norm``: ``latent_batch_norm`` is set)."""
        dec = {**ddconfig, **dict(decoder_overrides or {})}
        if ddconfig.get("attn_resolutions") or dec.get("attn_resolutions"):
            raise CheckpointError("attn_resolutions must be empty: attention inside the levels has no diffusers "
                                  "counterpart")
        cond = None
        if dec.get("condition", False):
            options = {k: dec[k] for k in ("concat_mask", "gate_conv") if dec.get(k)}
            if dec.get("mask_resize", "nearest") != "nearest":
                options["mask_resize"] = dec["mask_resize"]
            if dec.get("last_blend", "hard") != "hard":  # not the paper's last level: diffusers has only that one
                options["last_blend"] = dec["last_blend"]
            if options:
                raise CheckpointError(f"{_NO_ASUKA_BRANCH} (the config sets {options})")
            cond = tuple(dec.get("condition_widths") or default_condition_widths(dec["ch"], dec["ch_mult"]))
        return cls(in_channels=ddconfig["in_channels"], out_channels=dec["out_ch"],
                   latent_channels=embed_dim or ddconfig["z_channels"],
                   encoder_widths=tuple(ddconfig["ch"] * m for m in ddconfig["ch_mult"]),
                   encoder_blocks=ddconfig["num_res_blocks"],
                   decoder_widths=tuple(dec["ch"] * m for m in dec["ch_mult"]),
                   decoder_blocks=dec["num_res_blocks"], condition_widths=cond, quant_conv=bool(use_quant_conv),
                   batch_norm=bool(batch_norm))

    def to_ldm_config(self, resolution: int = 256) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """``(ddconfig, decoder_overrides)`` for our ``AutoencoderKL`` (``embed_dim`` = ``latent_channels``)."""
        def ch_and_mult(widths: Sequence[int], what: str) -> Tuple[int, List[int]]:
            if any(w % widths[0] for w in widths):
                raise CheckpointError(f"{what} widths {list(widths)} are not multiples of the first one")
            return widths[0], [w // widths[0] for w in widths]

        ch, ch_mult = ch_and_mult(self.encoder_widths, "encoder")
        dch, dmult = ch_and_mult(self.decoder_widths, "decoder")
        ddconfig = dict(double_z=True, z_channels=self.latent_channels, resolution=resolution,
                        in_channels=self.in_channels, out_ch=self.out_channels, ch=ch, ch_mult=ch_mult,
                        num_res_blocks=self.encoder_blocks, attn_resolutions=[], dropout=0.0)
        overrides: Dict[str, Any] = dict(ch=dch, ch_mult=dmult, num_res_blocks=self.decoder_blocks,
                                         condition=self.condition_widths is not None)
        if self.condition_widths is not None and list(self.condition_widths) != default_condition_widths(dch, dmult):
            overrides["condition_widths"] = list(self.condition_widths)
        return ddconfig, overrides

    # ------------------------------------------------------------------ diffusers side
    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "AutoencoderLayout":
        """Read a diffusers ``config.json`` (AsymmetricAutoencoderKL, AutoencoderKL or AutoencoderKLFlux2); refuse
        what we cannot build."""
        name = config.get("_class_name", ASYMMETRIC_CLASS if "up_block_out_channels" in config else SYMMETRIC_CLASS)
        if name not in (ASYMMETRIC_CLASS, SYMMETRIC_CLASS, FLUX2_CLASS):
            raise CheckpointError(f"diffusers class {name!r} is not an {ASYMMETRIC_CLASS}, {SYMMETRIC_CLASS} or "
                                  f"{FLUX2_CLASS}")
        problems = []
        if config.get("act_fn", "silu") != "silu":
            problems.append(f"act_fn {config['act_fn']!r} (ours: silu)")
        if config.get("norm_num_groups", NORM_GROUPS) != NORM_GROUPS:
            problems.append(f"norm_num_groups {config['norm_num_groups']} (ours: {NORM_GROUPS})")
        if not config.get("mid_block_add_attention", True):
            problems.append("mid_block_add_attention false (ours always has it)")
        quant = config.get("use_quant_conv", True)
        if quant != config.get("use_post_quant_conv", True):
            problems.append("use_quant_conv != use_post_quant_conv (ours has both quant convs or neither)")
        if name == ASYMMETRIC_CLASS:
            enc, enc_blocks = config["down_block_out_channels"], config["layers_per_down_block"]
            dec, dec_blocks = config["up_block_out_channels"], config["layers_per_up_block"]
        elif name == FLUX2_CLASS:
            # the class's defaults are FLUX.2's VAE; decoder_block_out_channels: BFL's smaller decoder
            enc = config.get("block_out_channels", FLUX2_DEFAULTS["block_out_channels"])
            dec = config.get("decoder_block_out_channels") or enc
            enc_blocks = dec_blocks = config.get("layers_per_block", FLUX2_DEFAULTS["layers_per_block"])
            patch = list(config.get("patch_size") or [FLUX2_BATCH_NORM.patch_size] * 2)
            if len(patch) != 2 or patch[0] != patch[1]:
                problems.append(f"patch_size {patch} (ours: square patches)")
        else:
            enc = dec = config["block_out_channels"]
            enc_blocks = dec_blocks = config["layers_per_block"]
        down_types = config.get("down_block_types", ["DownEncoderBlock2D"] * len(enc))
        up_types = config.get("up_block_types", ["UpDecoderBlock2D"] * len(dec))
        if list(down_types) != ["DownEncoderBlock2D"] * len(enc):
            problems.append(f"down_block_types {list(down_types)} (ours: DownEncoderBlock2D per level)")
        if list(up_types) != ["UpDecoderBlock2D"] * len(dec):
            problems.append(f"up_block_types {list(up_types)} (ours: UpDecoderBlock2D per level)")
        if problems:
            raise CheckpointError(f"diffusers {name} config has no counterpart here: " + "; ".join(problems))
        cond = None
        if name == ASYMMETRIC_CLASS:
            if len(dec) + 1 > DIFFUSERS_CONDITION_LAYERS:
                raise CheckpointError(f"{len(dec)} decoder levels: diffusers' condition encoder only serves up to "
                                      f"{DIFFUSERS_CONDITION_LAYERS - 1}")
            cond = tuple(diffusers_condition_widths(dec[0], dec[-1])[:len(dec) + 1])
        default_latent = FLUX2_DEFAULTS["latent_channels"] if name == FLUX2_CLASS else 4
        return cls(in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
                   latent_channels=config.get("latent_channels", default_latent), encoder_widths=tuple(enc),
                   encoder_blocks=enc_blocks, decoder_widths=tuple(dec), decoder_blocks=dec_blocks,
                   condition_widths=cond, quant_conv=bool(quant), batch_norm=name == FLUX2_CLASS)

    def to_diffusers_config(self, sample_size: int = 256,
                            normalization: Optional[Normalization] = None) -> Dict[str, Any]:
        """``config.json`` contents (without ``_class_name``/``_diffusers_version``) of :attr:`diffusers_class`;
        ``normalization``: the latent space's (default SD 1.x's scale, FLUX.2's BatchNorm for its layout)."""
        flux2 = self.diffusers_class == FLUX2_CLASS
        norm = normalization if normalization is not None else FLUX2_BATCH_NORM if flux2 else SD.normalization
        if flux2 != isinstance(norm, PatchBatchNorm):
            raise CheckpointError(f"diffusers {self.diffusers_class} cannot carry the latent normalisation "
                                  f"{norm.describe()}" + ("" if flux2 else " (only AutoencoderKLFlux2 holds the "
                                                              "BatchNorm statistics)"))
        common = dict(in_channels=self.in_channels, out_channels=self.out_channels,
                      down_block_types=["DownEncoderBlock2D"] * len(self.encoder_widths),
                      up_block_types=["UpDecoderBlock2D"] * len(self.decoder_widths), act_fn="silu",
                      latent_channels=self.latent_channels, norm_num_groups=NORM_GROUPS, sample_size=sample_size,
                      **{"scaling_factor": norm.scale, **norm.to_diffusers()})
        if self.diffusers_class == FLUX2_CLASS:
            del common["scaling_factor"], common["down_block_types"], common["up_block_types"]
            config = dict(common, down_block_types=["DownEncoderBlock2D"] * len(self.encoder_widths),
                          up_block_types=["UpDecoderBlock2D"] * len(self.decoder_widths),
                          block_out_channels=list(self.encoder_widths), layers_per_block=self.encoder_blocks,
                          use_quant_conv=self.quant_conv, use_post_quant_conv=self.quant_conv)
            if self.decoder_widths != self.encoder_widths:
                config["decoder_block_out_channels"] = list(self.decoder_widths)
            return config
        if self.diffusers_class == SYMMETRIC_CLASS:
            return dict(common, block_out_channels=list(self.encoder_widths), layers_per_block=self.encoder_blocks,
                        use_quant_conv=self.quant_conv, use_post_quant_conv=self.quant_conv)
        self.check_condition_fits_diffusers()
        return dict(common, down_block_out_channels=list(self.encoder_widths),
                    layers_per_down_block=self.encoder_blocks, up_block_out_channels=list(self.decoder_widths),
                    layers_per_up_block=self.decoder_blocks)

    def check_condition_fits_diffusers(self) -> List[int]:
        """diffusers derives the branch widths from the decoder widths; ours must be a prefix of them."""
        theirs = diffusers_condition_widths(self.decoder_widths[0], self.decoder_widths[-1])
        ours = list(self.condition_widths or ())
        if len(ours) > len(theirs) or ours != theirs[:len(ours)]:
            raise CheckpointError(f"condition branch widths {ours} differ from the ones diffusers builds for decoder "
                                  f"widths {list(self.decoder_widths)}: {theirs}")
        if ours[0] == ours[1]:
            # diffusers keys features by shape: two full-resolution layers of one width would overwrite each other
            raise CheckpointError(f"condition branch widths {ours}: the first two layers have the same width, which "
                                  "diffusers cannot tell apart")
        return theirs


# ---------------------------------------------------------------------- key mapping
def _ldm_key_to_diffusers(key: str, n_up: int) -> str:
    if key.startswith("decoder.encoder.layers."):
        return "decoder.condition_encoder." + key[len("decoder.encoder."):]
    m = _OURS_LEVEL.match(key)
    if m:
        part, level, block, j = m.groups()
        if part == "encoder.down":
            new = f"encoder.down_blocks.{level}."
        else:
            new = f"decoder.up_blocks.{n_up - 1 - int(level)}."
        new += f"resnets.{j}." if j is not None else f"{block}rs.0."  # downsample -> downsamplers.0
        key = new + key[m.end():]
    for ours, theirs in _RENAMES:
        key = key.replace(ours, theirs)
    return key


def _normalize_legacy_attention(key: str) -> str:
    if ".attentions.0." in key:
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace(old, new)
    return key


def _diffusers_key_to_ldm(key: str, n_up: int) -> str:
    if key.startswith("decoder.condition_encoder.layers."):
        return "decoder.encoder." + key[len("decoder.condition_encoder."):]
    m = _DIFFUSERS_LEVEL.match(key)
    if m:
        part, level, block, j = m.groups()
        if part == "encoder.down_blocks":
            new = f"encoder.down.{level}."
        else:
            new = f"decoder.up.{n_up - 1 - int(level)}."
        new += f"block.{j}." if j is not None else block[:-len("rs.0")] + "."  # downsamplers.0 -> downsample
        key = new + key[m.end():]
    for ours, theirs in _RENAMES:
        key = key.replace(theirs, ours)
    return key


def ldm_to_diffusers(state_dict: Mapping[str, torch.Tensor], ddconfig: Optional[Mapping[str, Any]] = None,
                     decoder_overrides: Optional[Mapping[str, Any]] = None, *, sample_size: Optional[int] = None,
                     use_quant_conv: Optional[bool] = None,
                     normalization: Optional[Normalization] = None) -> Tuple[StateDict, Dict[str, Any]]:
    """Our (or the original release's) autoencoder state dict -> ``(diffusers state dict, diffusers config)``.

    The architecture is read from the tensors; ``ddconfig``/``decoder_overrides`` (as in our configs), when given,
    must describe the same one (a config with ``condition: false`` accepts a checkpoint that carries the branch:
    diffusers keeps it, and decoding without image/mask ignores it; ``use_quant_conv``, when given, too).
    ``config["_class_name"]`` is ``AsymmetricAutoencoderKL`` with a condition branch, ``AutoencoderKL`` for a plain
    VAE. ``normalization``: the latent space's (our model's ``latent_norm``; default SD 1.x's, or FLUX.2's for its
    layout), written to ``config.json``. A VAE without quant convs gets identity ones in ``AsymmetricAutoencoderKL``
    (see the module docstring).
    """
    sd = drop_unused_keys(state_dict)
    layout = AutoencoderLayout.from_state_dict(sd)
    if ddconfig is not None:
        check_layout_matches_config(layout, ddconfig, decoder_overrides,
                                    layout.quant_conv if use_quant_conv is None else use_quant_conv)
    config = {"_class_name": layout.diffusers_class,
              **layout.to_diffusers_config(sample_size or (ddconfig or {}).get("resolution", 256), normalization)}

    n_up = len(layout.decoder_widths)
    out: StateDict = {}
    for key, tensor in sd.items():
        if not key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")):
            raise CheckpointError(f"unexpected key {key!r}: not part of an autoencoder")
        new = _ldm_key_to_diffusers(key, n_up)
        if _ATTENTION_WEIGHT.search(new):
            tensor = tensor[:, :, 0, 0]  # 1x1 conv -> Linear
        out[new] = tensor
    if layout.condition_widths is not None:
        theirs = layout.check_condition_fits_diffusers()
        ref = sd["decoder.encoder.layers.0.weight"]
        for k in range(len(layout.condition_widths), DIFFUSERS_CONDITION_LAYERS):
            # never read by diffusers for this decoder depth (see module docstring): zeros
            out[f"decoder.condition_encoder.layers.{k}.weight"] = ref.new_zeros(theirs[k], theirs[k - 1], 4, 4)
            out[f"decoder.condition_encoder.layers.{k}.bias"] = ref.new_zeros(theirs[k])
    if not layout.quant_conv and layout.diffusers_class == ASYMMETRIC_CLASS:
        ref = sd["decoder.conv_in.weight"]
        for name, channels in (("quant_conv", 2 * layout.latent_channels), ("post_quant_conv", layout.latent_channels)):
            out[f"{name}.weight"] = torch.eye(channels, dtype=ref.dtype)[:, :, None, None]
            out[f"{name}.bias"] = ref.new_zeros(channels)
    return out, config


def _is_identity_conv(state_dict: Mapping[str, torch.Tensor], name: str) -> bool:
    weight, bias = state_dict.get(f"{name}.weight"), state_dict.get(f"{name}.bias")
    if weight is None or bias is None or weight.ndim != 4 or weight.shape[0] != weight.shape[1]:
        return False
    eye = torch.eye(weight.shape[0], dtype=weight.dtype)[:, :, None, None]
    return bool(torch.equal(weight, eye) and not bias.any())


def diffusers_to_ldm(diffusers_state_dict: Mapping[str, torch.Tensor], diffusers_config: Mapping[str, Any]
                     ) -> Tuple[StateDict, Dict[str, Any]]:
    """Inverse of :func:`ldm_to_diffusers`: ``(state dict in our keys, decoder_overrides)``.

    ``decoder_overrides`` (``ch``, ``ch_mult``, ``num_res_blocks``, ``condition`` and, only when they are not the
    default ones, ``condition_widths``) go over the SD ``ddconfig`` in our autoencoder configs;
    :func:`diffusers_config_to_ldm` gives the ``ddconfig`` too.
    """
    layout = AutoencoderLayout.from_diffusers_config(diffusers_config)
    n_up = len(layout.decoder_widths)
    n_cond = len(layout.condition_widths or ())
    quant_convs = ("quant_conv", "post_quant_conv")
    if layout.diffusers_class == ASYMMETRIC_CLASS and all(_is_identity_conv(diffusers_state_dict, n)
                                                         for n in quant_convs):
        # how a VAE without quant convs is exported (module docstring); identity convs compute nothing
        log.info("quant_conv and post_quant_conv are identity convs: read as a VAE without quant convs "
                 "(use_quant_conv: false)")
        diffusers_state_dict = {k: v for k, v in diffusers_state_dict.items() if not k.startswith(quant_convs)}
    out: StateDict = {}
    dead = 0
    for key, tensor in diffusers_state_dict.items():
        m = re.match(r"decoder\.condition_encoder\.layers\.(\d+)\.", key)
        if m and int(m.group(1)) >= n_cond:
            dead += 1
            continue
        key = _normalize_legacy_attention(key)
        if _ATTENTION_WEIGHT.search(key) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear -> 1x1 conv
        out[_diffusers_key_to_ldm(key, n_up)] = tensor
    if dead:
        log.info("dropped %d condition-encoder tensors past layer %d: diffusers builds them for 4 levels, a "
                 "%d-level decoder never reads them", dead, n_cond - 1, n_up)
    return out, layout.to_ldm_config()[1]


def diffusers_config_to_ldm(diffusers_config: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(ddconfig, decoder_overrides)`` of our ``AutoencoderKL`` for a diffusers config (``embed_dim`` =
    ``ddconfig["z_channels"]``)."""
    layout = AutoencoderLayout.from_diffusers_config(diffusers_config)
    return layout.to_ldm_config(resolution=diffusers_config.get("sample_size", 256))


def check_layout_matches_config(layout: AutoencoderLayout, ddconfig: Mapping[str, Any],
                                decoder_overrides: Optional[Mapping[str, Any]], use_quant_conv: bool = True) -> None:
    """Raise :class:`CheckpointError` listing every field where the tensors' layout and our config differ."""
    # the latent BatchNorm is not part of ddconfig: the tensors say whether there is one
    expected = AutoencoderLayout.from_ldm_config(ddconfig, decoder_overrides, use_quant_conv=use_quant_conv,
                                                 batch_norm=layout.batch_norm)
    if expected.condition_widths is None and layout.condition_widths is not None:
        log.info("the config has condition: false but the checkpoint carries a condition branch; it is kept "
                 "(decode without image/mask to ignore it)")
        expected = dataclasses.replace(expected, condition_widths=layout.condition_widths)
    if expected != layout:
        diffs = [f"{f.name}: config {getattr(expected, f.name)}, checkpoint {getattr(layout, f.name)}"
                 for f in dataclasses.fields(expected) if getattr(expected, f.name) != getattr(layout, f.name)]
        raise CheckpointError("the checkpoint does not match the config: " + "; ".join(diffs))


def read_diffusers_folder(folder: PathLike) -> Tuple[StateDict, Dict[str, Any]]:
    """A diffusers ``AsymmetricAutoencoderKL``/``AutoencoderKL`` folder (``config.json`` + weights) ->
    ``(state dict in our keys, decoder_overrides)``. Weights: ``.safetensors`` (also sharded) or a ``.bin`` read
    with ``weights_only=True``."""
    folder, state_dict, config = read_diffusers_files(folder)
    if config.get("_class_name") == QWENIMAGE_CLASS:
        return diffusers_qwenimage_to_ours(state_dict, config, source=folder)
    log.info("%s: latent scaling_factor %s, shift_factor %s (our configs carry their own)", folder,
             config.get("scaling_factor"), config.get("shift_factor"))
    try:
        return diffusers_to_ldm(state_dict, config)
    except KeyError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: missing entry {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None


def check_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Build the diffusers model of ``config`` on the meta device (no memory) and require exactly its keys and
    shapes, so that ``from_pretrained`` never fills a missing weight with random numbers."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    accepted = inspect.signature(cls.__init__).parameters  # shift_factor is not AsymmetricAutoencoderKL's
    with torch.device("meta"):
        model = cls(**{k: v for k, v in config.items() if k in accepted})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [f"{k}: {tuple(state_dict[k].shape)} vs {expected[k]}" for k in sorted(expected)
                  if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(f"converted weights do not fit diffusers {cls.__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, other shapes {mis_shaped[:5]}")


def write_diffusers_folder(state_dict: Mapping[str, torch.Tensor], ddconfig: Optional[Mapping[str, Any]],
                           decoder_overrides: Optional[Mapping[str, Any]], folder: PathLike, *,
                           overwrite: bool = False, sample_size: Optional[int] = None,
                           use_quant_conv: Optional[bool] = None,
                           normalization: Optional[Normalization] = None, architecture: str = "kl") -> Path:
    """Write our state dict as a folder that ``diffusers.AsymmetricAutoencoderKL.from_pretrained`` (or
    ``AutoencoderKL`` for a VAE without condition branch) loads: ``config.json`` + ``.safetensors``.

    ``ddconfig``/``decoder_overrides`` may be ``None`` (architecture read from the tensors). The folder appears
    complete or not at all: it is written next to its destination and renamed into place. An existing folder is
    replaced only with ``overwrite`` and only when it holds a model export alone (``ldm.util.check_output``).
    ``architecture`` ``qwenimage``: a vanilla Qwen-Image VAE as ``AutoencoderKLQwenImage``
    (:func:`ldm.checkpoints.qwenimage.ours_to_diffusers_qwenimage`; ``ddconfig`` required).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder = check_output(folder, overwrite=overwrite, folder=True, replaceable=is_model_export)
    if architecture == "qwenimage":
        if ddconfig is None:
            raise CheckpointError("a Qwen-Image export needs the model's ddconfig")
        sd, config = ours_to_diffusers_qwenimage(state_dict, {**ddconfig, **dict(decoder_overrides or {})},
                                                 normalization)
    else:
        sd, config = ldm_to_diffusers(state_dict, ddconfig, decoder_overrides, sample_size=sample_size,
                                      use_quant_conv=use_quant_conv, normalization=normalization)
    check_diffusers_state_dict(sd, config)
    try:
        from importlib.metadata import version

        config["_diffusers_version"] = version("diffusers")
    except Exception:  # noqa: BLE001 - the version is informative only
        pass

    folder.parent.mkdir(parents=True, exist_ok=True)
    # named as write_atomically's temporaries, so that ldm.util.remove_stale_temporaries finds one a kill left
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, default_file_mode(directory=True))  # mkdtemp's 0700 would hide the folder from the group
    old = None
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # safetensors wants contiguous tensors with their own storage
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        for written in tmp.iterdir():  # safetensors writes 0600 files: give them the usual permissions
            os.chmod(written, default_file_mode())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except (OSError, SafetensorError) as e:
        raise write_failed(folder, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None and old.is_dir():
            shutil.rmtree(old)
        elif old is not None:
            old.unlink()
    log.info("wrote diffusers %s to %s", config["_class_name"], folder)
    return folder
