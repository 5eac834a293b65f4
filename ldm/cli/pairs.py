"""The batch driver of every script that inpaints a folder of ``NAME.<ext>`` + ``NAME_mask.<ext>`` pairs
(``inpaint_st.py``, ``scripts/inpaint_diffusers.py``): their shared flags, the checks before anything loads, the
loop that reads each pair, inpaints it and writes ``--outdir/NAME.png`` atomically.

No torch at import time: the scripts' ``--help`` and flag errors come at once.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

from ..project import FAST_HELP

if TYPE_CHECKING:
    import numpy as np
    import torch

# the original inpaint_st.py's fixed prompt, the default of both scripts
DEFAULT_PROMPT = "photograph of a beautiful empty scene, highest quality settings"


def output_paths(outdir: Path, name: str, n_samples: int) -> List[Path]:
    """``NAME.png`` (the input's name, as the original) or ``NAME_0.png`` ... for several samples."""
    if n_samples == 1:
        return [outdir / f"{name}.png"]
    return [outdir / f"{name}_{k}.png" for k in range(n_samples)]


def load_decoder(opt: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Our decoder's autoencoder from ``--config`` / ``--ckpt``; a decoder without condition branch is used with a
    warning (it ignores the image and mask)."""
    from ..cli.common import load_flagged

    decoder = load_flagged(opt, "--config", "--ckpt", device)
    if not decoder.decoder.has_condition:
        logging.getLogger(__name__).warning("%s has no condition branch: the image and mask are not used by the "
                                            "decoder", opt.config)
    return decoder


def model_flags(opt: argparse.Namespace) -> str:
    """The model files of a run as its flags say them (``--ckpt X, --ckpt_d Y``), for messages."""
    flags = [f"--{name} {getattr(opt, name)}" for name in ("pipeline", "ckpt_d", "ckpt")
             if getattr(opt, name, None) is not None and not (name == "ckpt" and getattr(opt, "vanilla_decoder", 0))]
    return ", ".join(flags) or "the models"


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

    from ..checkpoints.files import CheckpointError
    from ..cli.common import pick_device, prepare_outdir, refuse_overlap
    from ..image_io import DEFAULT_MAX_PIXELS, InputError, NonFiniteError, find_pairs, read_pair, write_png

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
    kept_theirs = 0  # pairs whose outputs another run wrote while this one computed them
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
                theirs = 0
                for array, path in zip(inpaint_one(image, mask), paths):
                    if path in keep:
                        continue
                    try:
                        write_png(array, path, overwrite=opt.overwrite)
                    except FileExistsError:  # another run wrote it meanwhile: theirs is kept
                        tqdm.write(f"kept: {path}, written by another run meanwhile", file=sys.stderr)
                        theirs += 1
            except NonFiniteError as e:  # a damaged checkpoint or float16 overflow: every pair would fail alike
                print(f"error: {pair.image} with {model_flags(opt)}: {e}; stopped", file=sys.stderr)
                return 1
            except (RuntimeError, OSError) as e:  # e.g. CUDA out of memory on one large image, a full disk
                tqdm.write(f"failed: {pair.image} ({image.shape[-1]}x{image.shape[-2]}): {type(e).__name__}: {e}",
                           file=sys.stderr)
                errors += 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if theirs == len(paths) - len(keep):
                kept_theirs += 1
            else:
                written += 1
    print(f"{written} written, {len(pairs) - len(todo) + kept_theirs} already there"
          f"{f' ({kept_theirs} written by another run meanwhile)' if kept_theirs else ''}, {failed} skipped for bad "
          f"input, {errors} failed; outputs in {opt.outdir}")
    return 1 if failed or errors else 0
