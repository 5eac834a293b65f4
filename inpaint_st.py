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
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple

from ldm.cli.pairs import DEFAULT_PROMPT, add_pair_arguments, check_pair_arguments, load_decoder, run_pairs
from ldm.project import DECODER_FILES, check_run_files

# torch and the models are imported after the flags are parsed, so that --help and flag errors come at once
if TYPE_CHECKING:
    import numpy as np
    import torch

    from ldm.models.diffusion.ddim import DDIMSampler


def inpaint(model: torch.nn.Module, sampler: DDIMSampler, decoder: Optional[torch.nn.Module], image: torch.Tensor,
            mask: torch.Tensor, opt: argparse.Namespace, device: torch.device) -> np.ndarray:
    """Inpaint one image: (1,3,H,W), (1,1,H,W) -> (n_samples, H, W, 3) uint8. Same seed, same output."""
    import numpy as np
    import torch

    from ldm.cli.common import precision_scope, seed_everything
    from ldm.image_io import to_uint8

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


def load_models(opt: argparse.Namespace, device: torch.device) -> Tuple[torch.nn.Module, Optional[torch.nn.Module]]:
    """The SD inpainting model and (unless --vanilla_decoder) the asymmetric decoder's autoencoder. The decoder
    loads first: it is the smaller model, and a wrong decoder checkpoint is reported before SD has loaded."""
    from ldm.checkpoints.files import CheckpointError
    from ldm.cli.common import load_flagged
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Returns the exit status (see :func:`run_pairs`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opt = parse_args(argv)

    def setup(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
        from ldm.cli.common import make_schedule
        from ldm.models.diffusion.ddim import DDIMSampler

        model, decoder = load_models(opt, device)
        sampler = DDIMSampler(model)
        make_schedule(sampler, opt.steps, opt.eta, steps_flag="--steps")
        return lambda image, mask: inpaint(model, sampler, decoder, image, mask, opt, device)

    return run_pairs(opt, check_files, setup)


if __name__ == "__main__":
    sys.exit(main())
