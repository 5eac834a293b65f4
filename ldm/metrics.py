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

:func:`paste_back` is the baseline users apply today: the original pasted over a decoder's output wherever the
mask keeps (diffusers' ``VaeImageProcessor.apply_overlay``), optionally with the mask blurred first
(AUTOMATIC1111's "mask blur").

:class:`ImageMetrics` adds the whole-image metrics of the paper's evaluation (SSIM, LPIPS, FID); LPIPS and FID need
weight files on disk and, when they are missing, say which file and where instead.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch

from .modules.mask_edges import DEFAULT_BAND_PX, band_masks

log = logging.getLogger(__name__)

REGION_KEYS = ("pre_error", "pre_error_sum", "mse_kept", "mse_generated", "psnr_kept", "psnr_generated",
               "mse_band_inner", "mse_band_outer", "psnr_band_inner", "psnr_band_outer", "seam_error")
# per-image values averaged over images by the accumulator; every psnr_* key is computed from its mse_* mean
_MEAN_KEYS = ("pre_error", "pre_error_sum", "mse_kept", "mse_generated", "mse_band_inner", "mse_band_outer",
              "seam_error")
_PSNR_REGIONS = ("kept", "generated", "band_inner", "band_outer")


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


def boundary_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     band_px: int = DEFAULT_BAND_PX) -> Dict[str, torch.Tensor]:
    """Per-image (B,) ``mse_band_inner`` / ``psnr_band_inner`` (generated pixels within ``band_px`` of a kept
    pixel), ``mse_band_outer`` / ``psnr_band_outer`` (kept pixels within ``band_px`` of a generated pixel) and
    :func:`seam_error`; same conventions as :func:`pre_error` (images in [0, 1], mask binarised at 0.5). An image
    whose band is empty (no edge) gives nan there; :class:`RegionMetricAccumulator` leaves it out of the means."""
    m = _check(pred, target, mask)
    inner, outer = band_masks(m, band_px)
    out = {}
    for name, pixels in (("band_inner", inner), ("band_outer", outer)):
        out[f"mse_{name}"] = _masked_mse(pred, target, pixels)
        out[f"psnr_{name}"] = psnr_from_mse(out[f"mse_{name}"])
    out["seam_error"] = seam_error(pred, target, m)
    return out


def gaussian_blur_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B,1,H,W) mask blurred as AUTOMATIC1111's "mask blur" R does (``cv2.GaussianBlur`` along x, then along y):
    a separable Gaussian of standard deviation ``sigma`` = R pixels, sampled on a kernel of ``2 * int(2.5 * R + 0.5)
    + 1`` taps (radius about 2.5 sigma) and normalised to sum 1, with cv2's default border ``BORDER_REFLECT_101``
    (``dcb|abcd|cba``, the edge pixel not repeated), computed in float (A1111 rounds the blurred mask to 8 bits)."""
    if sigma <= 0:
        return mask
    radius = int(2.5 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(mask.dtype).to(mask.device)
    out = mask
    for dim in (-1, -2):
        n = out.shape[dim]
        # reflect-101 indices for any radius (also wider than the image): period 2(n-1)
        idx = torch.arange(-radius, n + radius)
        if n > 1:
            idx = idx.remainder(2 * (n - 1))
            idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx)
        else:
            idx = torch.zeros_like(idx)
        padded = out.index_select(dim, idx.to(out.device))
        acc = torch.zeros_like(out)
        for k in range(2 * radius + 1):
            acc = acc + kernel[k] * padded.narrow(dim, k, n)
        out = acc
    return out


def paste_back(output: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, blur_px: float = 0.0) -> torch.Tensor:
    """The original pasted back over a decoder's output: ``source * (1 - a) + output * a``, images (B,3,H,W) in
    [0, 1], mask (B,1,H,W) with 1 = generate.

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


def psnr_from_mse(mse: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB; ``inf`` where the MSE is 0, ``nan`` where it is nan."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    with torch.no_grad():
        out = 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-300))
    return torch.where(mse == 0, torch.full_like(out, float("inf")), out)


def region_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   band_px: int = DEFAULT_BAND_PX) -> Dict[str, torch.Tensor]:
    """Per-image (B,) values of every key in :data:`REGION_KEYS` (the boundary ones by :func:`boundary_metrics`)."""
    out = {"pre_error": pre_error(pred, target, mask), "pre_error_sum": pre_error_sum(pred, target, mask)}
    for region in ("kept", "generated"):
        mse = region_mse(pred, target, mask, region)
        out[f"mse_{region}"] = mse
        out[f"psnr_{region}"] = psnr_from_mse(mse)
    out.update(boundary_metrics(pred, target, mask, band_px))
    return out


class RegionMetricAccumulator:
    """Collects :func:`region_metrics` over batches; :meth:`summary` gives dataset-level numbers.

    ``pre_error*``, ``mse_*`` and ``seam_error`` are means over images (as the original averages per-image errors;
    an image whose region or band is empty, nan, is left out); ``psnr_*`` is computed from the mean region MSE,
    so identical images give ``inf`` and one perfect image does not make the whole set infinite.
    """

    def __init__(self, band_px: int = DEFAULT_BAND_PX) -> None:
        self.band_px = band_px
        self.values: Dict[str, List[float]] = {k: [] for k in REGION_KEYS}

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        batch = region_metrics(pred.float(), target.float(), mask.float(), self.band_px)
        for k, v in batch.items():
            self.values[k].extend(float(x) for x in v.double().cpu())
        return batch

    def __len__(self) -> int:
        return len(self.values["pre_error"])

    def summary(self) -> Dict[str, float]:
        if not len(self):
            raise ValueError("no images were evaluated")
        out = {k: _nanmean(self.values[k]) for k in _MEAN_KEYS}
        for region in _PSNR_REGIONS:
            out[f"psnr_{region}"] = float(psnr_from_mse(torch.tensor(out[f"mse_{region}"])))
        out["n_images"] = len(self)
        return out


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
                 band_px: int = DEFAULT_BAND_PX):
        self.device = torch.device(device)
        self.region = RegionMetricAccumulator(band_px)
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
        other.region = RegionMetricAccumulator(self.region.band_px)
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
