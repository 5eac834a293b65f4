"""Text-guided inpainting with Stable Diffusion v1.5 inpainting and the asymmetric decoder.

For every ``NAME.png`` + ``NAME_mask.png`` pair in ``--indir`` (mask: white = generate), SD inpainting samples
latents with DDIM and the asymmetric decoder decodes them with the image and mask as its prior; the result is written
to ``--outdir/NAME.png``. The defaults are the original script's (prompt, DDIM 50 steps, eta 1.0, scale 7.5, seed 0,
longest side capped at 640, sides floored to multiples of 64, mask binarised at 0.5, float16 autocast on CUDA)::

    python inpaint_st.py --indir DIR --outdir OUT \\
        --config configs/autoencoder/autoencoder_kl_32x32x4.yaml --ckpt base.ckpt \\
        --config_d configs/autoencoder/v1-inpainting-inference.yaml --ckpt_d sd-v1-5-inpainting.ckpt

Both models load once. A pair that cannot be used is reported and skipped; the others still run. Existing outputs
are kept unless ``--overwrite``; outputs are written atomically. ``--vanilla_decoder`` decodes with the SD
checkpoint's own VAE instead, for comparison (then ``--config``/``--ckpt`` are not read).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm.checkpoint_io import CheckpointError
from ldm.loading import load_model
from ldm.inference import (InputError, fit_size, image_to_tensor, make_schedule, mask_to_tensor, open_image,
                           pick_device, precision_scope, prepare_outdir, save_png, seed_everything, to_uint8)
from ldm.models.diffusion.ddim import DDIMSampler

DEFAULT_PROMPT = "photograph of a beautiful empty scene, highest quality settings"
MASK_SUFFIX = "_mask.png"


@dataclass
class Pair:
    name: str
    image: Path
    mask: Path


def find_pairs(indir: Path) -> Tuple[List[Pair], List[str]]:
    """``NAME.png`` + ``NAME_mask.png`` pairs in ``indir`` (sorted by name), and one message per unpaired file.
    Suffixes match in any case (``x.PNG`` + ``x_Mask.png``); NAME itself is matched exactly."""
    pngs = {p.name: p for p in indir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    masks = {n[: -len(MASK_SUFFIX)]: p for n, p in pngs.items() if n.lower().endswith(MASK_SUFFIX)}
    images = {p.stem: p for n, p in pngs.items() if not n.lower().endswith(MASK_SUFFIX)}
    pairs = [Pair(name, images[name], masks[name]) for name in sorted(images.keys() & masks.keys())]
    problems = [f"{masks[n]}: mask without its image {n}.png" for n in sorted(masks.keys() - images.keys())]
    problems += [f"{images[n]}: image without its mask {n}{MASK_SUFFIX}" for n in sorted(images.keys() - masks.keys())]
    return pairs, problems


def load_pair(pair: Pair, max_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read and resize one pair: image (1,3,H,W) in [-1,1], mask (1,1,H,W) in {0,1}, H and W multiples of 64."""
    image = open_image(pair.image, "RGB")
    mask = open_image(pair.mask, "L")
    if image.size != mask.size:
        raise InputError(f"{pair.mask}: mask is {mask.size[0]}x{mask.size[1]} but {pair.image.name} is "
                         f"{image.size[0]}x{image.size[1]}")
    width, height = fit_size(*image.size, max_size=max_size)
    if width == 0 or height == 0:
        raise InputError(f"{pair.image}: {image.size[0]}x{image.size[1]} is too small (each side must reach 64 "
                         f"pixels after scaling to --max_size {max_size})")
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.BICUBIC)
        # the original resized the image only, so sizes no longer matched (its issue #12); nearest keeps it binary
        mask = mask.resize((width, height), resample=Image.NEAREST)
    return image_to_tensor(image), mask_to_tensor(mask)


