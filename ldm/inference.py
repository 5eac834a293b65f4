"""What the command-line scripts (``inpaint_st.py``, ``txt2img.py``) share: devices, seeding, precision, image I/O
and atomic PNG writes.

Images are tensors (B,3,H,W) in [-1,1], masks (B,1,H,W) in {0,1} with 1 = generate; files are 8-bit PNGs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterator, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.util import write_atomically

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class InputError(ValueError):
    """A user-supplied file that cannot be used; the message names the file."""


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
    """Check (and with ``create``, make) an output folder; a path that is, or lies under, a file is an
    :class:`InputError` naming ``flag``. Check with ``create=False`` before the slow setup, create after it."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise InputError(f"{flag} {path}: {where}, not a folder")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{flag} {path}: cannot create the folder ({e.strerror or e})") from None
    return path


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


# 16-bit grayscale (PNG opens as "I;16"; older Pillow, and 32-bit TIFF, give "I"): PIL's convert("L") clips at 255
# instead of scaling, so a mask value of 0.4 (26214) would become 255 = generate.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """16-bit and 32-bit integer images -> "L" scaled by 255 / 65535 (rounding keeps ``>= 0.5`` exact); float
    images are refused; other modes are returned as they are."""
    if img.mode in _WIDE_INT_MODES:
        array = np.asarray(img).astype(np.float64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise InputError(f"{path}: {img.mode} image with values outside 0..65535 cannot be scaled to 8 bits; "
                             "save it as an 8- or 16-bit PNG")
        return Image.fromarray(np.round(array * (255.0 / 65535.0)).astype(np.uint8))
    if img.mode == "F":
        raise InputError(f"{path}: floating-point image (mode F) has no fixed range; save it as an 8- or 16-bit PNG")
    return img


def open_image(path: PathLike, mode: str) -> Image.Image:
    """Open an image file fully (so errors surface here) and convert it to ``mode`` ("RGB", "L"). 16-bit images
    are scaled to 8 bits (not clipped, as PIL's convert would); floating-point ones are refused."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_8bit(img, path).convert(mode)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot be read as an image ({e})") from None


def fit_size(width: int, height: int, max_size: int, multiple: int = 64) -> Tuple[int, int]:
    """The original inpainting script's size rule: scale the longest side down to ``max_size`` (never up), then
    floor both sides to a multiple of ``multiple``."""
    if max(width, height) > max_size:
        factor = max_size / max(width, height)
        width, height = int(factor * width), int(factor * height)
    return width - width % multiple, height - height % multiple


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1,3,H,W) float32 in [-1,1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1.0


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Grayscale PIL mask -> (1,1,H,W) float32 in {0,1}: ``L / 255 >= 0.5`` is 1 (generate), as the original."""
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8 as the original scripts write: ``clamp((x + 1) / 2) * 255``
    truncated (not rounded) to integers."""
    x = torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return (x.cpu().permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def save_png(array: np.ndarray, path: PathLike) -> Path:
    """Write an (H,W,3) uint8 array as PNG atomically: a temporary file in the same folder, then ``os.replace``,
    so ``path`` is either absent, the old file, or the complete new one."""
    path = Path(path)
    write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    return path
