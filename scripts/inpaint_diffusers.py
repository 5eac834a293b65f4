"""Text-guided inpainting with a diffusers pipeline (SD, SDXL, SD 3, FLUX.1, Chroma, Z-Image, FLUX.2) and our decoder.

For every ``NAME.png`` + ``NAME_mask.png`` pair in ``--indir`` (mask: white = generate), the pipeline in ``--pipeline``
(a local folder as ``save_pretrained`` writes it) samples latents, its own VAE encoding the image; our decoder
decodes them with the image and mask (``ldm/integrations/diffusers_pipelines.py``); the result goes to
``--outdir/NAME.png``::

    python scripts/inpaint_diffusers.py --pipeline models/sdxl-inpainting --indir DIR --outdir OUT \\
        --config configs/autoencoder/sdxl/asymmetric_base.yaml --ckpt sdxl-asymmetric-base.ckpt

Every pipeline of ``ldm.integrations.diffusers_pipelines.PIPELINES`` works; ControlNet pipelines take one
``--control_image`` for all pairs (and ``--control_mode`` for ControlNet Union). Defaults are the pipeline's own (steps,
guidance, strength; see ``--help``) and the longest side is capped at the pipeline's native size (512 for SD 1.5,
1024 for the others), sides floored to multiples of 64.
Pairs, reading, refusal and writing are ``ldm.cli.pairs``': bad pairs are reported and skipped, existing outputs
kept unless ``--overwrite``, outputs written atomically. ``--vanilla_decoder`` lets the pipeline decode with its own
VAE. Nothing is fetched from a hub; no safety checker or watermark runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence

from ldm.cli.pairs import DEFAULT_PROMPT, add_pair_arguments, check_pair_arguments, load_decoder, run_pairs
from ldm.integrations.diffusers_pipelines import PIPELINES, PipelineError
from ldm.project import DECODER_FILES, check_run_files

# torch, diffusers and the models are imported after the flags are parsed, so that --help and flag errors come at once
if TYPE_CHECKING:
    import numpy as np
    import torch

# what from_pretrained leaves out, by latent space: inpaint_st.py runs no safety checker or watermark either, and with
# our decoder the pipelines skip them anyway (they run on their own decode only)
NO_EXTRAS: Dict[str, Dict[str, Any]] = {
    "sd": {"safety_checker": None, "requires_safety_checker": False},  # the SD 1.5 pipelines
    "sdxl": {"add_watermarker": False},
}
DTYPES = {"full": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_arguments(p, outdir="outputs/inpainting_diffusers", max_size=None,
                       max_size_help="longest side is scaled down to this (default: the pipeline's native size, "
                                     "512 for SD 1.5, 1024 for SDXL, SD 3 and FLUX.1 Fill)")
    p.add_argument("--pipeline", type=Path, required=True,
                   help="local diffusers pipeline folder (model_index.json + components): "
                        + ", ".join(PIPELINES))
    p.add_argument("--config", help="config of our decoder, in the pipeline's latent space")
    p.add_argument("--ckpt", help="decoder weights: .ckpt, .safetensors or a diffusers AsymmetricAutoencoderKL folder")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    p.add_argument("--steps", type=int, help="inference steps (default: the pipeline's, e.g. 50 for SD, SDXL, "
                                              "SD 3 and FLUX.1 Fill, 28 for FLUX.1 Kontext)")
    p.add_argument("--guidance", type=float,
                   help="guidance scale (default: the pipeline's, e.g. 7.5 SD 1.5/2 and SDXL, 7.0 SD 3, "
                        "30 FLUX.1 Fill)")
    p.add_argument("--strength", type=float,
                   help="how far the masked region is noised (default: the pipeline's, e.g. 1.0 SD 1.5/2 and "
                        "FLUX.1 Fill, 0.9999 SDXL, 0.6 SD 3)")
    p.add_argument("--control_image", type=Path,
                   help="the control image of ControlNet / FLUX.1 Control pipelines, one for all pairs (resized by "
                        "the pipeline)")
    p.add_argument("--control_mode", type=int, help="the control type of ControlNet Union (e.g. 7: inpainting)")
    p.add_argument("--precision", choices=["auto", *DTYPES], default="auto",
                   help="the pipeline's dtype; auto = bf16 on CUDA (fp16 overflows in SDXL's VAE), full (float32) "
                        "elsewhere. Our decoder runs in float32")
    p.add_argument("--vanilla_decoder", action="store_true",
                   help="let the pipeline decode with its own VAE (then --config/--ckpt are not read)")
    opt = p.parse_args(argv)
    check_pair_arguments(p, opt)
    if opt.steps is not None and opt.steps < 1:
        p.error("--steps must be >= 1")
    if not opt.vanilla_decoder and (opt.config is None or opt.ckpt is None):
        p.error("--config and --ckpt (our decoder) are required unless --vanilla_decoder")
    return opt


def pipeline_class(folder: Path) -> str:
    """The pipeline class named by ``folder/model_index.json``; a folder that is not a supported pipeline is a
    ``FileNotFoundError`` / ``PipelineError`` naming ``--pipeline``."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--pipeline {folder}: not a diffusers pipeline folder (model_index.json is missing; "
                                "write one with pipe.save_pretrained(folder))")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"--pipeline {folder}: {index.name} names no pipeline class ({e})") from None
    if name not in PIPELINES:
        raise PipelineError(f"--pipeline {folder}: {name} is not supported; supported: {', '.join(PIPELINES)}")
    return name


