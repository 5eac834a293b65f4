"""Image files in and out, one rule for training, evaluation and the scripts.

Reading (:func:`open_image`, :func:`read_image`, :func:`read_mask`): the file is decoded fully (a corrupt file fails
here, naming it), turned upright by its EXIF orientation, and refused above ``max_pixels`` before it is decoded;
then every mode becomes RGB in [0, 1] the same way: grey and palette images are expanded, transparent pixels are
composited over white (as a viewer shows them), 16-bit integer images are divided by 65535 (PIL's own conversion
would clip them at 255), floating-point images are refused (no fixed range). A mask is the luma of that RGB image.

Pairs (:func:`find_pairs`): ``NAME.<ext>`` + ``NAME_mask.<ext>`` in one folder, any extension of
:data:`IMAGE_EXTENSIONS` on either side (a JPEG photo with a PNG mask is a pair); :func:`mask_name` is the one rule
that tells a mask file from an image.

Tensors (:func:`to_tensor`, :func:`to_uint8`, :func:`quantize`): images are (B,3,H,W) in [-1,1]; 8-bit values are
``round(255 * (x + 1) / 2)`` after clamping, so an 8-bit image read and written back keeps its bytes. A NaN or
infinite value (a damaged checkpoint, float16 overflow) is never clamped into an image: :func:`check_finite` raises
:class:`NonFiniteError`, and every image written goes through :func:`to_uint8`, which checks.

Writing (:func:`write_png`): atomic (``ldm.util.write_atomically``); with ``overwrite=False`` an existing file is
never replaced, also when another process creates it meanwhile.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from .util import PathLike, write_atomically, write_numbered

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"
# Larger files are refused before decoding (--max_pixels); PIL's own bomb check (89.5 MP warning, 179 MP error)
# is replaced by this one. 100 MP = a 10000 x 10000 photo, 1.2 GB as float32 RGB.
DEFAULT_MAX_PIXELS = 100_000_000

_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class InputError(ValueError):
    """A user-supplied file or argument that cannot be used; the message names it."""


def open_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               data: Optional[bytes] = None) -> Image.Image:
    """Open and fully decode ``path``, upright by its EXIF orientation. Files with more than ``max_pixels`` pixels
    (None or 0: no limit) are refused from their header, before decoding. With ``data`` (the encoded bytes, e.g. a
    member of a tar shard) those are decoded and ``path`` only names them in errors."""
    path = Path(path)
    previous = Image.MAX_IMAGE_PIXELS
    img = None
    try:
        Image.MAX_IMAGE_PIXELS = None  # our limit replaces PIL's, which raises an exception no caller expects
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if data is not None else path)
        if max_pixels and img.width * img.height > max_pixels:
            raise InputError(f"{path}: {img.width}x{img.height} is {img.width * img.height / 1e6:.1f} megapixels, "
                                 f"above the limit of {max_pixels / 1e6:g} (--max_pixels)")
        img.load()
        upright = ImageOps.exif_transpose(img)
    except InputError:
        if img is not None:
            img.close()
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        if img is not None:
            img.close()
        raise InputError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if upright is not img:
        img.close()
    return upright


def to_rgb(img: Image.Image, path: PathLike = "<image>") -> np.ndarray:
    """Any PIL image -> (H,W,3) float32 RGB in [0, 1] by the rule of the module docstring."""
    if img.mode in _WIDE_INT_MODES:
        array = np.asarray(img, dtype=np.float64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise InputError(f"{path}: {img.mode} image with values outside 0..65535 has no 8/16-bit range; "
                                 "save it as an 8- or 16-bit PNG")
        grey = (array / 65535.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        raise InputError(f"{path}: floating-point image (mode F) has no fixed range; save it as an 8- or 16-bit "
                             "PNG")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H,W,3) float32 RGB in [0, 1]; :class:`InputError` naming the file."""
    with open_image(path, max_pixels) as img:
        return to_rgb(img, path)


