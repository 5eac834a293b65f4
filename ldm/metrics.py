"""Region metrics of the paper: how much a decoder distorts what it should keep, and how it does elsewhere.

All functions take ``pred`` and ``target`` as (B,3,H,W) float tensors in [0, 1] and ``mask`` as (B,1,H,W) with
1 = generated (hole), 0 = kept; the mask is binarised at 0.5 as the original evaluation does.

``pre_error`` (docs/design.md, *Metrics*): per image, the squared error over the kept region, summed over
all three channels. The original code reports that sum (``pre_error_sum``); its magnitude does not match the
paper's table, whose numbers match the per-element mean ``pre_error = pre_error_sum / (3*H*W)`` (note: divided by
all pixels of the image, not only the kept ones). Both are returned; tables label which is which.

PSNR of a region is ``10 log10(1 / MSE)`` with the MSE over that region's pixels and channels; identical images
give ``inf`` (:func:`json_safe` writes it as the string ``"inf"``). A region with no pixels gives ``nan``.

Boundary metrics (:func:`boundary_metrics`, docs/evaluation.md): the band PSNRs over the generated pixels within
``band_px`` pixels (chessboard distance) of a kept pixel (``psnr_band_inner``) and over the kept pixels within
``band_px`` of a generated pixel (``psnr_band_outer``), and ``seam_error``: the mean, over every pair of 4-adjacent
pixels on the two sides of the mask edge, of the step the prediction adds beyond the target's own step there.

**The information rule.** A composite row ``X+<recipe>`` may use the decoder's output, the kept pixels
``(1 - mask) * image`` and the mask, never the reference under the mask (in use those pixels are the content being
replaced; in reconstruction they are also the answer). :func:`composite` is the one function every recipe of
:data:`RECIPES` goes through, and it hands the recipe only :func:`visible` pixels; the symmetric recipes
(:data:`SYMMETRIC_RECIPES`, whose blend reaches into the hole) get other content there (:func:`other_content`).
:func:`paste_back` is the bare blending primitive with no such rule.

Gradient metrics (:func:`gradient_error`): the Sobel-gradient difference to the reference on the mask's edge pixels
(``boundary_gradient_error``, MISATO's boundary metric) and over the band of ``blend_px`` either side of the edge
(``band_gradient_error``), with the kept part of that band's PSNR (``psnr_blend_outer``). :func:`paired_bootstrap`
gives the per-image paired differences between two rows a 95 % interval; :func:`verdict` names a winner only where
it excludes zero.

:class:`ImageMetrics` adds the whole-image metrics of the paper's evaluation (SSIM, LPIPS, FID); LPIPS and FID need
weight files on disk and, when they are missing, say which file and where instead.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .modules.mask_edges import DEFAULT_BAND_PX, DEFAULT_BLEND_PX, band_masks, edge_band, edge_pixels

log = logging.getLogger(__name__)

REGION_KEYS = ("pre_error", "pre_error_sum", "mse_kept", "mse_generated", "psnr_kept", "psnr_generated",
               "mse_band_inner", "mse_band_outer", "psnr_band_inner", "psnr_band_outer", "seam_error",
               "boundary_gradient_error", "mse_blend_outer", "psnr_blend_outer", "band_gradient_error")
# per-image values averaged over images by the accumulator; every psnr_* key is computed from its mse_* mean
_MEAN_KEYS = ("pre_error", "pre_error_sum", "mse_kept", "mse_generated", "mse_band_inner", "mse_band_outer",
              "seam_error", "boundary_gradient_error", "mse_blend_outer", "band_gradient_error")
_PSNR_REGIONS = ("kept", "generated", "band_inner", "band_outer", "blend_outer")


def _check(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be (B,C,H,W)")
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} must be (B,1,H,W) matching images {tuple(pred.shape)}")
    return (mask >= 0.5).to(pred.dtype)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def pre_error_sum(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) squared error summed over the kept region and all channels (the original code's number)."""
    keep = 1 - _check(pred, target, mask)
    return ((pred - target) * keep).pow(2).flatten(1).sum(1)


def pre_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) ``pre_error_sum / (C*H*W)``: the magnitude of the paper's table."""
    return pre_error_sum(pred, target, mask) / pred[0].numel()


def region_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, region: str) -> torch.Tensor:
    """(B,) mean squared error over the ``"kept"`` (mask 0) or ``"generated"`` (mask 1) pixels; nan if empty."""
    m = _check(pred, target, mask)
    if region == "kept":
        m = 1 - m
    elif region != "generated":
        raise ValueError(f"region must be 'kept' or 'generated', got {region!r}")
    return _masked_mse(pred, target, m)


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """(B,) MSE over the pixels where ``pixels`` (B,1,H,W) is 1, all channels; nan where there is none."""
    count = pixels.flatten(1).sum(1) * pred.shape[1]
    total = ((pred - target).pow(2) * pixels).flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def seam_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean over every horizontally or vertically adjacent pixel pair (p, q) whose mask values differ of
    ``|(pred(p) - pred(q)) - (target(p) - target(q))|``, averaged over channels: the step the prediction adds at the
    mask edge beyond the target's own step there. nan for an image without such a pair (mask all 0 or all 1)."""
    m = _check(pred, target, mask)
    total = torch.zeros(pred.shape[0], dtype=torch.float64, device=pred.device)
    count = torch.zeros_like(total)
    for dim in (-1, -2):  # horizontal pairs, then vertical pairs
        n = pred.shape[dim] - 1
        step_pred = pred.narrow(dim, 1, n) - pred.narrow(dim, 0, n)
        step_target = target.narrow(dim, 1, n) - target.narrow(dim, 0, n)
        across = (m.narrow(dim, 1, n) != m.narrow(dim, 0, n)).to(torch.float64)
        added = (step_pred - step_target).abs().mean(1, keepdim=True).to(torch.float64)
        total += (added * across).flatten(1).sum(1)
        count += across.flatten(1).sum(1)
    out = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    return out.to(pred.dtype)


