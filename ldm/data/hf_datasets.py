"""Hugging Face ``datasets`` as inpainting training data: a folder written by ``Dataset.save_to_disk`` or parquet /
arrow files with an image column (the input of diffusers' ``train_autoencoderkl.py``), read locally.

A map-style dataset, so the DataModule's sampler shards it between DDP ranks and resumes mid-epoch exactly as for
an image folder. The image column is read undecoded (``Image(decode=False)``: the encoded bytes) and decoded by the
project's one image rule (:func:`ldm.image_io.open_image`: EXIF orientation, size limit, modes), then goes through
:class:`~ldm.data.inpainting.InpaintingTransform`, the per-sample recipe of every data source.

Checked when the dataset is built, before any batch: a dataset of no rows is named as empty, and the image column
must hold encoded images (an ``Image`` feature, binary values, or a struct of ``bytes`` / ``path``).

Parquet and arrow files are read through ``datasets.load_dataset``, which converts them once into Arrow files of its
cache (``HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``) and reuses them later; the log names
that folder. A ``save_to_disk`` folder is read where it is, without a copy.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from torch.utils.data import Dataset

from ..data.inpainting import (
    InpaintingTransform,
    PathLike,
    check_seed,
    first_readable,
    sample_rng,
)
from ..data.masks import DEFAULT_MASK_CONFIG
from ..image_io import DEFAULT_MAX_PIXELS, InputError, open_image

log = logging.getLogger(__name__)

FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}


def load_hf_dataset(path: Optional[PathLike] = None, data_files: Union[None, str, Sequence[str]] = None,
                    split: str = "train") -> Any:
    """``path``: a ``save_to_disk`` folder (a ``DatasetDict`` gives its ``split``); ``data_files``: parquet or
    arrow files (globs allowed) -> a ``datasets.Dataset``. Nothing is downloaded."""
    import datasets

    if (path is None) == (data_files is None):
        raise ValueError("give path (a save_to_disk folder) or data_files (parquet / arrow files), not both")
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"path: no dataset folder at {path} (a folder written by save_to_disk)")
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"path: {path} is not a save_to_disk folder ({err})") from None
        except IndexError:  # datasets' own error for a saved dataset without data files
            if not _saved_without_rows(path):
                raise
            raise ValueError(f"path: {path} is an empty dataset (saved with 0 rows)") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split: {split!r} not in {path} (splits: {sorted(ds)})")
            ds = ds[split]
        return ds
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    files = sorted(f for p in patterns for f in glob.glob(os.path.expanduser(str(p))))
    if not files:
        raise FileNotFoundError(f"data_files: no files match {patterns}")
    kinds = {FILE_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data_files: expected only .parquet or only .arrow files, got {files[:3]}")
    log.info("reading %d %s file(s) through the datasets cache (%s): converted to Arrow there once", len(files),
             next(iter(kinds)), datasets.config.HF_DATASETS_CACHE)
    try:
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise
        raise ValueError(f"data_files: {files[0]}{f' and {len(files) - 1} more' if len(files) > 1 else ''} "
                         "hold an empty dataset (0 rows)") from None


def _saved_without_rows(path: Path) -> bool:
    """A ``save_to_disk`` folder (or one of its splits) that lists no data files: a dataset of 0 rows."""
    for state in [path / "state.json", *path.glob("*/state.json")]:
        try:
            if not json.loads(state.read_text()).get("_data_files"):
                return True
        except (OSError, ValueError):
            continue
    return False


def _check_image_column(features: Any, column: str, where: str) -> None:
    """``ValueError`` unless ``features[column]`` can hold encoded images: an ``Image`` feature, binary values, or
    a struct with ``bytes`` and / or ``path`` (binary / string)."""
    import datasets

    feature = features[column]
    if isinstance(feature, datasets.Image):
        return
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return
    if isinstance(feature, dict) and feature and set(feature) <= {"bytes", "path"}:
        kinds = {"bytes": ("binary", "large_binary"), "path": ("string", "large_string")}
        if all(isinstance(f, datasets.Value) and f.dtype in kinds[k] for k, f in feature.items()):
            return
    raise ValueError(f"image_column: {column!r} of {where} holds {feature}, not images (an Image feature, binary "
                     "values, or a struct of bytes / path)")


class HFDatasetInpainting(Dataset):
    """Inpainting samples from a local Hugging Face dataset; ``{"image", "mask", "path"}`` as an image folder gives.

    Args:
        path: a ``save_to_disk`` folder; or ``data_files``: parquet / arrow files (a glob or a list).
        split: the split of a saved ``DatasetDict``.
        image_column: the column holding the images (an ``Image`` feature, or a struct with ``bytes`` / ``path``).
        size, mask_config, no_mask_prob, random_crop, min_crop_frac: the recipe
            (:class:`~ldm.data.inpainting.InpaintingTransform`).
        fixed_masks: draw everything for row ``i`` from ``(seed, i)`` (validation).
        seed: base seed mixed into every generator.
        max_pixels: larger images are skipped with a warning (:mod:`ldm.image_io`).
    """

    def __init__(self, path: Optional[PathLike] = None, data_files: Union[None, str, Sequence[str]] = None,
                 split: str = "train", image_column: str = "image", size: int = 256,
                 mask_config: Union[PathLike, Mapping[str, Any]] = DEFAULT_MASK_CONFIG, no_mask_prob: float = 0.5,
                 random_crop: bool = True, min_crop_frac: float = 0.5, fixed_masks: bool = False, seed: int = 0,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        import datasets

        self.transform = InpaintingTransform(size, mask_config, no_mask_prob, random_crop, min_crop_frac)
        self.seed = check_seed(seed)
        ds = load_hf_dataset(path, data_files, split)
        source = str(path if path is not None else data_files)
        if image_column not in ds.column_names:
            raise ValueError(f"image_column: no column {image_column!r} (columns: {ds.column_names})")
        if len(ds) == 0:
            raise ValueError(f"{source} is an empty dataset (0 rows)")
        _check_image_column(ds.features, image_column, source)
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.data = ds.select_columns([image_column])
        self.image_column = image_column
        self.source = source
        self.fixed_masks = bool(fixed_masks)
        self.max_pixels = max_pixels
        self._warned: set = set()
        log.info("%s: %d images from %s", type(self).__name__, len(self.data), self.source)

    def __len__(self) -> int:
        return len(self.data)

    def _read(self, index: int) -> Dict[str, Any]:
        value = self.data[index][self.image_column]
        name = f"{self.source}[{index}]"
        if isinstance(value, Mapping):
            name = value.get("path") or name
            data = value.get("bytes")
            if data is None and value.get("path"):
                return {"name": name, "path": value["path"]}
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        else:
            raise InputError(f"{name}: {self.image_column} holds {type(value).__name__}, not encoded image bytes")
        return {"name": name, "data": data}

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < len(self.data):
            raise IndexError(f"index {index} out of range for {len(self.data)} rows")
        rng = sample_rng(self.seed, index if self.fixed_masks else None)

        def load(i: int) -> Dict[str, Any]:
            item = self._read(i)
            with open_image(item.get("path", item["name"]), self.max_pixels, data=item.get("data")) as img:
                return self.transform(img, item["name"], rng)

        return first_readable(index, len(self.data), load, self._warned, f"row {index} of {self.source}")