def read_mask(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H,W) float32 in [0, 1], white = 1 = generate: the luma (ITU-R 601, as PIL's "L") of :func:`read_image`."""
    return read_image(path, max_pixels) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class Pair:
    """An inpainting input: ``NAME.<ext>`` and its mask ``NAME_mask.<ext>``."""
    name: str
    image: Path
    mask: Path


def mask_name(path: PathLike) -> Optional[str]:
    """``NAME`` when ``path`` is a mask file by the one rule of the project, ``NAME_mask.<ext>`` (the suffix and
    the extension of :data:`IMAGE_EXTENSIONS` in any case, NAME exactly), else None."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.stem.lower().endswith(MASK_SUFFIX):
        return None
    return path.stem[: -len(MASK_SUFFIX)]


def find_pairs(indir: PathLike) -> Tuple[List[Pair], List[str]]:
    """Image/mask pairs in ``indir`` (sorted by name), and one message per file that is not part of a pair.

    Extensions (:data:`IMAGE_EXTENSIONS`) and the ``_mask`` suffix match in any case; NAME itself exactly. Two
    images (or masks) of one NAME with different extensions are ambiguous and reported."""
    images: dict = {}
    masks: dict = {}
    for p in sorted(Path(indir).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        name = mask_name(p)
        (images if name is None else masks).setdefault(p.stem if name is None else name, []).append(p)
    problems = []
    for kind, found in (("images", images), ("masks", masks)):
        for name in sorted(n for n, ps in found.items() if len(ps) > 1):
            problems.append(f"{', '.join(str(p) for p in found.pop(name))}: two {kind} named {name!r}; keep one")
    pairs = [Pair(name, images[name][0], masks[name][0]) for name in sorted(images.keys() & masks.keys())]
    problems += [f"{masks[n][0]}: mask without its image {n}.<{'|'.join(e[1:] for e in IMAGE_EXTENSIONS)}>"
                 for n in sorted(masks.keys() - images.keys())]
    problems += [f"{images[n][0]}: image without its mask {n}{MASK_SUFFIX}.<ext>"
                 for n in sorted(images.keys() - masks.keys())]
    return pairs, problems


def fit_size(width: int, height: int, max_size: int, multiple: int = 64) -> Tuple[int, int]:
    """The original inpainting script's size rule: scale the longest side down to ``max_size`` (never up), then
    floor both sides to a multiple of ``multiple``."""
    if max(width, height) > max_size:
        factor = max_size / max(width, height)
        width, height = int(factor * width), int(factor * height)
    return width - width % multiple, height - height % multiple


def read_pair(pair: Pair, max_size: int, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
              multiple: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """One pair sized by :func:`fit_size`: image (1,3,H,W) in [-1,1] (8-bit values, bicubic), mask (1,1,H,W) in
    {0,1} (``>= 0.5`` is 1 = generate, nearest)."""
    image = Image.fromarray(to_uint8(to_tensor(read_image(pair.image, max_pixels)))[0])
    mask = read_mask(pair.mask, max_pixels)
    if image.size != mask.shape[::-1]:
        raise InputError(f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but {pair.image.name} is "
                             f"{image.size[0]}x{image.size[1]}")
    width, height = fit_size(*image.size, max_size=max_size, multiple=multiple)
    if width == 0 or height == 0:
        raise InputError(f"{pair.image}: {image.size[0]}x{image.size[1]} is too small (each side must reach "
                             f"{multiple} pixels after scaling to --max_size {max_size})")
    binary = Image.fromarray(np.where(mask >= 0.5, 255, 0).astype(np.uint8))
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.BICUBIC)
        # the original resized the image only, so sizes no longer matched (its issue #12); nearest keeps it binary
        binary = binary.resize((width, height), resample=Image.NEAREST)
    mask_t = torch.from_numpy(np.asarray(binary) > 127).float()[None, None]
    return to_tensor(np.asarray(image, dtype=np.float32) / 255.0), mask_t


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H,W,3) array in [0, 1] -> (1,3,H,W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None] * 2.0 - 1.0


class NonFiniteError(ValueError):
    """A model output with NaN or infinite values; callers add which checkpoint and input produced it."""


def check_finite(x: torch.Tensor, what: str = "the output") -> torch.Tensor:
    """``x`` unchanged if every value is finite, else :class:`NonFiniteError` naming ``what``."""
    finite = torch.isfinite(x.detach())
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        hint = " (float16 overflow? run in float32)" if x.dtype in (torch.float16, torch.bfloat16) else ""
        raise NonFiniteError(f"{what}: {bad} of {finite.numel()} values are NaN or infinite{hint}; nothing was "
                             "written from it")
    return x


def to_uint8(images: torch.Tensor, what: str = "the image") -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8, clamped and rounded to the nearest 8-bit value; NaN / inf are a
    :class:`NonFiniteError` naming ``what`` (clamping would turn them into black or white pixels)."""
    check_finite(images, what)
    x = torch.clamp((images.detach().float().cpu() + 1.0) * 127.5, 0.0, 255.0)
    return torch.round(x).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the value an 8-bit file written by :func:`to_uint8` holds, back in [0, 1] (same dtype)."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def _png(array: np.ndarray) -> Callable[[str], None]:
    return lambda tmp: Image.fromarray(array).save(tmp, format="PNG")


def write_png(array: np.ndarray, path: PathLike, overwrite: bool = True) -> Path:
    """Write an (H,W,3) or (H,W) uint8 array as PNG atomically; ``overwrite=False`` raises ``FileExistsError``
    instead of replacing a file at ``path`` (checked at the moment of the rename)."""
    return write_atomically(path, _png(array), overwrite=overwrite)


def write_png_numbered(array: np.ndarray, folder: PathLike, name: Callable[[int], str], start: int) -> Path:
    """Write a PNG as ``folder/name(n)``, the first free ``n >= start`` at the moment of writing (never an existing
    file, also when other runs write into ``folder`` at the same time); returns its path."""
    return write_numbered(folder, name, start, _png(array))