def sobel(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gx, gy) of (B,C,H,W): the 3x3 Sobel derivatives divided by 8 (a unit step per pixel gives 1), borders
    reflect-101 (cv2.Sobel's default)."""
    h_idx = _border_index(x.shape[-2], 1, "reflect101").to(x.device)
    w_idx = _border_index(x.shape[-1], 1, "reflect101").to(x.device)
    p = x.index_select(-2, h_idx).index_select(-1, w_idx)
    h, w = x.shape[-2:]

    def at(dy, dx):
        return p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1) - at(-1, -1) - 2 * at(0, -1) - at(1, -1)) / 8
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1) - at(-1, -1) - 2 * at(-1, 0) - at(-1, 1)) / 8
    return gx, gy


def gradient_error(pred: torch.Tensor, target: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """(B,) mean over the pixels where ``pixels`` (B,1,H,W) is 1, and over channels, of the length of the Sobel
    gradient difference ``|grad(pred) - grad(target)|`` (:func:`sobel`); nan where there is no such pixel."""
    (px, py), (tx, ty) = sobel(pred.double()), sobel(target.double())
    diff = ((px - tx) ** 2 + (py - ty) ** 2).sqrt().mean(1, keepdim=True)
    count = pixels.flatten(1).sum(1).double()
    total = (diff * pixels.double()).flatten(1).sum(1)
    out = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
    return out.to(pred.dtype)


def boundary_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     band_px: int = DEFAULT_BAND_PX, blend_px: int = DEFAULT_BLEND_PX) -> Dict[str, torch.Tensor]:
    """Per-image (B,) ``mse_band_inner`` / ``psnr_band_inner`` (generated pixels within ``band_px`` of a kept
    pixel), ``mse_band_outer`` / ``psnr_band_outer`` (kept pixels within ``band_px`` of a generated pixel),
    :func:`seam_error`; ``boundary_gradient_error`` (MISATO's boundary metric: :func:`gradient_error` on the edge
    pixels, both sides); and over the wider blend band, ``blend_px`` either side of the edge, where the recipes blend:
    ``band_gradient_error`` (:func:`gradient_error` over the whole band) and ``mse_blend_outer`` /
    ``psnr_blend_outer`` (its kept part: what a blend costs the kept pixels). Same conventions as :func:`pre_error`
    (images in [0, 1], mask binarised at 0.5). An image whose band is empty (no edge) gives nan there;
    :class:`RegionMetricAccumulator` leaves it out of the means."""
    m = _check(pred, target, mask)
    inner, outer = band_masks(m, band_px)
    out = {}
    for name, pixels in (("band_inner", inner), ("band_outer", outer)):
        out[f"mse_{name}"] = _masked_mse(pred, target, pixels)
        out[f"psnr_{name}"] = psnr_from_mse(out[f"mse_{name}"])
    out["seam_error"] = seam_error(pred, target, m)
    out["boundary_gradient_error"] = gradient_error(pred, target, edge_pixels(m).to(pred.dtype))
    _, blend_outer = band_masks(m, blend_px)
    out["mse_blend_outer"] = _masked_mse(pred, target, blend_outer)
    out["psnr_blend_outer"] = psnr_from_mse(out["mse_blend_outer"])
    out["band_gradient_error"] = gradient_error(pred, target, edge_band(m, blend_px))
    return out


def _border_index(n: int, radius: int, border: str) -> torch.Tensor:
    """Indices ``-radius .. n + radius - 1`` folded into ``0 .. n-1``: ``"reflect101"`` (cv2's default,
    ``dcb|abcd|cba``) or ``"reflect"`` (scipy.ndimage's, ``cba|abcd|dcb``), for any radius."""
    idx = torch.arange(-radius, n + radius)
    if n == 1:
        return torch.zeros_like(idx)
    if border == "reflect101":
        idx = idx.remainder(2 * (n - 1))
        return torch.where(idx >= n, 2 * (n - 1) - idx, idx)
    if border == "reflect":
        idx = idx.remainder(2 * n)
        return torch.where(idx >= n, 2 * n - 1 - idx, idx)
    raise ValueError(f"border must be 'reflect101' or 'reflect', got {border!r}")


