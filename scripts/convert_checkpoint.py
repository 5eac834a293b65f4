r"""Convert autoencoder checkpoints between the original release, our files and diffusers folders.

    # the paper's release (or our .ckpt/.safetensors) -> a diffusers AsymmetricAutoencoderKL folder
    python scripts/convert_checkpoint.py to-diffusers larger1.5.ckpt models/asym-x-1-5 \
        [--config configs/autoencoder/autoencoder_kl_32x32x4_large.yaml]
    # another latent space: its config (or --latent_space sdxl|sd3|flux|flux2) gives the latent normalisation
    python scripts/convert_checkpoint.py to-diffusers flux_base.ckpt models/flux-asym-base \
        --config configs/autoencoder/flux/asymmetric_base.yaml
    # FLUX.2's VAE (BFL's ae.safetensors, or ours without condition branch) -> diffusers AutoencoderKLFlux2
    python scripts/convert_checkpoint.py to-diffusers ae.safetensors models/flux2-vae \
        --config configs/autoencoder/flux2/vanilla.yaml
    # a diffusers AsymmetricAutoencoderKL / AutoencoderKL folder -> our keys (.ckpt or .safetensors by extension)
    python scripts/convert_checkpoint.py from-diffusers asymmetric-autoencoder-kl-x-1-5 larger1.5.safetensors
    # a single-file SD 1.x/2.x, SDXL or SD 3.x checkpoint -> its VAE, the starting point of training
    python scripts/convert_checkpoint.py extract-vae v1-5-pruned-emaonly.ckpt stable_vqgan.ckpt
    # .ckpt <-> .safetensors, optionally without the keys no decoder reads (decoder.up_layers.*, loss.*)
    python scripts/convert_checkpoint.py reformat base.ckpt base.safetensors [--strip]
    # a FLUX.2 checkpoint in BFL's ae.safetensors key layout (quant convs inside encoder / decoder)
    python scripts/convert_checkpoint.py reformat flux2_vae.ckpt ae.safetensors --bfl_flux2

The architecture (widths, blocks per level, condition branch, latent channels, quant convs) is read from the
tensors and printed; ``--config`` checks it against one of our autoencoder configs. A VAE without quant convs
(SD 3.x, FLUX.1) gets identity quant convs in an AsymmetricAutoencoderKL folder (exact; read back as none). FLUX.2's
VAE (latent BatchNorm statistics) becomes an AutoencoderKLFlux2 folder; a FLUX.2 decoder with condition branch is
refused (AsymmetricAutoencoderKL cannot hold the statistics).
Existing outputs are kept unless ``--overwrite``, and even then only what this tool writes is replaced: a
checkpoint file, or a folder holding a model export alone (``config.json`` + weights); never an input or a folder
that contains one. Outputs appear complete or not at all (a full disk is one line naming the file).
Exit status: 0 done, 2 bad input or a failed write (message on stderr).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from ldm.checkpoints.architecture import default_latent_space
from ldm.checkpoints.diffusers import (
    AutoencoderLayout,
    check_layout_matches_config,
    diffusers_config_to_ldm,
    ldm_normalization,
    normalization_config,
    read_diffusers_folder,
    write_diffusers_folder,
)
from ldm.checkpoints.files import (
    TORCH_SUFFIXES,
    CheckpointError,
    StateDict,
    is_model_export,
    read_diffusers_config,
    save_state_dict,
)
from ldm.checkpoints.keys import read_state_dict
from ldm.checkpoints.tensors import (
    SINGLE_FILE_VAE_PREFIXES,
    autoencoder_state_dict,
    describe_decoder_checkpoint,
    drop_unused_keys,
    from_bfl_flux2_layout,
    single_file_vae_prefix,
    strip_prefix,
    to_bfl_flux2_layout,
)
from ldm.latent_spaces import LATENT_SPACES, SD, describe_latent_layout
from ldm.project import load_yaml
from ldm.util import WriteError, check_output, remove_stale_temporaries

VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "bn.")
FILE_SUFFIXES = sorted(TORCH_SUFFIXES - {".bin"} | {".safetensors"})
WEIGHT_SUFFIXES = TORCH_SUFFIXES | {".safetensors"}


def read_autoencoder(path: Path) -> StateDict:
    """Our/original autoencoder tensors; a single-file diffusion checkpoint gives its VAE."""
    return autoencoder_state_dict(read_state_dict(path), source=path)


def load_config(path: Path) -> Dict[str, Any]:
    """``model.params`` of one of our autoencoder YAMLs (``ddconfig``, ``decoder_overrides``, ``embed_dim``,
    ``use_quant_conv``, ``scaling_factor``, ``shift_factor`` ...)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    cfg = OmegaConf.to_container(load_yaml(path), resolve=True)
    params = (cfg.get("model", cfg) or {}).get("params", {})
    if "ddconfig" not in params:
        raise ValueError(f"--config {path}: no model.params.ddconfig (not an autoencoder config)")
    return params


