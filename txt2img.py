"""Text-to-image with Stable Diffusion v1.x, decoded by the asymmetric decoder with no prior ("generate everything").

The original command line works as is::

    python txt2img.py --plms --config_c configs/autoencoder/autoencoder_kl_woc_32x32x4.yaml --ckpt_c base.ckpt \\
        --prompt "a painting of a virus monster playing guitar"

Flags are CompVis' txt2img.py ones. Every sample is written to ``--outdir/samples/NNNNN.png`` and all of them as
``--outdir/grid-NNNN.png``, numbered after the files already there; each name is claimed as it is written, so runs
sharing an ``--outdir`` never replace each other's files. A conditioned decoder
(``autoencoder_kl_32x32x4.yaml``) given no image and mask decodes exactly like its ``woc`` config. No safety
checker or watermark (they need hub downloads). ``--vanilla_decoder`` decodes with the SD checkpoint's own VAE.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence

from ldm.project import DECODER_FILES, FAST_HELP, check_run_files

# torch and the models are imported after the flags are parsed, so that --help and flag errors come at once
if TYPE_CHECKING:
    import torch


def read_prompts(opt: argparse.Namespace) -> List[List[str]]:
    """Batches of prompts: ``n_samples`` copies of ``--prompt``, or the lines of ``--from-file`` in chunks of
    ``n_samples`` (the last chunk may be smaller)."""
    if not opt.from_file:
        return [opt.n_samples * [opt.prompt]]
    path = Path(opt.from_file)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--from-file {path}: cannot be read ({e})") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"--from-file {path}: no prompt in the file")
    return [prompts[i:i + opt.n_samples] for i in range(0, len(prompts), opt.n_samples)]


def next_index(folder: Path, pattern: str) -> int:
    """1 + the largest number in the names of ``folder`` matching ``pattern`` (one group), 0 if none. Only a
    starting point: :func:`ldm.util.write_numbered` claims each name when it writes."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))] \
        if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def check_text_to_image(opt: argparse.Namespace, model: torch.nn.Module) -> None:
    """Only a text-to-image model (cross-attention on the prompt alone) can sample from a prompt."""
    key = getattr(getattr(model, "model", None), "conditioning_key", None)
    if key != "crossattn" or hasattr(model, "inpaint_conditioning"):
        raise ValueError(f"--config {opt.config}: builds {type(model).__name__} with {key!r} conditioning, not a "
                         "text-to-image model; pass an SD v1 text-to-image config and checkpoint (e.g. "
                         "configs/autoencoder/v1-t2i-inference.yaml with v1-5-pruned-emaonly.ckpt); inpainting "
                         "models belong to inpaint_st.py --config_d")