def control_arguments(opt: argparse.Namespace, name: str) -> Dict[str, Any]:
    """The further arguments the pipeline needs (its family's ``requires``) from ``--control_image`` /
    ``--control_mode``; a missing one is a ``PipelineError`` naming the flag."""
    from ldm.integrations.diffusers_pipelines import FAMILIES

    given = {"control_image": opt.control_image, "control_mode": opt.control_mode}
    needed = FAMILIES[PIPELINES[name].family].requires
    missing = [f"--{argument}" for argument in needed if given.get(argument) is None]
    if missing:
        raise PipelineError(f"--pipeline {opt.pipeline}: {name} needs {' and '.join(missing)}")
    return {argument: given[argument] for argument in needed}


def check_files(opt: argparse.Namespace) -> None:
    """Everything a run needs exists, checked before anything loads (see ``ldm.cli.pairs.run_pairs``)."""
    control_arguments(opt, pipeline_class(opt.pipeline))
    if opt.control_image is not None and not opt.control_image.is_file():
        raise FileNotFoundError(f"--control_image {opt.control_image}: not found")
    vae_config = opt.pipeline / "vae" / "config.json"
    if not vae_config.is_file():
        raise FileNotFoundError(f"--pipeline {opt.pipeline}: {vae_config} is missing")
    if not opt.vanilla_decoder:
        check_run_files(opt, ["--config"], {"--ckpt": DECODER_FILES})


def load(opt: argparse.Namespace, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
    """Load the pipeline and the decoder; returns the function that inpaints one pair (see ``ldm.cli.pairs.Setup``)."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    from ldm.fast import FastDecode
    from ldm.image_io import check_finite
    from ldm.integrations.diffusers_pipelines import check_decoder_fits, inpaint, native_size

    name = pipeline_class(opt.pipeline)
    controls = control_arguments(opt, name)
    if "control_image" in controls:
        controls["control_image"] = Image.open(controls["control_image"]).convert("RGB")
        if "control_mode" in controls:  # ControlNet Union: one control image per mode
            controls.update(control_image=[controls["control_image"]], control_mode=[controls["control_mode"]])
    decoder = None
    if not opt.vanilla_decoder:
        decoder = load_decoder(opt, device)
        # refused before the (large) pipeline loads
        check_decoder_fits(json.loads((opt.pipeline / "vae" / "config.json").read_text()), decoder,
                           pipe_name=f"--pipeline {opt.pipeline}", decoder_name=f"--config {opt.config}")
    precision = opt.precision if opt.precision != "auto" else ("bf16" if device.type == "cuda" else "full")
    try:
        pipe = DiffusionPipeline.from_pretrained(opt.pipeline, torch_dtype=getattr(torch, DTYPES[precision]),
                                                 local_files_only=True,
                                                 **NO_EXTRAS.get(PIPELINES[name].space, {}))
    except OSError as e:  # a component's files missing or unreadable
        raise FileNotFoundError(f"--pipeline {opt.pipeline}: {e}") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar: the pairs
    if opt.max_size is None:
        opt.max_size = native_size(pipe)
    # --fast: the same decoder on the device's fast path (ldm.fast); default: exact float32
    decode = None if decoder is None else FastDecode(decoder, device, enabled=opt.fast).decode
    settings = {key: value for key, value in (("num_inference_steps", opt.steps), ("guidance_scale", opt.guidance),
                                              ("strength", opt.strength)) if value is not None}

    def inpaint_one(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        # as (B,H,W,C) arrays in [0,1], which every pipeline preprocesses (some take tensors as they are);
        # a CPU generator: the same seed gives the same noise on every device
        image, mask = (t.permute(0, 2, 3, 1).float().cpu().numpy() for t in ((image + 1) / 2, mask))
        images = inpaint(pipe, decoder, image, mask, decode=decode, prompt=opt.prompt,
                         num_images_per_prompt=opt.n_samples, generator=torch.Generator().manual_seed(opt.seed),
                         output_type="np", **settings, **controls).images
        check_finite(torch.from_numpy(images), "the pipeline's images")  # NaN would become black pixels
        return np.stack([np.asarray(im.convert("RGB")) for im in pipe.image_processor.numpy_to_pil(images)])

    return inpaint_one


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Returns the exit status of ``ldm.cli.pairs.run_pairs``: 0 all written, 1 some pairs skipped or failed, 2 nothing
    could start."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    opt = parse_args(argv)
    return run_pairs(opt, check_files, lambda device: load(opt, device))


if __name__ == "__main__":
    sys.exit(main())
