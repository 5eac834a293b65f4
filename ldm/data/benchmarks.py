"""Public inpainting benchmarks read as (name, image, mask) items, for users who have the data.

* MISATO (Wang et al., "Towards Stable and Faithful Inpainting", the ASUKA paper): a folder per resolution (512 and
  1K) holding ``image/NNNN.png`` and ``mask/NNNN.png``; images 0000-0499 are outdoor landscapes, 0500-0999 indoor
  scenes, 1000-1499 buildings, 1500-1999 backgrounds (:func:`misato_domain`).
* BrushBench (BrushNet): ``mapping_file.json`` maps each key to ``{"image": relative path, "inpainting_mask": RLE,
  "outpainting_mask": RLE, "caption": ...}``; an RLE is a flat list ``start, length, ...`` (starts 1-based) over the
  512 x 512 mask in row-major order, 1 = generate (BrushNet's ``rle2mask``). ``inside`` reads the inpainting masks,
  ``outside`` the outpainting ones.

Masks follow the project's convention: (H, W) float32 in {0, 1}, 1 = generate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..image_io import IMAGE_EXTENSIONS, InputError

BRUSHBENCH_SIZE = (512, 512)
BRUSHBENCH_MASK_KEYS = {"inside": "inpainting_mask", "outside": "outpainting_mask"}
MISATO_DOMAINS = ((0, "outdoor landscape"), (500, "indoor"), (1000, "building"), (1500, "background"))


@dataclass
class BenchmarkItem:
    """One image of a benchmark: its name (the report's and the predictions' file name), the image file and the
    mask, a file (MISATO) or an array (BrushBench)."""
    name: str
    image_path: Path
    mask_path: Optional[Path] = None
    mask: Optional[np.ndarray] = None


def rle_decode(rle: Sequence[int], shape: Tuple[int, int] = BRUSHBENCH_SIZE) -> np.ndarray:
    """BrushNet's ``rle2mask``: runs ``start, length`` (start 1-based) over the flattened (H, W) mask, row-major;
    (H, W) float32, 1 inside a run. A run outside the mask, a negative length or an odd count is refused."""
    values = np.asarray(rle, dtype=np.int64).ravel()
    if values.size % 2:
        raise ValueError(f"an RLE holds start, length pairs: got {values.size} numbers")
    starts, lengths = values[0::2] - 1, values[1::2]
    total = shape[0] * shape[1]
    if (starts < 0).any() or (lengths < 0).any() or (starts + lengths > total).any():
        raise ValueError(f"an RLE run lies outside the {shape[1]}x{shape[0]} mask")
    flat = np.zeros(total, np.float32)
    for start, length in zip(starts, lengths):
        flat[start:start + length] = 1
    return flat.reshape(shape)


def misato_domain(name: str) -> Optional[str]:
    """MISATO's domain of image ``NNNN`` (None for a name that is not a number in 0..1999)."""
    if not name.isdigit() or not 0 <= int(name) < 2000:
        return None
    return [domain for first, domain in MISATO_DOMAINS if int(name) >= first][-1]


def _files(folder: Path) -> dict:
    return {p.stem: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS}


def misato_items(root: Union[str, Path]) -> List[BenchmarkItem]:
    """MISATO at one resolution: ``root/image/NAME.png`` with ``root/mask/NAME.png``, in sorted order. Every image
    needs its mask and every mask its image (counts that differ mean the folders do not belong together)."""
    root = Path(root).expanduser()
    image_dir, mask_dir = root / "image", root / "mask"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise InputError(f"MISATO {root}: no folder {folder} (expected image/ and mask/, as MISATO's 512 and "
                             "1K folders hold)")
    images, masks = _files(image_dir), _files(mask_dir)
    missing, extra = sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())
    if missing or extra:
        problems = ([f"no mask for {', '.join(str(images[n]) for n in missing[:5])}"] if missing else []) + \
                   ([f"no image for {', '.join(str(masks[n]) for n in extra[:5])}"] if extra else [])
        raise InputError(f"MISATO {root}: {len(images)} images, {len(masks)} masks; " + "; ".join(problems))
    if not images:
        raise InputError(f"MISATO {root}: {image_dir} holds no images")
    return [BenchmarkItem(name, images[name], mask_path=masks[name]) for name in sorted(images)]


def brushbench_items(root: Union[str, Path], masks: str = "inside",
                     mapping_file: Optional[Union[str, Path]] = None) -> List[BenchmarkItem]:
    """BrushBench: ``root/mapping_file.json`` (or ``mapping_file``), each key's image under ``root`` with its
    ``inside`` (inpainting) or ``outside`` (outpainting) mask decoded at 512 x 512; named by key, in file order."""
    if masks not in BRUSHBENCH_MASK_KEYS:
        raise InputError(f"BrushBench masks {masks!r}: inside or outside")
    root = Path(root).expanduser()
    path = Path(mapping_file).expanduser() if mapping_file else root / "mapping_file.json"
    try:
        mapping = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"BrushBench {root}: no {path}") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable BrushBench mapping file ({err})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"{path}: expected an object of entries, got {type(mapping).__name__}")
    key = BRUSHBENCH_MASK_KEYS[masks]
    items = []
    for name, entry in mapping.items():
        if not isinstance(entry, dict) or "image" not in entry or key not in entry:
            raise InputError(f"{path}: entry {name!r} has no 'image' and {key!r}")
        image = root / entry["image"]
        if not image.is_file():
            raise InputError(f"{path}: entry {name!r}: image {image} not found")
        try:
            mask = rle_decode(entry[key])
        except (ValueError, TypeError) as err:
            raise InputError(f"{path}: entry {name!r}: {key}: {err}") from None
        items.append(BenchmarkItem(str(name), image, mask=mask))
    return items


def benchmark_items(spec: str) -> Tuple[str, List[BenchmarkItem]]:
    """``misato=DIR``, ``brushbench=DIR`` (inside masks) or ``brushbench_outside=DIR`` -> (kind, items)."""
    kind, sep, folder = spec.partition("=")
    if not sep or not folder:
        raise InputError(f"--benchmark {spec!r}: expected misato=DIR, brushbench=DIR or brushbench_outside=DIR")
    if kind == "misato":
        return kind, misato_items(folder)
    if kind in ("brushbench", "brushbench_inside", "brushbench_outside"):
        return kind, brushbench_items(folder, "outside" if kind.endswith("outside") else "inside")
    raise InputError(f"--benchmark {spec!r}: unknown benchmark {kind!r} (misato, brushbench, brushbench_outside)")
