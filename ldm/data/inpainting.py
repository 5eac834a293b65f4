"""Image folders as inpainting training data: ``{"image", "mask", "path"}`` samples for the asymmetric decoder.

Per sample (the original ``ImageNetSR`` recipe): a square crop of side ``int(min_side * U(min_crop_frac, 1))`` at a
random position, resized to ``size`` with area interpolation, scaled to [-1, 1]; a LaMa mask from ``mask_config``
(1 = generate, 0 = keep), replaced by an all-ones mask ("no condition") with probability ``no_mask_prob`` (the
original's ``Cf_r``). Validation (``random_crop=False``) takes the largest centre square instead.

Randomness:

* ``fixed_masks=False`` (training): each sample draws one 62-bit number from torch's default generator (as
  torchvision's random transforms do) and seeds a ``np.random.Generator`` with ``(seed, that number, global rank)``.
  DataLoader workers have their own torch generator seeded ``base_seed + worker_id`` (or Lightning's per-rank seed
  with ``seed_everything(workers=True)``), ``base_seed`` being drawn from the main process's generator for every
  epoch, so workers, ranks and epochs differ and ``seed_everything(s)`` / ``torch.manual_seed(s)`` reproduces a run
  for a fixed ``num_workers``. No ``worker_init_fn`` is needed.
* ``fixed_masks=True`` (validation): every draw of sample ``i`` (crop, no-mask coin, mask) comes from a generator
  seeded by ``(seed, i)``, so numbers are comparable between runs, processes and worker counts.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..data.masks import DEFAULT_MASK_CONFIG, MaskGenerator
from ..image_io import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, InputError, open_image, to_rgb
from ..util import PathLike

log = logging.getLogger(__name__)

# Unreadable files in a row before giving up: a few are data noise, a long run means a broken dataset.
_MAX_CONSECUTIVE_SKIPS = 32
# Small-image warnings per process; ImageNet has thousands of images under 256 px.
_MAX_SMALL_WARNINGS = 20


def _normalise_extensions(extensions: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = [extensions]
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise ValueError("extensions: empty")
    return exts


def _seen(path: str, visited: set, inside: set) -> bool:
    return path in visited or path in inside


def find_images(root: PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Sorted image paths under ``root``, recursively (``root/class/x.JPEG`` and flat folders); hidden entries skipped.

    Links are followed, but never into a folder already visited or one the scan is inside (a link loop, a link
    to a parent folder): each folder's images count once. Sorting makes indices identical across runs and DDP ranks.
    """
    exts = _normalise_extensions(extensions)
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"root: image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"root: not a folder: {root} (pass a list of images as file_list instead)")
    paths = []
    visited = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # reached again through another link
            dirs[:] = []
            continue
        visited.add(real)
        inside = {real, *map(str, Path(real).parents)}  # a link to one of these would loop
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not _seen(os.path.realpath(os.path.join(folder, d)), visited, inside)]
        paths.extend(os.path.join(folder, f) for f in files
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts)
    if not paths:
        raise ValueError(f"root: no images with extensions {list(exts)} under {root}")
    return sorted(paths)


