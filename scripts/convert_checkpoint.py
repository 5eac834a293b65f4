r"""Convert autoencoder checkpoints between the original release, our files and diffusers folders.

    # the paper's release (or our .ckpt/.safetensors) -> a diffusers AsymmetricAutoencoderKL folder
    python scripts/convert_checkpoint.py to-diffusers larger1.5.ckpt models/asym-x-1-5 \
        [--config configs/autoencoder/autoencoder_kl_32x32x4_large.yaml]
    # a diffusers AsymmetricAutoencoderKL / AutoencoderKL folder -> our keys (.ckpt or .safetensors by extension)
    python scripts/convert_checkpoint.py from-diffusers asymmetric-autoencoder-kl-x-1-5 larger1.5.safetensors
    # a full Stable Diffusion v1.x checkpoint -> its VAE, the starting point of training (stable_vqgan.ckpt)
    python scripts/convert_checkpoint.py extract-vae v1-5-pruned-emaonly.ckpt stable_vqgan.ckpt
    # .ckpt <-> .safetensors, optionally without the keys no decoder reads (decoder.up_layers.*, loss.*)
    python scripts/convert_checkpoint.py reformat base.ckpt base.safetensors [--strip]

The architecture (widths, blocks per level, condition branch) is read from the tensors and printed; ``--config``
checks it against one of our autoencoder configs. Existing outputs are kept unless ``--overwrite``.
Exit status: 0 done, 2 bad input (message on stderr).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]

from ldm.checkpoint import TORCH_SUFFIXES, CheckpointError, StateDict, read_state_dict, save_state_dict  # noqa: E402
from ldm.diffusers_interop import (  # noqa: E402
    SD_SCALING_FACTOR, AutoencoderLayout, check_layout_matches_config, diffusers_config_to_ldm, drop_unused_keys,
    read_diffusers_config, read_diffusers_folder, write_diffusers_folder)

SD_PREFIX = "first_stage_model."
VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
FILE_SUFFIXES = sorted(TORCH_SUFFIXES - {".bin"} | {".safetensors"})
WEIGHT_SUFFIXES = TORCH_SUFFIXES | {".safetensors"}


def read_autoencoder(path: Path) -> StateDict:
    """Our/original autoencoder tensors; a full SD checkpoint gives its ``first_stage_model``."""
    sd = read_state_dict(path)
    if "encoder.conv_in.weight" not in sd and f"{SD_PREFIX}encoder.conv_in.weight" in sd:
        print(f"{path}: full Stable Diffusion checkpoint, using its {SD_PREFIX}* weights")
        sd = {k[len(SD_PREFIX):]: v for k, v in sd.items() if k.startswith(SD_PREFIX)}
    return sd


def load_config(path: Path) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]], Optional[int]]:
    """``(ddconfig, decoder_overrides, embed_dim)`` of one of our autoencoder YAMLs."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    params = (cfg.get("model", cfg) or {}).get("params", {})
    if "ddconfig" not in params:
        raise ValueError(f"--config {path}: no model.params.ddconfig (not an autoencoder config)")
    return params["ddconfig"], params.get("decoder_overrides"), params.get("embed_dim")


def describe(sd: StateDict) -> str:
    from ldm.models.autoencoder import describe_decoder_checkpoint

    return f"{AutoencoderLayout.from_state_dict(sd).describe()}\n  {describe_decoder_checkpoint(sd)}"


def to_diffusers(opt: argparse.Namespace) -> None:
    ddconfig = overrides = None
    if opt.config is not None:
        ddconfig, overrides, embed_dim = load_config(opt.config)
        if embed_dim is not None and embed_dim != ddconfig["z_channels"]:
            raise ValueError(f"--config {opt.config}: embed_dim {embed_dim} != z_channels "
                             f"{ddconfig['z_channels']}; diffusers has one latent_channels")
    sd = read_autoencoder(opt.input)
    print(f"{opt.input}: {describe(sd)}")
    if ddconfig is not None:
        try:
            check_layout_matches_config(AutoencoderLayout.from_state_dict(sd), ddconfig, overrides)
        except CheckpointError as e:
            raise CheckpointError(f"{opt.input} vs --config {opt.config}: {e}") from None
    write_diffusers_folder(sd, ddconfig, overrides, opt.output, overwrite=opt.overwrite,
                           scaling_factor=opt.scaling_factor)
    cls = read_diffusers_config(opt.output)["_class_name"]
    print(f"wrote {opt.output} (diffusers {cls}; load with {cls}.from_pretrained)")


def from_diffusers(opt: argparse.Namespace) -> None:
    sd, overrides = read_diffusers_folder(opt.input)
    ddconfig, _ = diffusers_config_to_ldm(read_diffusers_config(opt.input))
    save_state_dict(sd, opt.output, metadata={"source": str(opt.input), "converted_by": "from-diffusers"})
    print(f"{opt.input}: {describe(sd)}")
    print(f"wrote {opt.output} ({len(sd)} tensors); config: ddconfig ch {ddconfig['ch']}, ch_mult "
          f"{ddconfig['ch_mult']}, num_res_blocks {ddconfig['num_res_blocks']}; decoder_overrides {overrides}")


def extract_vae(opt: argparse.Namespace) -> None:
    sd = read_state_dict(opt.input, prefix=SD_PREFIX)
    vae = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIXES)}
    absent = [p for p in VAE_PREFIXES if not any(k.startswith(p) for k in vae)]
    if absent:
        raise CheckpointError(f"{opt.input}: {SD_PREFIX}* has no {', '.join(absent)}* keys: not an SD VAE")
    if len(vae) < len(sd):
        print(f"left out {len(sd) - len(vae)} {SD_PREFIX}* tensors outside {', '.join(VAE_PREFIXES)}")
    save_state_dict(vae, opt.output, metadata={"source": str(opt.input), "converted_by": "extract-vae"})
    print(f"{opt.input}: {describe(vae)}")
    print(f"wrote {opt.output} ({len(vae)} tensors)")


def reformat(opt: argparse.Namespace) -> None:
    sd = read_state_dict(opt.input)
    if opt.strip:
        sd = drop_unused_keys(sd)
    save_state_dict(sd, opt.output, metadata={"source": str(opt.input), "converted_by": "reformat"})
    print(f"wrote {opt.output} ({len(sd)} tensors)")


COMMANDS = {
    "to-diffusers": (to_diffusers, "our/original .ckpt or .safetensors (or a full SD checkpoint) -> diffusers folder"),
    "from-diffusers": (from_diffusers, "diffusers AsymmetricAutoencoderKL/AutoencoderKL folder -> .ckpt/.safetensors"),
    "extract-vae": (extract_vae, "full SD v1.x checkpoint -> its VAE (encoder, decoder, quant convs) in our keys"),
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
            s.add_argument("--scaling_factor", type=float, default=SD_SCALING_FACTOR,
                           help="latent scaling factor written to config.json")
        if name == "reformat":
            s.add_argument("--strip", action="store_true",
                           help="leave out decoder.up_layers.* and loss.* (never read at inference)")
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
    if opt.output.exists() and not opt.overwrite:
        print(f"error: {opt.output} already exists (use --overwrite to replace it)", file=sys.stderr)
        return 2
    if opt.output.resolve() == opt.input.resolve():
        print(f"error: output {opt.output} is the input", file=sys.stderr)
        return 2
    try:
        COMMANDS[opt.command][0](opt)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