def describe(sd: StateDict) -> str:
    return f"{AutoencoderLayout.from_state_dict(sd).describe()}\n  {describe_decoder_checkpoint(sd)}"


def latent_scaling(opt: argparse.Namespace, params: Dict[str, Any], layout: AutoencoderLayout) -> Tuple[float, float]:
    """``(scaling_factor, shift_factor)`` for config.json: the flags, else --config, else --latent_space, else the
    only known latent space with the tensors' layout (SD 1.x for 4 channels with quant convs, as before)."""
    if opt.latent_space is not None:
        space = LATENT_SPACES[opt.latent_space]
        if ((space.channels, space.quant_conv, space.normalization == "batch_norm")
                != (layout.latent_channels, layout.quant_conv, layout.batch_norm)):
            raise ValueError(f"--latent_space {opt.latent_space}: {space.models} has {space.channels} latent channels "
                             f"{'with' if space.quant_conv else 'without'} quant convs, the checkpoint "
                             f"{describe_latent_layout(layout.latent_channels, layout.quant_conv)}"
                             + (" and latent BatchNorm statistics" if layout.batch_norm else ""))
        default = (space.scaling_factor, space.shift_factor)
    elif "scaling_factor" in params or "shift_factor" in params or opt.config is not None:
        default = (params.get("scaling_factor", SD.scaling_factor), params.get("shift_factor", SD.shift_factor))
    else:
        # SD 1.x for 4 channels with quant convs (SDXL's VAE needs --latent_space sdxl)
        space = default_latent_space(layout.latent_channels, layout.quant_conv)
        if space is None and (opt.scaling_factor is None or opt.shift_factor is None):
            raise ValueError(f"the checkpoint has {describe_latent_layout(layout.latent_channels, layout.quant_conv)}: "
                             "pass --config or --latent_space (or --scaling_factor and --shift_factor) to say which")
        default = (space.scaling_factor, space.shift_factor) if space else (None, None)
    scale = default[0] if opt.scaling_factor is None else opt.scaling_factor
    shift = default[1] if opt.shift_factor is None else opt.shift_factor
    return float(scale), float(shift)


def describe_normalization(diffusers_config: Dict[str, Any]) -> str:
    """The latent normalisation of a diffusers VAE config as our model params ('scaling_factor 0.3611, ...')."""
    return ", ".join(f"{k} {v}" for k, v in ldm_normalization(diffusers_config).items())


def to_diffusers(opt: argparse.Namespace) -> None:
    params: Dict[str, Any] = {}
    ddconfig = overrides = None
    if opt.config is not None:
        params = load_config(opt.config)
        ddconfig, overrides, embed_dim = params["ddconfig"], params.get("decoder_overrides"), params.get("embed_dim")
        if embed_dim is not None and embed_dim != ddconfig["z_channels"]:
            raise ValueError(f"--config {opt.config}: embed_dim {embed_dim} != z_channels "
                             f"{ddconfig['z_channels']}; diffusers has one latent_channels")
    sd = read_autoencoder(opt.input)
    print(f"{opt.input}: {describe(sd)}")
    layout = AutoencoderLayout.from_state_dict(drop_unused_keys(sd))
    use_quant_conv = params.get("use_quant_conv", True)
    if ddconfig is not None:
        try:
            check_layout_matches_config(layout, ddconfig, overrides, use_quant_conv)
        except CheckpointError as e:
            raise CheckpointError(f"{opt.input} vs --config {opt.config}: {e}") from None
    scale, shift = latent_scaling(opt, params, layout)
    write_diffusers_folder(sd, ddconfig, overrides, opt.output, overwrite=opt.overwrite, scaling_factor=scale,
                           shift_factor=shift, normalization=normalization_config(params))
    config = read_diffusers_config(opt.output)
    cls = config["_class_name"]
    print(f"wrote {opt.output} (diffusers {cls}; load with {cls}.from_pretrained); {describe_normalization(config)}")
    if not layout.quant_conv and cls == "AsymmetricAutoencoderKL":
        print("  the VAE has no quant convs: AsymmetricAutoencoderKL holds identity ones (exact in float32)")


def from_diffusers(opt: argparse.Namespace) -> None:
    sd, overrides = read_diffusers_folder(opt.input)
    config = read_diffusers_config(opt.input)
    ddconfig, _ = diffusers_config_to_ldm(config)
    save_state_dict(sd, opt.output, metadata={"source": str(opt.input), "converted_by": "from-diffusers"})
    print(f"{opt.input}: {describe(sd)}")
    print(f"wrote {opt.output} ({len(sd)} tensors); config: ddconfig ch {ddconfig['ch']}, ch_mult "
          f"{ddconfig['ch_mult']}, num_res_blocks {ddconfig['num_res_blocks']}, z_channels {ddconfig['z_channels']}; "
          f"decoder_overrides {overrides}; use_quant_conv {'quant_conv.weight' in sd}; "
          f"{describe_normalization(config)}")