def read_file_list(file_list: PathLike, root: Optional[PathLike] = None) -> List[str]:
    """Paths listed one per line in ``file_list`` (blank lines and ``#`` comments skipped), in file order.

    Relative entries resolve against ``root`` if given, else against the list's folder (the original ImageNet
    ``filelist.txt`` holds ``synset/name.JPEG`` relative to the data folder). Only the first entry is checked here;
    later missing files are skipped with a warning when read.
    """
    file_list = Path(file_list).expanduser()
    if not file_list.is_file():
        raise FileNotFoundError(f"file_list: not found: {file_list}")
    base = Path(root).expanduser() if root is not None else file_list.parent
    entries = []
    with open(file_list, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(line if os.path.isabs(line) else str(base / line))
    if not entries:
        raise ValueError(f"file_list: no image paths in {file_list}")
    if not os.path.isfile(entries[0]):
        raise FileNotFoundError(f"file_list: first entry {entries[0]} of {file_list} does not exist "
                                f"(relative entries resolve against {base}; set root to the data folder)")
    return entries


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


class InpaintingTransform:
    """The per-sample recipe, shared by every data source (image folders, webdataset shards, Hugging Face datasets).

    ``transform(img, name, rng)`` takes a decoded PIL image and returns ``{"image": (3, size, size) float32 in
    [-1, 1], "mask": (1, size, size) float32 in {0, 1} (1 = generate), "path": name}``: the crop of the module
    docstring, area resizing, the mask (or, with probability ``no_mask_prob``, all ones). Every draw comes from
    ``rng``, so the caller decides the seeding (:func:`sample_rng`).

    Args:
        size: output side in pixels.
        mask_config: mask yaml path (repo-relative works from anywhere) or dict, see :class:`MaskGenerator`.
        no_mask_prob: probability of an all-ones mask (the decoder then gets no condition).
        random_crop: random crop of random side (training); False: largest centre square (validation).
        min_crop_frac: the crop side is ``int(min_side * U(min_crop_frac, 1))`` when ``random_crop``.
    """

    def __init__(self, size: int = 256, mask_config: Union[PathLike, Mapping[str, Any]] = DEFAULT_MASK_CONFIG,
                 no_mask_prob: float = 0.5, random_crop: bool = True, min_crop_frac: float = 0.5):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if not 0.0 <= no_mask_prob <= 1.0:
            raise ValueError(f"no_mask_prob must be in [0, 1], got {no_mask_prob!r}")
        if not 0.0 < min_crop_frac <= 1.0:
            raise ValueError(f"min_crop_frac must be in (0, 1], got {min_crop_frac!r}")
        self.size = size
        self.no_mask_prob = float(no_mask_prob)
        self.random_crop = bool(random_crop)
        self.min_crop_frac = float(min_crop_frac)
        self.mask_generator = MaskGenerator.from_config(mask_config)
        self._warned: set = set()
        self._small_warnings = 0

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> Tuple[int, int, int, int]:
        min_side = min(width, height)
        if not self.random_crop:
            side = min_side
            x, y = (width - side) // 2, (height - side) // 2
        else:
            side = max(1, int(min_side * rng.uniform(self.min_crop_frac, 1.0)))
            x = int(rng.integers(0, width - side + 1))
            y = int(rng.integers(0, height - side + 1))
        return x, y, x + side, y + side

    def _warn_small(self, name: str, width: int, height: int) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        self._small_warnings += 1
        if self._small_warnings <= _MAX_SMALL_WARNINGS:
            suffix = " (further small-image warnings suppressed)" if self._small_warnings == _MAX_SMALL_WARNINGS else ""
            log.warning("%s is %dx%d, smaller than size=%d: upscaling%s", name, width, height, self.size, suffix)

    def __call__(self, img: Image.Image, name: str, rng: np.random.Generator) -> Dict[str, Any]:
        width, height = img.size
        if min(width, height) < self.size:
            self._warn_small(name, width, height)
        crop = to_rgb(img.crop(self.crop_box(width, height, rng)), name)
        if crop.shape[0] != self.size:
            crop = cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA)
        if rng.random() < self.no_mask_prob:
            mask = np.ones((self.size, self.size), np.float32)
        else:
            mask = self.mask_generator(self.size, self.size, rng)
        image = np.clip(crop, 0.0, 1.0) * 2.0 - 1.0  # resizing in float32 can leave 1 + eps
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)),
                "mask": torch.from_numpy(mask[None]),
                "path": name}


def sample_rng(seed: int, fixed_key: Optional[int] = None) -> np.random.Generator:
    """The generator of one sample. ``fixed_key`` (validation): seeded by ``(seed, fixed_key)`` alone, the same in
    every run, process and worker. None (training): one 62-bit draw from torch's default generator mixed with the
    seed and the global rank (see the module docstring)."""
    if fixed_key is not None:
        return np.random.default_rng([seed, fixed_key])
    draw = int(torch.randint(0, 2 ** 62, ()).item())
    return np.random.default_rng([seed, draw, _global_rank()])


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


