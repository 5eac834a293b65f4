"""Text-guided inpainting with Stable Diffusion v1.5 inpainting and the asymmetric decoder.

For every ``NAME.<ext>`` + ``NAME_mask.<ext>`` pair in ``--indir`` (any of jpg, jpeg, png, bmp, webp, tif, tiff on
either side; mask: white = generate; files read by ``ldm.image_io``'s one rule), SD inpainting samples
latents with DDIM and the asymmetric decoder decodes them with the image and mask as its prior; the result is written
to ``--outdir/NAME.png``. The defaults are the original script's (prompt, DDIM 50 steps, eta 1.0, scale 7.5, seed 0,
longest side capped at 640, sides floored to multiples of 64, mask binarised at 0.5, float16 autocast on CUDA)::

    python inpaint_st.py --indir DIR --outdir OUT \\
        --config configs/autoencoder/autoencoder_kl_32x32x4.yaml --ckpt base.ckpt \\
        --config_d configs/autoencoder/v1-inpainting-inference.yaml --ckpt_d sd-v1-5-inpainting.ckpt

Both models load once, after every flag and file has been checked. A pair that cannot be used (unreadable, above
``--max_pixels``) is reported and skipped; the others still run. Existing outputs are kept unless ``--overwrite``;
outputs are written atomically; ``--outdir`` may not be, contain or lie inside ``--indir``. ``--vanilla_decoder``
decodes with the SD checkpoint's own VAE instead, for comparison (then ``--config``/``--ckpt`` are not read).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

from ldm.project import DECODER_FILES, FAST_HELP, check_run_files

# torch and the models are imported after the flags are parsed, so that --help and flag errors come at once
if TYPE_CHECKING:
    import numpy as np
    import torch

    from ldm.models.diffusion.ddim import DDIMSampler

DEFAULT_PROMPT = "photograph of a beautiful empty scene, highest quality settings"


def output_paths(outdir: Path, name: str, n_samples: int) -> List[Path]:
    """``NAME.png`` (the input's name, as the original) or ``NAME_0.png`` ... for several samples."""
    if n_samples == 1:
        return [outdir / f"{name}.png"]
    return [outdir / f"{name}_{k}.png" for k in range(n_samples)]


def inpaint(model: torch.nn.Module, sampler: DDIMSampler, decoder: Optional[torch.nn.Module], image: torch.Tensor,
            mask: torch.Tensor, opt: argparse.Namespace, device: torch.device) -> np.ndarray:
    """Inpaint one image: (1,3,H,W), (1,1,H,W) -> (n_samples, H, W, 3) uint8. Same seed, same output."""
    import numpy as np
    import torch

    from ldm.image_io import to_uint8
    from ldm.inference import precision_scope, seed_everything

    n = opt.n_samples
    generator = seed_everything(opt.seed, device)
    image = image.to(device).expand(n, -1, -1, -1)
    mask = mask.to(device).expand(n, -1, -1, -1)
    f = model.first_stage_model.downsample_factor
    shape = (model.channels, image.shape[-2] // f, image.shape[-1] // f)
    # the original's start code: NumPy's RandomState(seed), float64 -> float32
    x_T = torch.from_numpy(np.random.RandomState(opt.seed).randn(n, *shape)).to(device=device, dtype=torch.float32)
    with torch.no_grad(), precision_scope(opt.precision, device):
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


def check_files(opt: argparse.Namespace) -> None:
    """Every file the run needs exists (checked before anything heavy loads); the project's default configs are
    found from any working folder."""
    decoder = not opt.vanilla_decoder
    check_run_files(opt, ["--config_d", "--config"] if decoder else ["--config_d"],
                    {"--ckpt_d": "an SD inpainting checkpoint, e.g. sd-v1-5-inpainting.ckpt",
                     **({"--ckpt": DECODER_FILES} if decoder else {})})


def load_decoder(opt: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Our decoder's autoencoder from ``--config`` / ``--ckpt``; a decoder without condition branch is used with a
    warning (it ignores the image and mask)."""
    from ldm.inference import load_flagged

    decoder = load_flagged(opt, "--config", "--ckpt", device)
    if not decoder.decoder.has_condition:
        logging.getLogger(__name__).warning("%s has no condition branch: the image and mask are not used by the "
                                            "decoder", opt.config)
    return decoder


def load_models(opt: argparse.Namespace, device: torch.device) -> Tuple[torch.nn.Module, Optional[torch.nn.Module]]:
    """The SD inpainting model and (unless --vanilla_decoder) the asymmetric decoder's autoencoder. The decoder
    loads first: it is the smaller model, and a wrong decoder checkpoint is reported before SD has loaded."""
    from ldm.checkpoint_io import CheckpointError
    from ldm.inference import load_flagged

    from ldm.fast import FastDecode

    decoder = None if opt.vanilla_decoder else load_decoder(opt, device)
    model = load_flagged(opt, "--config_d", "--ckpt_d", device)
    if not hasattr(model, "inpaint_conditioning"):
        raise CheckpointError(f"--config_d {opt.config_d}: builds {type(model).__name__}, not an inpainting model "
                              "(ldm.models.diffusion.ddpm.LatentInpaintDiffusion)")
    if decoder is not None and decoder.downsample_factor != model.first_stage_model.downsample_factor:
        raise CheckpointError(f"--config {opt.config}: the decoder upsamples by {decoder.downsample_factor} but the "
                              f"SD model's latents are {model.first_stage_model.downsample_factor}x smaller")
    return model, None if decoder is None else FastDecode(decoder, device, enabled=opt.fast)


def add_pair_arguments(p: argparse.ArgumentParser, outdir: str, max_size: Optional[int] = 640,
                       max_size_help: str = "longest side is scaled down to this") -> None:
    """The flags of every script that inpaints a folder of pairs (this one, ``scripts/inpaint_diffusers.py``)."""
    p.add_argument("--indir", type=Path, required=True,
                   help="folder of NAME.<ext> + NAME_mask.<ext> pairs (mask: white = generate; ext: jpg, jpeg, "
                        "png, bmp, webp, tif, tiff)")
    p.add_argument("--outdir", type=Path, default=Path(outdir), help="where to write NAME.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the start code and the sampling noise")
    p.add_argument("--n_samples", type=int, default=1, help="samples per image (NAME_0.png, NAME_1.png, ... if > 1)")
    p.add_argument("--max_size", type=int, default=max_size, help=max_size_help)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    p.add_argument("--max_pixels", type=int, default=None,
                   help="larger input files are skipped with a message (default: 100 megapixels; 0 = no limit)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the inputs)")


def check_pair_arguments(p: argparse.ArgumentParser, opt: argparse.Namespace) -> None:
    """Refuse (exit 2 with a message) values of :func:`add_pair_arguments`' flags that cannot work."""
    if opt.n_samples < 1:
        p.error("--n_samples must be >= 1")
    if opt.max_size is not None and opt.max_size < 64:
        p.error("--max_size must be >= 64 (sides are floored to multiples of 64)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(p, outdir="outputs/inpainting_results")
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
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast",
                   help="autocast = float16 autocast on CUDA (float32 on CPU)")
    p.add_argument("--vanilla_decoder", action="store_true",
                   help="decode with the SD checkpoint's own VAE instead of the asymmetric decoder")
    opt = p.parse_args(argv)
    check_pair_arguments(p, opt)
    if opt.steps < 1:
        p.error("--steps must be >= 1")
    if not opt.eta >= 0:  # also refuses nan
        p.error(f"--eta must be >= 0, got {opt.eta}")
    return opt


# Checks every file a run needs (``FileNotFoundError`` / ``ValueError`` naming its flag), before anything heavy.
Check = Callable[[argparse.Namespace], None]
# Loads the models on a device and returns the function that inpaints one pair: image (1,3,H,W) in [-1,1] and
# mask (1,1,H,W) in {0,1} -> (n_samples, H, W, 3) uint8.
Setup = Callable[["torch.device"], Callable[["torch.Tensor", "torch.Tensor"], "np.ndarray"]]


def run_pairs(opt: argparse.Namespace, check: Check, setup: Setup) -> int:
    """Inpaint every pair of ``opt.indir`` into ``opt.outdir`` (the flags of :func:`add_pair_arguments`): inputs
    are never overwritten, unusable pairs are reported by name and skipped, existing outputs kept unless
    ``--overwrite``, outputs written atomically. ``check`` runs before the pairs are read; ``setup`` only when there
    is work, and its ``FileNotFoundError`` / ``CheckpointError`` / ``ValueError`` stop the run with its message.

    Returns the exit status: 0 when every pair was written or already existed, 1 when some were skipped or failed
    (each reported with its file name), 2 when nothing could start (bad flags, models, folders)."""
    if not opt.indir.is_dir():
        print(f"error: --indir {opt.indir} is not a folder", file=sys.stderr)
        return 2
    print("loading torch ...", file=sys.stderr, flush=True)
    import torch
    from tqdm import tqdm

    from ldm.checkpoint_io import CheckpointError
    from ldm.image_io import DEFAULT_MAX_PIXELS, InputError, find_pairs, read_pair, write_png
    from ldm.inference import pick_device, prepare_outdir, refuse_overlap

    max_pixels = DEFAULT_MAX_PIXELS if opt.max_pixels is None else opt.max_pixels
    try:
        refuse_overlap(opt.outdir, opt.indir)
        prepare_outdir(opt.outdir, create=False)
        check(opt)
        device = pick_device(opt.device)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pairs, problems = find_pairs(opt.indir)
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)
    if not pairs:
        print(f"error: {opt.indir} holds no NAME.<ext> + NAME_mask.<ext> pair", file=sys.stderr)
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
            inpaint_one = setup(device)
            prepare_outdir(opt.outdir)
        except (FileNotFoundError, CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for pair, paths, keep in tqdm(todo, desc="inpainting", unit="image"):
            try:
                image, mask = read_pair(pair, opt.max_size, max_pixels)
            except InputError as e:
                tqdm.write(f"skipped: {e}", file=sys.stderr)
                failed += 1
                continue
            try:
                # all n_samples are drawn even when some are kept: sample k depends on the whole batch and the seed
                for array, path in zip(inpaint_one(image, mask), paths):
                    if path in keep:
                        continue
                    try:
                        write_png(array, path, overwrite=opt.overwrite)
                    except FileExistsError:  # another run wrote it meanwhile: theirs is kept
                        tqdm.write(f"kept: {path}, written by another run meanwhile", file=sys.stderr)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Returns the exit status (see :func:`run_pairs`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opt = parse_args(argv)

    def setup(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
        from ldm.inference import make_schedule
        from ldm.models.diffusion.ddim import DDIMSampler

        model, decoder = load_models(opt, device)
        sampler = DDIMSampler(model)
        make_schedule(sampler, opt.steps, opt.eta, steps_flag="--steps")
        return lambda image, mask: inpaint(model, sampler, decoder, image, mask, opt, device)

    return run_pairs(opt, check_files, setup)


if __name__ == "__main__":
    sys.exit(main())
