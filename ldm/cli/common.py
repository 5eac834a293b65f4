"""What the command-line scripts (``inpaint_st.py``, ``txt2img.py``, ``scripts/``) share: devices, seeding,
precision, output folders. Image files are read and written by :mod:`ldm.image_io`."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch

from .. import loading
from ..checkpoints import files as checkpoint_files
from ..image_io import InputError
from ..util import PathLike, remove_stale_temporaries

log = logging.getLogger(__name__)



def pick_device(device: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` are checked against the
    machine. Anything else is a ``ValueError`` naming ``--device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device name (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: not supported (auto, cpu, cuda, cuda:N, mps)")
    return dev


def prepare_outdir(path: PathLike, flag: str = "--outdir", create: bool = True) -> Path:
    """Check (and with ``create``, make) an output folder; a path that is, or lies under, a file, or a folder this
    process cannot write into (read-only, no permission), is an :class:`InputError` naming ``flag``. Temporary
    files that killed writes left in it are removed (``ldm.util.remove_stale_temporaries``; other live runs'
    kept). Check with ``create=False`` before the slow setup, create after it."""
    path = Path(path)
    existing = next((p for p in (path, *path.resolve().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise InputError(f"{flag} {path}: {where}, not a folder")
    if existing is not None:
        try:  # a real write: os.access says yes to root on a read-only mount
            fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            where = "" if existing == path else f" (in {existing}, where it would be created)"
            raise InputError(f"{flag} {path}: cannot write there{where}: {e.strerror or e}; nothing was "
                             "computed") from None
        if existing == path:
            for stale in remove_stale_temporaries(path, recursive=False, shared=True):
                log.info("removed %s, left by a killed write", stale)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None
    return path


def refuse_overlap(outdir: PathLike, indir: PathLike, out_flag: str = "--outdir", in_flag: str = "--indir") -> None:
    """Inputs are never overwritten, whatever the flags: an output folder that is the input folder, or lies inside
    it or around it, is an :class:`InputError` naming both flags (symbolic links resolved)."""
    out, src = Path(outdir).resolve(), Path(indir).resolve()
    if out == src or src in out.parents or out in src.parents:
        where = "is" if out == src else "lies inside" if src in out.parents else "contains"
        raise InputError(f"{out_flag} {outdir} {where} {in_flag} {indir}: outputs would mix with (or replace) the "
                         f"inputs; choose an output folder outside {indir}")


def load_flagged(opt: Any, config_flag: str, ckpt_flag: str, device: torch.device) -> torch.nn.Module:
    """``ldm.loading.load_model`` of the files named by two flags of ``opt``, with a line saying what
    loads; a checkpoint error names both flags."""
    config, ckpt = getattr(opt, config_flag[2:]), getattr(opt, ckpt_flag[2:])
    print(f"loading {ckpt} ({ckpt_flag}) ...", file=sys.stderr, flush=True)
    try:
        return loading.load_model(config, ckpt, device=device)
    except checkpoint_files.CheckpointError as e:
        raise checkpoint_files.CheckpointError(f"{ckpt_flag} {ckpt} with {config_flag} {config}: {e}") from None


def make_schedule(sampler: Any, steps: int, eta: float, steps_flag: str = "--steps") -> None:
    """``sampler.make_schedule(steps, ddim_eta=eta)``; a number of steps the sampler cannot use (above the model's
    timesteps, or a uniform spacing that overshoots them) is a ``ValueError`` naming ``steps_flag``. The scripts
    check eta >= 0 when parsing their flags."""
    try:
        sampler.make_schedule(steps, ddim_eta=eta, verbose=False)
    except ValueError as e:
        raise ValueError(f"{steps_flag} {steps}: {e}") from None


def seed_everything(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """Seed Python, NumPy and torch, and return a ``torch.Generator`` on ``device`` seeded with ``seed``.

    The scripts draw all their noise from it: the same seed gives the same output on the same device.
    """
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device) -> Iterator[None]:
    """``autocast``: float16 autocast on CUDA (the original scripts' ``torch.cuda.amp.autocast``); on CPU the
    models run in float32, since CPU autocast would mean bfloat16, which the original never used. ``full``: float32.
    """
    if precision not in ("autocast", "full"):
        raise ValueError(f"precision must be 'autocast' or 'full', got {precision!r}")
    if precision == "autocast" and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        if precision == "autocast":
            log.info("autocast has no effect on %s: running in float32", device)
        yield