class ImageFolderInpainting(Dataset):
    """Square crops of the images under ``root`` (or in ``file_list``) with random inpainting masks.

    Returns ``{"image": (3, size, size) float32 in [-1, 1], "mask": (1, size, size) float32 in {0, 1}
    (1 = generate), "path": str}`` (:class:`InpaintingTransform`). See the module docstring for the crop/mask
    recipe and the seeding.

    Args:
        root: image folder, scanned recursively; with ``file_list``, the base of its relative entries.
        file_list: text file with one image path per line (e.g. an ImageNet subset), used instead of scanning.
        size, mask_config, no_mask_prob, random_crop, min_crop_frac: the recipe, see :class:`InpaintingTransform`.
        fixed_masks: draw everything for sample ``i`` from ``(seed, i)`` (validation).
        seed: base seed mixed into every generator.
        extensions: file suffixes taken when scanning ``root`` (case-insensitive).
        max_pixels: larger files are skipped with a warning (see :mod:`ldm.image_io`, which reads every file).
    """

    def __init__(self, root: Optional[PathLike] = None, file_list: Optional[PathLike] = None, size: int = 256,
                 mask_config: Union[PathLike, Mapping[str, Any]] = DEFAULT_MASK_CONFIG, no_mask_prob: float = 0.5,
                 random_crop: bool = True, min_crop_frac: float = 0.5, fixed_masks: bool = False, seed: int = 0,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.transform = InpaintingTransform(size, mask_config, no_mask_prob, random_crop, min_crop_frac)
        self.seed = check_seed(seed)
        if file_list is not None:
            self.paths = read_file_list(file_list, root)
            source = str(file_list)
        elif root is not None:
            self.paths = find_images(root, extensions)
            source = str(root)
        else:
            raise ValueError("give root (an image folder) or file_list (a text file of image paths)")
        self.fixed_masks = bool(fixed_masks)
        self.max_pixels = max_pixels
        self._warned: set = set()
        log.info("%s: %d images from %s", type(self).__name__, len(self.paths), source)

    @property
    def size(self) -> int:
        return self.transform.size

    @property
    def no_mask_prob(self) -> float:
        return self.transform.no_mask_prob

    @property
    def random_crop(self) -> bool:
        return self.transform.random_crop

    @property
    def min_crop_frac(self) -> float:
        return self.transform.min_crop_frac

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")
        rng = sample_rng(self.seed, index if self.fixed_masks else None)

        def load(i: int) -> Dict[str, Any]:
            with open_image(self.paths[i], self.max_pixels) as img:
                return self.transform(img, self.paths[i], rng)

        return first_readable(index, len(self.paths), load, self._warned, self.paths[index])


def first_readable(index: int, count: int, load: Callable[[int], Dict[str, Any]], warned: set,
                   name: str) -> Dict[str, Any]:
    """``load(index)``, or on an unreadable item (:class:`InputError`, warned once per item) the next ones in turn;
    a long run of unreadable items is a broken dataset: ``RuntimeError`` naming ``name``."""
    for attempt in range(min(_MAX_CONSECUTIVE_SKIPS, count)):
        i = (index + attempt) % count
        try:
            return load(i)
        except InputError as err:
            if i not in warned:
                warned.add(i)
                log.warning("skipping unreadable image: %s", err)
    raise RuntimeError(f"{min(_MAX_CONSECUTIVE_SKIPS, count)} unreadable images in a row from {name}: check the "
                       "dataset")


def _original_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Map the original ``ImageNetSR`` parameter names onto ours (``Cf_r``, ``min_crop_f``)."""
    for old, new in (("Cf_r", "no_mask_prob"), ("min_crop_f", "min_crop_frac")):
        if old in kwargs:
            value = kwargs.pop(old)
            if new in kwargs and kwargs[new] != value:
                raise ValueError(f"{old}={value} and {new}={kwargs[new]} disagree; give one")
            kwargs[new] = value
    for unused in ("degradation", "downscale_f"):
        # The original built a low-resolution copy (LR_image) from these and never used it.
        if kwargs.pop(unused, None) is not None:
            log.info("%s is ignored: it only shaped the original's unused LR_image", unused)
    return kwargs


class ImageNetSRTrain(ImageFolderInpainting):
    """Training split under the original's name: random crops, fresh masks, ``no_mask_prob`` (``Cf_r``) 0.5.

    ``root`` is an ImageNet-style folder (``train/<synset>/*.JPEG``) or any image folder; the original's subset
    (``data/imagenet_train_hr_indices.p``, not public) becomes a ``file_list``.
    """

    def __init__(self, root: Optional[PathLike] = None, **kwargs: Any):
        kwargs = _original_kwargs(kwargs)
        kwargs.setdefault("random_crop", True)
        kwargs.setdefault("fixed_masks", False)
        super().__init__(root=root, **kwargs)


class ImageNetSRValidation(ImageFolderInpainting):
    """Validation split under the original's name: centre crops and masks fixed by ``(seed, index)``; every sample
    has a mask (``no_mask_prob`` 0 unless given), so the kept-region metrics cover every image."""

    def __init__(self, root: Optional[PathLike] = None, **kwargs: Any):
        kwargs = _original_kwargs(kwargs)
        kwargs.setdefault("no_mask_prob", 0.0)
        kwargs.setdefault("random_crop", False)
        kwargs.setdefault("fixed_masks", True)
        super().__init__(root=root, **kwargs)