def extract_vae(opt: argparse.Namespace) -> None:
    full = read_state_dict(opt.input)
    prefix = single_file_vae_prefix(full)
    if prefix is None:
        raise CheckpointError(f"{opt.input}: no VAE under {' or '.join(SINGLE_FILE_VAE_PREFIXES)} (first keys: "
                              f"{', '.join(sorted(full)[:5])})")
    sd = strip_prefix(full, prefix)
    vae = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIXES)}
    absent = [p for p in ("encoder.", "decoder.") if not any(k.startswith(p) for k in vae)]
    if absent:
        raise CheckpointError(f"{opt.input}: {prefix}* has no {', '.join(absent)}* keys: not a VAE")
    if len(vae) < len(sd):
        print(f"left out {len(sd) - len(vae)} {prefix}* tensors outside {', '.join(VAE_PREFIXES)}")
    save_state_dict(vae, opt.output, metadata={"source": str(opt.input), "converted_by": "extract-vae"})
    print(f"{opt.input}: {describe(vae)}")
    print(f"wrote {opt.output} ({len(vae)} tensors)")


def reformat(opt: argparse.Namespace) -> None:
    sd = read_state_dict(opt.input)
    if opt.strip:
        sd = drop_unused_keys(sd)
    if opt.bfl_flux2:
        sd = autoencoder_state_dict(sd, source=opt.input)
        if "bn.running_mean" not in sd:
            raise CheckpointError(f"{opt.input}: no latent BatchNorm statistics (bn.*): not a FLUX.2 autoencoder")
        sd = to_bfl_flux2_layout(from_bfl_flux2_layout(sd, opt.input))
    save_state_dict(sd, opt.output, metadata={"source": str(opt.input), "converted_by": "reformat"})
    print(f"wrote {opt.output} ({len(sd)} tensors)")


COMMANDS = {
    "to-diffusers": (to_diffusers, "our/original .ckpt or .safetensors (or a full SD checkpoint) -> diffusers folder"),
    "from-diffusers": (from_diffusers, "diffusers AsymmetricAutoencoderKL/AutoencoderKL folder -> .ckpt/.safetensors"),
    "extract-vae": (extract_vae, "single-file SD 1.x/2.x, SDXL or SD 3.x checkpoint -> its VAE in our keys"),
    "reformat": (reformat, ".ckpt <-> .safetensors with the same tensors"),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("input", type=Path, help="input checkpoint file or diffusers folder")
        s.add_argument("output", type=Path, help="output folder (to-diffusers) or .ckpt/.safetensors file")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output")
        if name == "to-diffusers":
            s.add_argument("--config", type=Path, default=None,
                           help="our autoencoder YAML; the checkpoint must match its architecture")
            s.add_argument("--latent_space", choices=sorted(LATENT_SPACES), default=None,
                           help="latent space of the checkpoint (scaling and shift for config.json) when no --config "
                                "says it; default: sd for 4 channels with quant convs")
            s.add_argument("--scaling_factor", type=float, default=None,
                           help="latent scaling factor written to config.json (default: from --config/--latent_space)")
            s.add_argument("--shift_factor", type=float, default=None,
                           help="latent shift factor written to config.json (default: from --config/--latent_space)")
        if name == "reformat":
            s.add_argument("--strip", action="store_true",
                           help="leave out decoder.up_layers.* and loss.* (never read at inference)")
            s.add_argument("--bfl_flux2", action="store_true",
                           help="write a FLUX.2 autoencoder in BFL's ae.safetensors key layout (encoder.quant_conv, "
                                "decoder.post_quant_conv, bn.*), which BFL's flux2 code loads")
    opt = p.parse_args(argv)
    if opt.command == "to-diffusers":
        # only a weights-file suffix means a mistake: folder names like hf_x-1.5 or vae.v2 have dots too
        if opt.output.suffix.lower() in WEIGHT_SUFFIXES:
            p.error(f"output {opt.output} must be a folder name, not a {opt.output.suffix} file "
                    "(to-diffusers writes a diffusers folder)")
    elif opt.output.suffix not in FILE_SUFFIXES:
        p.error(f"output {opt.output} must end in one of {FILE_SUFFIXES}")
    return opt


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opt = parse_args(argv)
    try:
        inputs = [opt.input] + ([opt.config] if getattr(opt, "config", None) is not None else [])
        out = check_output(opt.output, inputs=inputs, overwrite=opt.overwrite, folder=opt.command == "to-diffusers",
                           replaceable=is_model_export)
        if out.parent.is_dir():  # what a killed conversion left there
            for stale in remove_stale_temporaries(out.parent, recursive=False, shared=True):
                print(f"removed {stale}, left by an interrupted write")
        COMMANDS[opt.command][0](opt)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