def gaussian_blur_mask(mask: torch.Tensor, sigma: float, radius: Optional[int] = None,
                       border: str = "reflect101") -> torch.Tensor:
    """(B,1,H,W) mask blurred as AUTOMATIC1111's "mask blur" R does (``cv2.GaussianBlur`` along x, then along y):
    a separable Gaussian of standard deviation ``sigma`` = R pixels, sampled on a kernel of ``2 * int(2.5 * R + 0.5)
    + 1`` taps (radius about 2.5 sigma; ``radius`` overrides it) and normalised to sum 1, with cv2's default border
    ``BORDER_REFLECT_101`` (``dcb|abcd|cba``, the edge pixel not repeated; ``border="reflect"`` is scipy's
    ``cba|abcd|dcb``), computed in float (A1111 rounds the blurred mask to 8 bits)."""
    if sigma <= 0:
        return mask
    radius = int(2.5 * sigma + 0.5) if radius is None else int(radius)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(mask.dtype).to(mask.device)
    out = mask
    for dim in (-1, -2):
        n = out.shape[dim]
        padded = out.index_select(dim, _border_index(n, radius, border).to(out.device))
        acc = torch.zeros_like(out)
        for k in range(2 * radius + 1):
            acc = acc + kernel[k] * padded.narrow(dim, k, n)
        out = acc
    return out


def paste_back(output: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, blur_px: float = 0.0) -> torch.Tensor:
    """``source`` pasted over a decoder's output: ``source * (1 - a) + output * a``, images (B,3,H,W) in [0, 1],
    mask (B,1,H,W) with 1 = generate. The blending primitive, with no information rule: with ``blur_px`` > 0 the
    generated pixels near the edge take some of ``source``, so passing the reference there hands the row the answer.
    Report rows go through :func:`composite` (recipes ``paste`` and ``a1111``), which never does.

    ``blur_px`` 0: ``a`` is the mask binarised at 0.5, so every kept pixel is the source's and every generated pixel
    the output's (diffusers' ``VaeImageProcessor.apply_overlay``: the source is pasted through the inverted mask
    and alpha-composited over the output). ``blur_px`` R > 0: ``a`` is that binary mask blurred by
    :func:`gaussian_blur_mask` (sigma R, AUTOMATIC1111's mask blur), quantised to 8 bits as A1111's mask image is;
    kept pixels near the edge then take some of the output, generated pixels near it some of the source."""
    _check(output, source, mask)
    alpha = (mask >= 0.5).to(output.dtype)
    if blur_px > 0:
        alpha = torch.round(gaussian_blur_mask(alpha, float(blur_px)).clamp(0, 1) * 255) / 255
    return source * (1 - alpha) + output * alpha


# ------------------------------------------------------------------------------------------------ the information rule
# A composite row X+<recipe> may read the decoder's output, the kept pixels (1 - mask) * image and the mask, never the
# reference under the mask: in use those pixels are the content being replaced. composite() is the one door.
RECIPES = ("paste", "a1111", "fooocus", "invokeai", "cropandstitch", "brushnet", "colormatch", "poisson", "laplacian")
# recipes whose blend also reaches into the hole and so shows what was there: given other content (other_content()).
# CropAndStitch's blurs reach about 2 px further than its dilation: its alpha is about 0.77 on the hole's first ring.
SYMMETRIC_RECIPES = ("a1111", "cropandstitch")
A1111_BLUR_PX = 4.0          # AUTOMATIC1111's default mask blur
FOOOCUS_RAMP_STEPS = 32      # Fooocus morphological_open: 32 iterations of a 3x3 max filter minus 8 levels
INVOKEAI_FADE_PX = 16        # InvokeAI canvas default maskBlur, passed as expand_mask_with_fade's fade_size_px
CROPANDSTITCH_BLEND_PX = 32  # Inpaint-CropAndStitch's mask_blend_pixels default
CROPANDSTITCH_HIPASS = 0.1   # its mask_hipass_filter default
BRUSHNET_KERNEL = 21         # BrushNet's cv2.GaussianBlur(mask, (21, 21), 0)