def check_geometry(opt: argparse.Namespace, model: torch.nn.Module, decoder: Optional[torch.nn.Module]) -> None:
    """--C, --f, --H, --W against the models, so a mismatch is an error message and not a shape error deep inside."""
    f = model.first_stage_model.downsample_factor
    if opt.f != f:
        raise ValueError(f"--f {opt.f}: the SD model's first stage downsamples by {f}")
    if decoder is not None and decoder.downsample_factor != f:
        raise ValueError(f"--config_c {opt.config_c}: the decoder upsamples by {decoder.downsample_factor}, the SD "
                         f"model's latents are {f}x smaller")
    if opt.C != model.channels:
        raise ValueError(f"--C {opt.C}: the SD model's latents have {model.channels} channels")
    unet_multiple = 2 ** (len(model.model.diffusion_model.channel_mult) - 1)
    for flag in ("H", "W"):
        if getattr(opt, flag) % (f * unet_multiple):
            raise ValueError(f"--{flag} {getattr(opt, flag)} must be a multiple of {f * unet_multiple} "
                             f"(first stage x{f}, UNet x{unet_multiple})")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=str, default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples", help="dir to write results to")
    p.add_argument("--config_c", default="configs/autoencoder/autoencoder_kl_woc_32x32x4.yaml",
                   help="config of the asymmetric decoder")
    p.add_argument("--ckpt_c", default="base.ckpt",
                   help="decoder weights: the original .ckpt, a .safetensors, or a diffusers "
                        "AsymmetricAutoencoderKL folder")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling")
    p.add_argument("--laion400m", action="store_true",
                   help="the original's switch to the LAION-400M LDM model: not supported here (refused)")
    p.add_argument("--fixed_code", action="store_true", help="use the same starting code for every batch")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (0 = deterministic; PLMS needs 0)")
    p.add_argument("--n_iter", type=int, default=2, help="sample this often")
    p.add_argument("--H", type=int, default=512, help="image height, in pixel space")
    p.add_argument("--W", type=int, default=512, help="image width, in pixel space")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor (checked against the model)")
    p.add_argument("--n_samples", type=int, default=1, help="how many samples per prompt, a.k.a. batch size")
    p.add_argument("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    p.add_argument("--scale", type=float, default=7.5,
                   help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))")
    p.add_argument("--from-file", type=str, help="if specified, load prompts from this file, one per line")
    p.add_argument("--config", type=str, default="configs/autoencoder/v1-t2i-inference.yaml",
                   help="config of the SD model")
    p.add_argument("--ckpt", type=str, default="v1-5-pruned-emaonly.ckpt", help="SD checkpoint (.ckpt/.safetensors)")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast",
                   help="autocast = float16 autocast on CUDA (float32 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    p.add_argument("--vanilla_decoder", action="store_true",
                   help="decode with the SD checkpoint's own VAE instead of the asymmetric decoder")
    opt = p.parse_args(argv)
    if opt.laion400m:
        # the original swapped in configs/latent-diffusion/txt2img-1p4B-eval.yaml + models/ldm/text2img-large, an
        # LDM with its own BERT text encoder that this project does not implement
        p.error("--laion400m: the LAION-400M LDM model (txt2img-1p4B-eval.yaml, models/ldm/text2img-large/model.ckpt) "
                "is not supported here; pass an SD v1 text-to-image model with --config and --ckpt instead "
                "(configs/autoencoder/v1-t2i-inference.yaml, v1-5-pruned-emaonly.ckpt)")
    for flag in ("ddim_steps", "n_iter", "n_samples", "H", "W", "C", "f"):
        if getattr(opt, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if opt.n_rows < 0:
        p.error("--n_rows must be >= 0")
    if not opt.ddim_eta >= 0:  # also refuses nan
        p.error(f"--ddim_eta must be >= 0, got {opt.ddim_eta}")
    if opt.plms and opt.ddim_eta != 0:
        p.error("--plms needs --ddim_eta 0")
    if opt.skip_save and opt.skip_grid:
        p.error("--skip_save with --skip_grid would sample and write nothing; drop one of them")
    for flag in ("prompt", "outdir"):
        if not getattr(opt, flag).strip():
            p.error(f"--{flag} is empty")
    return opt


def check_files(opt: argparse.Namespace) -> None:
    """Every file the run needs exists (checked before anything heavy loads); the project's default configs are
    found from any working folder."""
    decoder = not opt.vanilla_decoder
    check_run_files(opt, ["--config", "--config_c"] if decoder else ["--config"],
                    {"--ckpt": "an SD v1 text-to-image checkpoint, e.g. v1-5-pruned-emaonly.ckpt",
                     **({"--ckpt_c": DECODER_FILES} if decoder else {})})


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opt = parse_args(argv)
    print("loading torch ...", file=sys.stderr, flush=True)
    import torch
    from torchvision.utils import make_grid
    from tqdm import tqdm

    from ldm.checkpoints.files import CheckpointError
    from ldm.cli.common import (
        load_flagged,
        make_schedule,
        pick_device,
        precision_scope,
        prepare_outdir,
        seed_everything,
    )
    from ldm.fast import FastDecode
    from ldm.image_io import NonFiniteError, to_uint8, write_png_numbered
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.plms import PLMSSampler
    from ldm.models.diffusion.sampling_common import randn
    from ldm.util import WriteError

    outdir = Path(opt.outdir)
    sample_dir = outdir / "samples"
    try:
        prepare_outdir(outdir, create=False)
        batches = read_prompts(opt)
        check_files(opt)
        device = pick_device(opt.device)
        # the decoder first: the smaller model, so that a wrong decoder checkpoint is reported before SD loads
        decoder = None if opt.vanilla_decoder else load_flagged(opt, "--config_c", "--ckpt_c", device)
        model = load_flagged(opt, "--config", "--ckpt", device)
        check_text_to_image(opt, model)
        check_geometry(opt, model, decoder)
        if decoder is not None:
            decoder = FastDecode(decoder, device, enabled=opt.fast)
        sampler = PLMSSampler(model) if opt.plms else DDIMSampler(model)
        make_schedule(sampler, opt.ddim_steps, opt.ddim_eta, steps_flag="--ddim_steps")
        prepare_outdir(sample_dir, flag="--outdir")
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generator = seed_everything(opt.seed, device)
    # a starting point; each name is claimed when written, so runs sharing --outdir never replace each other's files
    # (numbers keep growing past 99999 / 9999, with more digits)
    base_count = next_index(sample_dir, r"(\d{5,})\.png")
    grid_count = next_index(outdir, r"grid-(\d{4,})\.png")
    shape = (opt.C, opt.H // opt.f, opt.W // opt.f)
    start_code = randn((opt.n_samples, *shape), device, generator) if opt.fixed_code else None

    all_samples = []
    written = []
    models = f"--ckpt {opt.ckpt}" + ("" if opt.vanilla_decoder else f", --ckpt_c {opt.ckpt_c}")
    try:
        # one bar over every sampling run (the sampler's per-step bar and a per-batch bar are off)
        runs = [prompts for _ in range(opt.n_iter) for prompts in batches]
        with torch.no_grad(), precision_scope(opt.precision, device), model.ema_scope():
            for prompts in tqdm(runs, desc="sampling", unit="batch"):
                n = len(prompts)
                uc = model.get_learned_conditioning(n * [""]) if opt.scale != 1.0 else None
                c = model.get_learned_conditioning(prompts)
                samples, _ = sampler.sample(S=opt.ddim_steps, conditioning=c, batch_size=n, shape=shape,
                                            verbose=False, unconditional_guidance_scale=opt.scale,
                                            unconditional_conditioning=uc, eta=opt.ddim_eta,
                                            x_T=None if start_code is None else start_code[:n], generator=generator,
                                            progress=False)
                if decoder is None:
                    images = model.decode_first_stage(samples)
                else:
                    images = decoder.decode(model.first_stage_model.unscale_latents(samples))  # no prior: everything
                images = images.float().cpu()
                if not opt.skip_save:
                    for array in to_uint8(images):
                        path = write_png_numbered(array, sample_dir, "{:05}.png".format, base_count)
                        base_count = int(path.stem) + 1
                        written.append(path)
                all_samples.append(images)

        if not opt.skip_grid:
            # padding -1 is black, as the original's 0 in [0, 1]
            grid = make_grid(torch.cat(all_samples), nrow=opt.n_rows or opt.n_samples, pad_value=-1.0)
            written.append(write_png_numbered(to_uint8(grid[None])[0], outdir, "grid-{:04}.png".format, grid_count))
    except NonFiniteError as e:  # a damaged checkpoint or float16 overflow: stop before writing black images
        print(f"error: {models}: {e}; stopped after {len(written)} files", file=sys.stderr)
        return 1
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    print(f"Your samples are ready and waiting for you here: \n{outdir} \n \nEnjoy.")
    print(f"wrote {len(written)} files: {written[0].name} ... {written[-1].name}" if len(written) > 1
          else f"wrote {written[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
