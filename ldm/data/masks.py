"""LaMa-style random masks (thick strokes and boxes), as used to train the asymmetric decoder.

Convention: ``1`` = region to generate, ``0`` = keep. Masks are ``float32`` arrays of shape ``(H, W)``.

The distribution is LaMa's ``MixedMaskGenerator`` with its ramp at full strength (the paper's
``configs/autoencoder/random_thick_256.yaml``):

* the kind is drawn with probabilities proportional to ``irregular_proba`` and ``box_proba`` (1 : 0.3);
* strokes: ``min_times .. max_times + 1`` strokes (LaMa's ramp formula adds the 1), each starting at a uniform pixel
  and made of ``1 .. 5`` line segments; a segment has angle ``0.01 + randint(max_angle)`` radians (mirrored to
  ``2 pi - angle`` on even strokes), length ``10 + randint(max_len)`` and width ``5 + randint(max_width)``;
* boxes: ``min_times .. max_times`` boxes, sides uniform in ``bbox_min_size .. bbox_max_size``, ``margin`` pixels
  away from the border.

Pixel sizes are defined at ``reference_size``; at another resolution they are scaled by ``min(H, W) / reference_size``
so the covered fraction does not depend on the resolution (at ``reference_size`` the draws are LaMa's exactly).
Randomness comes only from the ``np.random.Generator`` passed in, so a seed fixes the mask.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Tuple, Union

import cv2
import numpy as np
from omegaconf import OmegaConf

from ..project import load_yaml, resolve_config_path

DEFAULT_MASK_CONFIG = "configs/autoencoder/random_thick_256.yaml"

# Keys of the original yaml's ``mask_generator_kwargs`` that need no code: ``variants_n`` drew several masks per image
# and kept one at random, which has the same distribution as drawing one.
_IGNORED_KEYS = ("variants_n",)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def irregular_mask(height: int, width: int, rng: np.random.Generator, *, max_angle: int = 4, max_len: int = 200,
                   max_width: int = 100, min_times: int = 1, max_times: int = 5, scale: float = 1.0) -> np.ndarray:
    """Thick random strokes, ``(height, width)`` float32 in {0, 1}; lengths and widths are multiplied by ``scale``."""
    mask = np.zeros((height, width), np.float32)
    for stroke in range(rng.integers(min_times, max_times + 2)):
        x, y = int(rng.integers(width)), int(rng.integers(height))
        for _ in range(1 + rng.integers(5)):
            angle = 0.01 + rng.integers(max_angle)
            if stroke % 2 == 0:
                angle = 2 * math.pi - angle
            length = (10 + rng.integers(max_len)) * scale
            brush = max(1, round((5 + int(rng.integers(max_width))) * scale))
            # int() truncates toward zero like LaMa's astype(int32); the end may sit on the border (cv2 clips).
            end_x = min(max(int(x + length * math.sin(angle)), 0), width)
            end_y = min(max(int(y + length * math.cos(angle)), 0), height)
            cv2.line(mask, (x, y), (end_x, end_y), 1.0, brush)
            x, y = end_x, end_y
    return mask


def box_mask(height: int, width: int, rng: np.random.Generator, *, margin: int = 10, bbox_min_size: int = 30,
             bbox_max_size: int = 150, min_times: int = 1, max_times: int = 3, scale: float = 1.0) -> np.ndarray:
    """Random axis-aligned boxes, ``(height, width)`` float32 in {0, 1}; sizes and margin are multiplied by ``scale``.

    Box sides are drawn in reference pixels (so ``scale == 1`` is LaMa's draw) and then scaled.
    """
    mask = np.zeros((height, width), np.float32)
    margin_px = round(margin * scale)
    # LaMa shrinks the largest box to what fits inside the margins; measured here in reference pixels.
    fit = min(height, width) / scale - 2 * margin
    high = min(bbox_max_size + 1, math.floor(fit + 1e-6))
    if high <= bbox_min_size:  # only reachable with scale != min(H, W) / reference_size
        high = bbox_min_size + 1
    for _ in range(rng.integers(min_times, max_times + 1)):
        box_w = int(rng.integers(bbox_min_size, high))
        box_h = int(rng.integers(bbox_min_size, high))
        box_w = min(max(1, round(box_w * scale)), width - 2 * margin_px)
        box_h = min(max(1, round(box_h * scale)), height - 2 * margin_px)
        x = int(rng.integers(margin_px, width - margin_px - box_w + 1))
        y = int(rng.integers(margin_px, height - margin_px - box_h + 1))
        mask[y:y + box_h, x:x + box_w] = 1.0
    return mask


class MaskGenerator:
    """Mixed stroke/box mask generator (LaMa's ``MixedMaskGenerator`` restricted to what the paper uses).

    Args:
        irregular_proba, box_proba: relative weights of the two kinds (normalised to sum to 1).
        irregular_kwargs: ``max_angle, max_len, max_width, min_times, max_times`` of :func:`irregular_mask`.
        box_kwargs: ``margin, bbox_min_size, bbox_max_size, min_times, max_times`` of :func:`box_mask`.
        segm_proba, squares_proba: LaMa's other kinds; accepted so LaMa configs load, must be 0.
        reference_size: the image side at which the pixel sizes above apply.
    """

    def __init__(self, irregular_proba: float = 1.0, irregular_kwargs: Optional[Mapping[str, int]] = None,
                 box_proba: float = 0.3, box_kwargs: Optional[Mapping[str, int]] = None, segm_proba: float = 0.0,
                 squares_proba: float = 0.0, reference_size: int = 256):
        if segm_proba or squares_proba:
            raise ValueError(f"segm_proba={segm_proba}, squares_proba={squares_proba}: only strokes (irregular) and "
                             "boxes are implemented, as used by the paper; set both to 0")
        if irregular_proba < 0 or box_proba < 0 or irregular_proba + box_proba <= 0:
            raise ValueError(f"irregular_proba={irregular_proba}, box_proba={box_proba}: need non-negative weights "
                             "with a positive sum")
        self.reference_size = _check_int("reference_size", reference_size, 1)
        self.irregular_kwargs = self._checked("irregular_kwargs", irregular_kwargs, irregular_mask)
        self.box_kwargs = self._checked("box_kwargs", box_kwargs, box_mask)
        if self.box_kwargs["bbox_min_size"] > self.box_kwargs["bbox_max_size"]:
            raise ValueError(f"box_kwargs: bbox_min_size > bbox_max_size ({self.box_kwargs})")
        if self.box_kwargs["bbox_min_size"] >= self.reference_size - 2 * self.box_kwargs["margin"]:
            raise ValueError(f"box_kwargs: a box of bbox_min_size={self.box_kwargs['bbox_min_size']} does not fit "
                             f"inside margin={self.box_kwargs['margin']} at reference_size={self.reference_size}")
        total = irregular_proba + box_proba
        self.kinds = ("irregular", "box")
        self.probs = np.array([irregular_proba / total, box_proba / total])

    @staticmethod
    def _checked(name: str, kwargs: Optional[Mapping[str, int]], fn: Any) -> dict:
        kwargs = dict(kwargs or {})
        allowed = [k for k in fn.__kwdefaults__ if k != "scale"]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"{name}: unknown keys {unknown}; allowed: {allowed}")
        merged = {**fn.__kwdefaults__, **kwargs}
        del merged["scale"]
        for key, value in merged.items():
            _check_int(f"{name}.{key}", value, 0 if key in ("margin", "min_times", "max_times") else 1)
        if merged["min_times"] > merged["max_times"]:
            raise ValueError(f"{name}: min_times > max_times ({merged})")
        return merged

    @classmethod
    def from_config(cls, config: Union[str, os.PathLike, Mapping[str, Any]] = DEFAULT_MASK_CONFIG) -> "MaskGenerator":
        """Build from a yaml path (repo-relative paths work from any directory) or a dict.

        The dict is either a whole mask config (with ``mask_generator_kwargs``, as in the yaml) or those kwargs.
        """
        source = "mask config dict"
        if isinstance(config, (str, os.PathLike)):
            path = resolve_config_path(config)
            source = str(path)
            config = OmegaConf.to_container(load_yaml(path), resolve=True)
        elif OmegaConf.is_config(config):
            config = OmegaConf.to_container(config, resolve=True)
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: expected a mapping, got {type(config).__name__}")
        kwargs = dict(config.get("mask_generator_kwargs", config))
        for key in _IGNORED_KEYS:
            kwargs.pop(key, None)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    def generate(self, height: int, width: int, rng: np.random.Generator) -> Tuple[np.ndarray, str]:
        """One mask ``(height, width)`` float32 in {0, 1} and its kind (``"irregular"`` or ``"box"``)."""
        _check_int("height", height, 1)
        _check_int("width", width, 1)
        kind = self.kinds[rng.choice(len(self.kinds), p=self.probs)]
        scale = min(height, width) / self.reference_size
        if kind == "irregular":
            return irregular_mask(height, width, rng, scale=scale, **self.irregular_kwargs), kind
        return box_mask(height, width, rng, scale=scale, **self.box_kwargs), kind

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """One mask ``(height, width)`` float32 in {0, 1}, 1 = generate."""
        return self.generate(height, width, rng)[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(probs={dict(zip(self.kinds, self.probs.round(4).tolist()))}, "
                f"irregular={self.irregular_kwargs}, box={self.box_kwargs}, reference_size={self.reference_size})")