def visible(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a composite may see of the original: ``(1 - m) * image``, the kept pixels (mask binarised at 0.5)."""
    return image * (1 - (mask >= 0.5).to(image.dtype))


def composite(recipe: str, output: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
              other: Optional[torch.Tensor] = None, *, blur_px: float = A1111_BLUR_PX) -> torch.Tensor:
    """The row ``X+<recipe>``: the decoder's ``output`` (B,3,H,W) in [0, 1] composited with the original ``image``
    by one of :data:`RECIPES`, mask (B,1,H,W) 1 = generate. The single entry of every recipe, and where the
    information rule holds: the recipe is handed ``visible(image, mask)``, never the pixels of ``image`` under the
    mask. A symmetric recipe (:data:`SYMMETRIC_RECIPES`) blends the source into the hole's rim too; there the source
    under the mask is ``other`` (B,3,H,W), content that is not the reference (:func:`other_content`), as in real
    use where it is the content being replaced. ``blur_px``: a1111's mask blur sigma. Returns (B,3,H,W) in [0, 1]."""
    _check(output, image, mask)
    if recipe not in _RECIPE_FUNCTIONS:
        raise ValueError(f"recipe {recipe!r}: not one of {', '.join(RECIPES)}")
    m = (mask >= 0.5).to(output.dtype)
    kept = visible(image, m)
    if recipe in SYMMETRIC_RECIPES:
        if other is None or other.shape != image.shape:
            raise ValueError(f"recipe {recipe!r} blends the source into the hole: give other content "
                             f"{tuple(image.shape)} (other_content()), never the reference")
        kept = kept + m * other
    if recipe == "a1111":
        return _alpha_blend(output, kept, _a1111_alpha(m, blur_px))
    return _RECIPE_FUNCTIONS[recipe](output, kept, m)


def composites(recipes: Union[str, Sequence[str]], output: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
               other: Optional[torch.Tensor] = None, *, seed: int = 0,
               blur_px: float = A1111_BLUR_PX) -> Dict[str, torch.Tensor]:
    """Recipe -> :func:`composite` for each of ``recipes`` (names, or ``"all"`` for :data:`RECIPES`), on one batch.
    ``other``: the content the symmetric recipes show in the hole; by default :func:`other_content` of the batch's
    own images (seeded by ``seed``), so a batch of a whole set needs nothing else."""
    names = RECIPES if recipes == "all" else tuple(recipes)
    if other is None and any(r in SYMMETRIC_RECIPES for r in names):
        other = torch.stack(other_content(list(image), seed))
    return {r: composite(r, output, image, mask, other, blur_px=blur_px) for r in names}


def other_content(images: Sequence[torch.Tensor], seed: int = 0) -> List[torch.Tensor]:
    """For each (3,H,W) image of a set, content that is not it, for the symmetric recipes' hole: another image of
    the set, ``images[(i + k) % n]`` with one shift ``1 <= k < n`` drawn from ``seed`` (the next one that differs
    from image i, where the set repeats an image), resized to image i's size (bilinear, antialiased); an image
    with no other in the set gets itself rotated by 180 degrees."""
    n = len(images)
    k = 1 + int(np.random.default_rng([int(seed), 29]).integers(n - 1)) if n > 1 else 0
    out = []
    for i, image in enumerate(images):
        # the next image of the set from i + k on that is not this one (a set may hold one photo under several
        # masks); none: the image rotated by 180 degrees
        others = [images[(i + k + j) % n] for j in range(n - 1)] if n > 1 else []
        source = next((o for o in others if o.shape != image.shape or not torch.equal(o, image)), None)
        if source is None:
            out.append(image.flip(-1).flip(-2))
            continue
        if source.shape[-2:] != image.shape[-2:]:
            source = F.interpolate(source[None].float(), size=tuple(image.shape[-2:]), mode="bilinear",
                                   antialias=True, align_corners=False)[0].clamp(0, 1).to(image.dtype)
        out.append(source)
    return out


def _alpha_blend(output: torch.Tensor, source: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``source * (1 - a) + output * a``: a = 1 where the output shows."""
    return source * (1 - alpha) + output * alpha


def _a1111_alpha(m: torch.Tensor, blur_px: float) -> torch.Tensor:
    """AUTOMATIC1111's mask blur: :func:`gaussian_blur_mask` (sigma R) of the binary mask, as an 8-bit image."""
    return torch.round(gaussian_blur_mask(m, float(blur_px)).clamp(0, 1) * 255) / 255


def fooocus_alpha(m: torch.Tensor, steps: int = FOOOCUS_RAMP_STEPS) -> torch.Tensor:
    """Fooocus' ``morphological_open`` (modules/inpaint_worker.py), the mask of its ``color_correction``: 256 inside
    the mask, then ``steps`` times ``max(max3x3(x) - 8, x)``, clipped to 0..255: a linear ramp outward, 8 levels per
    pixel of chessboard distance (0 at 32 px)."""
    x = m * 256
    for _ in range(steps):
        x = torch.maximum(F.max_pool2d(x, 3, stride=1, padding=1) - 8, x)
    return x.clamp(0, 255) / 255


def invokeai_alpha(m: torch.Tensor, fade_px: int = INVOKEAI_FADE_PX) -> torch.Tensor:
    """InvokeAI's ``expand_mask_with_fade`` (invokeai/app/invocations/image.py), as the output's alpha: for each
    kept pixel its Euclidean distance to the hole (``cv2.distanceTransform``, DIST_L2, mask 5), normalised by
    ``fade_px`` and clipped to 1, through the cubic fitted to (0, 0), (1/fade, 0), (0.2, 0.2), (0.8, 0.9), (1, 1),
    1 at or beyond the fade, stored as 8 bits (truncated); the output's alpha is 1 minus that (1 in the hole)."""
    x_control = np.array([0.0, 1.0 / fade_px, 0.2, 0.8, 1.0])
    poly = np.poly1d(np.polyfit(x_control, np.array([0.0, 0.0, 0.2, 0.9, 1.0]), 3))
    out = []
    for plane in m[:, 0].detach().cpu().numpy():
        keep = (plane < 0.5).astype(np.uint8)
        dist = cv2.distanceTransform(keep, cv2.DIST_L2, 5)
        d = np.clip(dist / fade_px, 0, 1)
        feather = np.clip(np.where(d >= 1.0, 1.0, poly(d)), 0, 1)
        keep_alpha = np.where(keep == 0, 0, (feather * 255).astype(np.uint8)).astype(np.float32) / 255
        out.append(1 - keep_alpha)
    return torch.from_numpy(np.stack(out))[:, None].to(m)


def cropandstitch_alpha(m: torch.Tensor, blend_px: int = CROPANDSTITCH_BLEND_PX,
                        hipass: float = CROPANDSTITCH_HIPASS) -> torch.Tensor:
    """ComfyUI-Inpaint-CropAndStitch's stitch mask for ``mask_blend_pixels`` B (CPU logic of InpaintCropImproved
    and InpaintStitchImproved, crop at full resolution): grey dilation by a square of ``ceil(1.5 B/4 + 1)`` px
    (13 for B = 32), a Gaussian of sigma ``B/2/4`` (4 px; scipy's gaussian_filter: radius ``int(4 sigma + 0.5)``,
    border 'reflect'), values below ``mask_hipass_filter`` set to 0, then at stitch the same Gaussian again. The blurs
    reach back into the hole (alpha about 0.77 on its first ring), so the recipe is symmetric: the original's hole
    shows through there."""
    sigma = blend_px * 0.5 / 4
    size = math.ceil(blend_px / 4 * 1.5 + 1)
    # a centred footprint of even size reaches one pixel further up/left, as scipy's
    pad = (size // 2, (size - 1) // 2, size // 2, (size - 1) // 2)
    x = F.max_pool2d(F.pad(m, pad, value=float("-inf")), size, stride=1)
    radius = int(4.0 * sigma + 0.5)
    x = gaussian_blur_mask(x, sigma, radius=radius, border="reflect").clamp(0, 1)
    x = torch.where(x < hipass, torch.zeros_like(x), x)
    return gaussian_blur_mask(x, sigma, radius=radius, border="reflect").clamp(0, 1)


def brushnet_alpha(m: torch.Tensor, kernel: int = BRUSHNET_KERNEL) -> torch.Tensor:
    """BrushNet's blend (examples/brushnet/test_brushnet.py, also BrushEdit, PowerPaint): ``1 - (1 - m)(1 - G(m))``
    with G ``cv2.GaussianBlur(m, (21, 21), 0)`` (sigma 0.3 ((21 - 1) / 2 - 1) + 0.8 = 3.5, border reflect-101, in
    float): the hole, and a blur of it that reaches outward only."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    return 1 - (1 - m) * (1 - gaussian_blur_mask(m, sigma, radius=kernel // 2))


def _paste(output: torch.Tensor, kept: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _alpha_blend(output, kept, m)


def _colormatch(output: torch.Tensor, kept: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Reinhard colour transfer in CIELAB fitted on the kept pixels, then a hard paste: per image and Lab channel,
    the output's mean and standard deviation over the kept pixels moved to the original's there."""
    lab_out, lab_kept = rgb_to_lab(output), rgb_to_lab(kept)
    keep = (1 - m).expand_as(lab_out)
    count = keep.flatten(2).sum(-1).clamp(min=1)[..., None, None]

    def stats(x):
        mean = (x * keep).flatten(2).sum(-1)[..., None, None] / count
        std = (((x - mean) * keep).pow(2).flatten(2).sum(-1)[..., None, None] / count).sqrt()
        return mean, std

    (mu_o, sd_o), (mu_k, sd_k) = stats(lab_out), stats(lab_kept)
    scale = torch.where(sd_o > 1e-6, sd_k / sd_o.clamp(min=1e-6), torch.ones_like(sd_o))
    matched = lab_to_rgb((lab_out - mu_o) * scale + mu_k).clamp(0, 1)
    has_kept = (1 - m).flatten(1).sum(1) > 0
    matched = torch.where(has_kept[:, None, None, None], matched, output)
    return _alpha_blend(matched, kept, m)


def _poisson(output: torch.Tensor, kept: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Poisson blending (Perez et al. 2003, guided interpolation, what ``cv2.seamlessClone(..., NORMAL_CLONE)``
    computes): in the hole, the image f whose discrete Laplacian is the output's, with the kept pixels as boundary
    values. Per hole pixel p and each 4-neighbour q inside the image: ``sum_q (f_p - f_q) = sum_q (o_p - o_q)``,
    f_q the kept pixel where q is kept (no condition across the image border); solved exactly (sparse LU), per
    image and channel, on the 8-bit output. Kept pixels stay the original's.

    Not ``cv2.seamlessClone`` itself: it solves on the mask's bounding box with that box's own border as boundary,
    so it reads the destination's first ring of pixels inside the mask, which in use is the content being
    replaced (and here would be the reference)."""
    out = []
    for o, k, mm in zip(output, kept, m):
        hole = (mm[0] >= 0.5).cpu().numpy()
        if not hole.any() or hole.all():
            out.append(o if hole.all() else k)
            continue
        src = torch.round(o.clamp(0, 1) * 255).double().cpu().numpy() / 255
        solved = poisson_fill(src, k.double().cpu().numpy(), hole)
        out.append(torch.from_numpy(solved).to(o) * mm + k * (1 - mm))
    return torch.stack(out)


def poisson_fill(guide: np.ndarray, boundary: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """(C,H,W) ``boundary`` with its ``hole`` (H,W bool) pixels replaced by the guided interpolation of
    :func:`_poisson`: the Laplacian of ``guide`` (C,H,W) inside, ``boundary`` at the kept neighbours."""
    import scipy.sparse as sparse
    from scipy.sparse.linalg import splu

    h, w = hole.shape
    ys, xs = np.nonzero(hole)
    index = -np.ones((h, w), np.int64)
    index[ys, xs] = np.arange(len(ys))
    rows, cols, vals = [], [], []
    degree = np.zeros(len(ys))
    rhs = np.zeros((guide.shape[0], len(ys)))
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        qy, qx = ys + dy, xs + dx
        inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        p, qy, qx = np.nonzero(inside)[0], qy[inside], qx[inside]
        degree[p] += 1
        rhs[:, p] += guide[:, ys[p], xs[p]] - guide[:, qy, qx]
        neighbour_hole = hole[qy, qx]
        rows.append(p[neighbour_hole])
        cols.append(index[qy[neighbour_hole], qx[neighbour_hole]])
        vals.append(-np.ones(int(neighbour_hole.sum())))
        kept_p = p[~neighbour_hole]
        rhs[:, kept_p] += boundary[:, qy[~neighbour_hole], qx[~neighbour_hole]]
    n = len(ys)
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(degree)
    matrix = sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    solution = splu(matrix).solve(rhs.T).T
    out = boundary.copy()
    out[:, ys, xs] = np.clip(solution, 0, 1)
    return out


_PYRAMID_KERNEL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _binomial(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The 5-tap binomial filter along y and x, borders reflect-101, each pass times ``gain``."""
    kernel = torch.tensor(_PYRAMID_KERNEL, dtype=x.dtype, device=x.device) * gain
    for dim in (-1, -2):
        n = x.shape[dim]
        idx = _border_index(n, 2, "reflect101").to(x.device)
        padded = x.index_select(dim, idx)
        x = sum(kernel[k] * padded.narrow(dim, k, n) for k in range(5))
    return x


def _pyr_up(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Zeros inserted between the samples up to ``size``, then the binomial filter times 2 per axis."""
    up = torch.zeros(*x.shape[:-2], *size, dtype=x.dtype, device=x.device)
    up[..., ::2, ::2] = x[..., :(size[0] + 1) // 2, :(size[1] + 1) // 2]
    return _binomial(up, gain=2.0)


def laplacian_levels(height: int, width: int) -> int:
    """Pyramid levels of the multi-band blend: halvings while the coarsest side stays >= 8 px, at most 5."""
    return max(1, min(5, int(math.floor(math.log2(max(min(height, width), 8) / 8)))))


def _laplacian(output: torch.Tensor, kept: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Burt-Adelson multi-band blend: Laplacian pyramids of the output and of the original with the output in its
    hole (``kept + m * output``), blended per level through the Gaussian pyramid of the binary mask, collapsed.
    Pyramid: the 5-tap binomial filter (borders reflect-101), every second pixel; :func:`laplacian_levels` levels.
    Low frequencies cross the edge both ways; the kept region near it changes too."""
    source = kept + m * output
    levels = laplacian_levels(*output.shape[-2:])

    def pyramids(x):
        gauss = [x]
        for _ in range(levels):
            gauss.append(_binomial(gauss[-1])[..., ::2, ::2])
        lap = [g - _pyr_up(gauss[i + 1], tuple(g.shape[-2:])) for i, g in enumerate(gauss[:-1])]
        return gauss, lap + [gauss[-1]]

    g_mask, _ = pyramids(m)
    _, l_out = pyramids(output)
    _, l_src = pyramids(source)
    blended = [a * lo + (1 - a) * ls for a, lo, ls in zip(g_mask, l_out, l_src)]
    x = blended[-1]
    for level in reversed(blended[:-1]):
        x = _pyr_up(x, tuple(level.shape[-2:])) + level
    return x.clamp(0, 1)


_RECIPE_FUNCTIONS = {
    "paste": _paste,
    "a1111": None,  # composite() passes the blur
    "fooocus": lambda o, k, m: _alpha_blend(o, k, fooocus_alpha(m)),
    "invokeai": lambda o, k, m: _alpha_blend(o, k, invokeai_alpha(m)),
    "cropandstitch": lambda o, k, m: _alpha_blend(o, k, cropandstitch_alpha(m)),
    "brushnet": lambda o, k, m: _alpha_blend(o, k, brushnet_alpha(m)),
    "colormatch": _colormatch,
    "poisson": _poisson,
    "laplacian": _laplacian,
}
assert tuple(_RECIPE_FUNCTIONS) == RECIPES


# sRGB (D65) <-> CIELAB, as skimage.color.rgb2lab / lab2rgb define them
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) sRGB in [0, 1] -> CIELAB (L in 0..100), D65 white, the sRGB transfer curve undone first."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp(min=0) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, lin) / torch.tensor(_WHITE_D65, dtype=rgb.dtype,
                                                                    device=rgb.device)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab` (not clipped)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787)
    xyz = xyz * torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device)[:, None, None]
    inverse = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab)
    lin = torch.einsum("ij,bjhw->bihw", inverse, xyz)
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=1e-12) ** (1 / 2.4) - 0.055, 12.92 * lin)


def psnr_from_mse(mse: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB; ``inf`` where the MSE is 0, ``nan`` where it is nan."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    with torch.no_grad():
        out = 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-300))
    return torch.where(mse == 0, torch.full_like(out, float("inf")), out)


def region_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   band_px: int = DEFAULT_BAND_PX, blend_px: int = DEFAULT_BLEND_PX) -> Dict[str, torch.Tensor]:
    """Per-image (B,) values of every key in :data:`REGION_KEYS` (the boundary ones by :func:`boundary_metrics`)."""
    out = {"pre_error": pre_error(pred, target, mask), "pre_error_sum": pre_error_sum(pred, target, mask)}
    for region in ("kept", "generated"):
        mse = region_mse(pred, target, mask, region)
        out[f"mse_{region}"] = mse
        out[f"psnr_{region}"] = psnr_from_mse(mse)
    out.update(boundary_metrics(pred, target, mask, band_px, blend_px))
    return out


class RegionMetricAccumulator:
    """Collects :func:`region_metrics` over batches; :meth:`summary` gives dataset-level numbers.

    ``pre_error*``, ``mse_*`` and ``seam_error`` are means over images (as the original averages per-image errors;
    an image whose region or band is empty, nan, is left out); ``psnr_*`` is computed from the mean region MSE,
    so identical images give ``inf`` and one perfect image does not make the whole set infinite.
    """

    def __init__(self, band_px: int = DEFAULT_BAND_PX, blend_px: int = DEFAULT_BLEND_PX) -> None:
        self.band_px = band_px
        self.blend_px = blend_px
        self.values: Dict[str, List[float]] = {k: [] for k in REGION_KEYS}

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        batch = region_metrics(pred.float(), target.float(), mask.float(), self.band_px, self.blend_px)
        for k, v in batch.items():
            self.values[k].extend(float(x) for x in v.double().cpu())
        return batch

    def __len__(self) -> int:
        return len(self.values["pre_error"])

    def summary(self, indices: Optional[Sequence[int]] = None) -> Dict[str, float]:
        """The dataset-level numbers, of every image or of the images at ``indices`` (in update order)."""
        if not len(self):
            raise ValueError("no images were evaluated")
        values = self.values if indices is None else {k: [v[i] for i in indices] for k, v in self.values.items()}
        if not values["pre_error"]:
            return {"n_images": 0}
        out = {k: _nanmean(values[k]) for k in _MEAN_KEYS}
        for region in _PSNR_REGIONS:
            out[f"psnr_{region}"] = float(psnr_from_mse(torch.tensor(out[f"mse_{region}"])))
        out["n_images"] = len(values["pre_error"])
        return out


# hole-size bins of EditBench (fraction of the image generated): small, medium, large
HOLE_SIZES = (("small", 0.057, 0.215), ("medium", 0.215, 0.369), ("large", 0.369, 1.0))


def hole_size_bin(fraction: float) -> Optional[str]:
    """"small" for a hole of 5.7-21.5 % of the image, "medium" for 21.5-36.9 %, "large" above 36.9 % (each bin
    includes its upper bound); None below 5.7 %."""
    for name, low, high in HOLE_SIZES:
        if low < fraction <= high or (name == "small" and fraction == low):
            return name
    return None


# ------------------------------------------------------------------------------------------------ statistics
CI_RESAMPLES = 2000
CI_LEVEL = 0.95


def paired_bootstrap(a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = CI_RESAMPLES,
                     level: float = CI_LEVEL) -> Optional[Dict[str, float]]:
    """The mean per-image difference ``a - b`` (the same images, paired) and its percentile bootstrap interval:
    ``resamples`` draws of n images with replacement, ``np.random.default_rng(seed).integers(0, n, (resamples,
    n))``, the interval the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (numpy's linear rule) of the
    resampled means. Pairs with a nan (an empty region) are left out; two equal values (also two infinite PSNRs)
    differ by 0. None when no pair is left or a difference is infinite (one perfect region: no finite difference
    to average)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    with np.errstate(invalid="ignore"):
        d = np.where(a == b, 0.0, a - b)  # two perfect (inf) values: no difference
    if not len(d) or not np.isfinite(d).all():
        return None
    draws = np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))
    means = d[draws].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "n": int(len(d))}


def verdict(interval: Optional[Mapping[str, float]], higher_is_better: bool) -> str:
    """"wins" / "loses" only where the interval excludes zero; otherwise "no difference measured"."""
    if interval is None:
        return "no interval"
    if interval["low"] > 0 or interval["high"] < 0:
        return "wins" if (interval["low"] > 0) == higher_is_better else "loses"
    return "no difference measured"


# FID's InceptionV3 weights as torch-fidelity / torchmetrics fetch them (no network here: the user brings the file)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def default_inception_path() -> Path:
    """Where torch-fidelity caches the FID Inception weights: ``$TORCH_HOME/hub/checkpoints/<INCEPTION_FILE>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def build_fid(weights_path: Optional[Union[str, Path]] = None):
    """torchmetrics ``FrechetInceptionDistance`` (2048 features, inputs float in [0, 1]) from a local weights file.

    The file is first read with ``weights_only=True`` (torch-fidelity itself unpickles it fully): a file that
    holds anything but tensors is refused before torch-fidelity opens it. Missing file -> FileNotFoundError naming
    the file, the folder and the download address; a corrupt file or one with other keys -> ValueError naming it.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = Path(weights_path) if weights_path is not None else default_inception_path()
    if not path.is_file():
        raise FileNotFoundError(f"FID needs the Inception weights {INCEPTION_FILE}, not found at {path}. Download "
                                f"{INCEPTION_URL} into {path.parent} (or pass its path with --fid_weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable; say which
        raise ValueError(f"{path}: not a readable Inception weights file (a plain state dict readable with "
                         f"weights_only=True expected; {_first_line(err)})") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a readable Inception weights file (expected a state dict of tensors, "
                         f"got {type(state).__name__})")
    try:
        return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError) as err:  # torch-fidelity's load_state_dict: wrong keys or shapes
        raise ValueError(f"{path}: not a readable Inception weights file for FID ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    """The first line of an exception message (torch's unpickling and state-dict errors run for pages)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _build_lpips(vgg_path: Optional[Union[str, Path]]):
    """``build_lpips`` with every way a weights file can be unusable turned into FileNotFoundError / ValueError
    naming the file (torch.load raises UnpicklingError, EOFError, RuntimeError, ... for a corrupt file)."""
    from .modules.losses.contperceptual import build_lpips, default_vgg16_path

    try:
        return build_lpips(vgg_path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file: say which file, not a traceback
        path = Path(vgg_path) if vgg_path is not None else default_vgg16_path()
        raise ValueError(f"{path}: not a readable VGG16 weights file ({type(err).__name__}: "
                         f"{_first_line(err)})") from err


class ImageMetrics:
    """Every metric of the evaluation over batches: region metrics (:class:`RegionMetricAccumulator`), SSIM,
    LPIPS and FID.

    ``update(pred, target, mask)`` takes (B,3,H,W) in [0, 1] and the (B,1,H,W) mask (1 = generated). LPIPS and FID
    are built once; when their weights file is missing (or ``lpips=False`` / ``fid=False``) they are skipped and
    :meth:`summary` says why under ``"missing"``. FID compares the set of ``pred`` with the set of ``target`` and
    needs at least two images.
    """

    def __init__(self, *, lpips: bool = True, fid: bool = True, lpips_vgg_path: Optional[Union[str, Path]] = None,
                 fid_weights_path: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu",
                 band_px: int = DEFAULT_BAND_PX, blend_px: int = DEFAULT_BLEND_PX):
        self.device = torch.device(device)
        self.region = RegionMetricAccumulator(band_px, blend_px)
        self.ssim: List[float] = []
        self.lpips_values: List[float] = []
        self.missing: Dict[str, str] = {}
        self.lpips_model = None
        self.fid_metric = None
        if lpips:
            try:
                self.lpips_model = _build_lpips(lpips_vgg_path).to(self.device)
            except (FileNotFoundError, ValueError) as err:
                self.missing["lpips"] = str(err)
        else:
            self.missing["lpips"] = "not requested"
        if fid:
            try:
                self.fid_metric = build_fid(fid_weights_path).to(self.device)
            except (FileNotFoundError, ValueError) as err:
                self.missing["fid"] = str(err)
        else:
            self.missing["fid"] = "not requested"
        for name, reason in self.missing.items():
            if reason != "not requested":
                log.warning("%s skipped: %s", name, reason)

    def fresh(self) -> "ImageMetrics":
        """An empty accumulator with the same settings for another row of a report, sharing this one's LPIPS
        network and a copy of its FID network (made before any update: no weights file is read again)."""
        if len(self.region):
            raise ValueError("fresh() copies an accumulator before it has seen any image")
        other = copy.copy(self)
        other.region = RegionMetricAccumulator(self.region.band_px, self.region.blend_px)
        other.ssim, other.lpips_values, other.missing = [], [], dict(self.missing)
        other.fid_metric = copy.deepcopy(self.fid_metric) if self.fid_metric is not None else None
        return other

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Add a batch; returns its per-image (B,) region metrics plus ``ssim`` (and ``lpips`` when available)."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        pred, target = pred.float().to(self.device), target.float().to(self.device)
        batch = self.region.update(pred, target, mask.to(self.device))
        batch["ssim"] = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
        self.ssim.extend(float(v) for v in batch["ssim"].cpu())
        if self.lpips_model is not None:
            batch["lpips"] = self.lpips_model(pred * 2 - 1, target * 2 - 1).flatten()
            self.lpips_values.extend(float(v) for v in batch["lpips"].cpu())
        if self.fid_metric is not None:
            self.fid_metric.update(target, real=True)
            self.fid_metric.update(pred, real=False)
        return batch

    def summary(self) -> Dict[str, Any]:
        """Dataset-level numbers: region metrics, ``ssim``, ``lpips``, ``fid`` (None when skipped), ``missing``."""
        out: Dict[str, Any] = self.region.summary()
        out["ssim"] = _nanmean(self.ssim)
        out["lpips"] = _nanmean(self.lpips_values) if self.lpips_model is not None else None
        out["fid"] = None
        missing = dict(self.missing)
        if self.fid_metric is not None:
            if len(self.region) < 2:
                missing["fid"] = "FID needs at least 2 images"
            else:
                out["fid"] = float(self.fid_metric.compute())
        out["missing"] = missing
        return out


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def json_safe(obj):
    """Replace inf/nan floats (not valid JSON) by the strings "inf"/"-inf" and None, recursively."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