def output_paths(outdir: Path, name: str, n_samples: int) -> List[Path]:
    """``NAME.png`` (the input's name, as the original) or ``NAME_0.png`` ... for several samples."""
    if n_samples == 1:
        return [outdir / f"{name}.png"]
    return [outdir / f"{name}_{k}.png" for k in range(n_samples)]


@torch.no_grad()
def inpaint(model: torch.nn.Module, sampler: DDIMSampler, decoder: Optional[torch.nn.Module], image: torch.Tensor,
            mask: torch.Tensor, opt: argparse.Namespace, device: torch.device) -> np.ndarray:
    """Inpaint one image: (1,3,H,W), (1,1,H,W) -> (n_samples, H, W, 3) uint8. Same seed, same output."""
    n = opt.n_samples
    generator = seed_everything(opt.seed, device)
    image = image.to(device).expand(n, -1, -1, -1)
    mask = mask.to(device).expand(n, -1, -1, -1)
    f = model.first_stage_model.downsample_factor
    shape = (model.channels, image.shape[-2] // f, image.shape[-1] // f)
    # the original's start code: NumPy's RandomState(seed), float64 -> float32
    x_T = torch.from_numpy(np.random.RandomState(opt.seed).randn(n, *shape)).to(device=device, dtype=torch.float32)
    with precision_scope(opt.precision, device):
        c_cat = model.inpaint_conditioning(image, mask, generator=generator)
        cond = {"c_concat": [c_cat], "c_crossattn": [model.get_learned_conditioning(n * [opt.prompt])]}
        uc = {"c_concat": [c_cat], "c_crossattn": [model.get_unconditional_conditioning(n, "")]}
        samples, _ = sampler.sample(opt.steps, n, shape, cond, eta=opt.eta, unconditional_guidance_scale=opt.scale,
                                    unconditional_conditioning=uc, x_T=x_T, generator=generator, verbose=False,
                                    progress=False)
        if decoder is None:
            result = model.decode_first_stage(samples)
        else:
            result = decoder.decode(model.first_stage_model.unscale_latents(samples), image, mask)
    return to_uint8(result)


def load_models(opt: argparse.Namespace, device: torch.device) -> Tuple[torch.nn.Module, Optional[torch.nn.Module]]:
    """The SD inpainting model and (unless --vanilla_decoder) the asymmetric decoder's autoencoder."""
    model = load_model(opt.config_d, opt.ckpt_d, device=device)
    if not hasattr(model, "inpaint_conditioning"):
        raise CheckpointError(f"--config_d {opt.config_d}: builds {type(model).__name__}, not an inpainting model "
                              "(ldm.models.diffusion.ddpm.LatentInpaintDiffusion)")
    if opt.vanilla_decoder:
        return model, None
    decoder = load_model(opt.config, opt.ckpt, device=device)
    if decoder.downsample_factor != model.first_stage_model.downsample_factor:
        raise CheckpointError(f"--config {opt.config}: the decoder upsamples by {decoder.downsample_factor} but the "
                              f"SD model's latents are {model.first_stage_model.downsample_factor}x smaller")
    if not decoder.decoder.has_condition:
        logging.getLogger(__name__).warning("%s has no condition branch: the image and mask are not used by the "
                                            "decoder", opt.config)
    return model, decoder


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--indir", type=Path, required=True,
                   help="folder of NAME.png + NAME_mask.png pairs (mask: white = generate)")
    p.add_argument("--outdir", type=Path, default=Path("outputs/inpainting_results"), help="where to write NAME.png")
    p.add_argument("--config", default="configs/autoencoder/autoencoder_kl_32x32x4.yaml",
                   help="config of the asymmetric decoder")
    p.add_argument("--ckpt", default="base.ckpt",
                   help="decoder weights: the original .ckpt, a .safetensors, or a diffusers "
                        "AsymmetricAutoencoderKL folder")
    p.add_argument("--config_d", default="configs/autoencoder/v1-inpainting-inference.yaml",
                   help="config of the SD inpainting model")
    p.add_argument("--ckpt_d", default="sd-v1-5-inpainting.ckpt", help="SD inpainting checkpoint (.ckpt/.safetensors)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt (the unconditional prompt is empty)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (0 = deterministic DDIM)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the start code and the sampling noise")
    p.add_argument("--n_samples", type=int, default=1, help="samples per image (NAME_0.png, NAME_1.png, ... if > 1)")
    p.add_argument("--max_size", type=int, default=640, help="longest side is scaled down to this")
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast",
                   help="autocast = float16 autocast on CUDA (float32 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--vanilla_decoder", action="store_true",
                   help="decode with the SD checkpoint's own VAE instead of the asymmetric decoder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    opt = p.parse_args(argv)
    for flag in ("steps", "n_samples", "max_size"):
        if getattr(opt, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if opt.max_size < 64:
        p.error("--max_size must be >= 64 (sides are floored to multiples of 64)")
    if not opt.eta >= 0:  # also refuses nan
        p.error(f"--eta must be >= 0, got {opt.eta}")
    return opt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Returns the exit status: 0 when every pair was written or already existed, 1 when some were skipped or failed
    (each reported with its file name), 2 when nothing could start (bad flags, models, folders)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opt = parse_args(argv)
    if not opt.indir.is_dir():
        print(f"error: --indir {opt.indir} is not a folder", file=sys.stderr)
        return 2
    try:
        prepare_outdir(opt.outdir, create=False)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pairs, problems = find_pairs(opt.indir)
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)
    if not pairs:
        print(f"error: {opt.indir} holds no NAME.png + NAME{MASK_SUFFIX} pair", file=sys.stderr)
        return 2
    # (pair, its output paths, those to keep): an existing output is never replaced without --overwrite, also
    # when only some of a pair's NAME_k.png exist (then only the missing ones are written)
    todo = []
    for pr in pairs:
        paths = output_paths(opt.outdir, pr.name, opt.n_samples)
        keep = set() if opt.overwrite else {p for p in paths if p.exists()}
        if len(keep) == len(paths):
            continue
        if keep:
            print(f"{pr.name}: keeping the existing {', '.join(sorted(p.name for p in keep))}, writing only the "
                  f"missing outputs (use --overwrite to replace them)")
        todo.append((pr, paths, keep))
    if len(todo) < len(pairs):
        print(f"{len(pairs) - len(todo)} pairs already have outputs in {opt.outdir} (use --overwrite to redo them)")
    failed = len(problems)  # bad input
    errors = 0  # a good pair whose sampling or writing failed; the others still run
    written = 0
    if todo:
        try:
            device = pick_device(opt.device)
            model, decoder = load_models(opt, device)
            sampler = DDIMSampler(model)
            make_schedule(sampler, opt.steps, opt.eta, steps_flag="--steps")
            prepare_outdir(opt.outdir)
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for pair, paths, keep in tqdm(todo, desc="inpainting", unit="image"):
            try:
                image, mask = load_pair(pair, opt.max_size)
            except InputError as e:
                tqdm.write(f"skipped: {e}", file=sys.stderr)
                failed += 1
                continue
            try:
                # all n_samples are drawn even when some are kept: sample k depends on the whole batch and the seed
                for array, path in zip(inpaint(model, sampler, decoder, image, mask, opt, device), paths):
                    if path not in keep:
                        save_png(array, path)
            except (RuntimeError, OSError) as e:  # e.g. CUDA out of memory on one large image, a full disk
                tqdm.write(f"failed: {pair.image} ({image.shape[-1]}x{image.shape[-2]}): {type(e).__name__}: {e}",
                           file=sys.stderr)
                errors += 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            written += 1
    print(f"{written} written, {len(pairs) - len(todo)} already there, {failed} skipped for bad input, {errors} "
          f"failed; outputs in {opt.outdir}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
