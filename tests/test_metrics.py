"""Region metrics on hand-made tensors whose answers are known."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ldm.image_io import quantize
from ldm.metrics import (
    RegionMetricAccumulator,
    json_safe,
    pre_error,
    pre_error_sum,
    psnr_from_mse,
    region_metrics,
    region_mse,
)


def _pair():
    target = torch.zeros(2, 3, 4, 4)
    pred = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1.0          # top half generated (8 pixels), bottom half kept (8 pixels)
    pred[0, :, :2] = 0.5          # image 0: error only where generated
    pred[1, :, 2:] = 0.1          # image 1: error 0.1 on every kept pixel and channel
    return pred, target, mask


def test_pre_error_counts_only_the_kept_region():
    pred, target, mask = _pair()
    assert torch.allclose(pre_error_sum(pred, target, mask), torch.tensor([0.0, 24 * 0.01]))
    assert torch.allclose(pre_error(pred, target, mask), torch.tensor([0.0, 24 * 0.01 / 48]))


def test_region_errors_and_psnr():
    pred, target, mask = _pair()
    kept = region_mse(pred, target, mask, "kept")
    gen = region_mse(pred, target, mask, "generated")
    assert torch.allclose(kept, torch.tensor([0.0, 0.01]))
    assert torch.allclose(gen, torch.tensor([0.25, 0.0]))
    m = region_metrics(pred, target, mask)
    assert math.isinf(m["psnr_kept"][0]) and m["psnr_kept"][1].item() == pytest.approx(20.0)
    assert m["psnr_generated"][0].item() == pytest.approx(10 * math.log10(4))


def test_soft_masks_are_binarised_at_one_half():
    pred, target, mask = _pair()
    soft = mask * 0.6 + (1 - mask) * 0.4  # 0.6 -> generated, 0.4 -> kept
    assert torch.equal(pre_error_sum(pred, target, soft), pre_error_sum(pred, target, mask))


def test_identical_images_give_zero_error_and_infinite_psnr_in_json():
    x = torch.rand(3, 3, 8, 8)
    mask = (torch.rand(3, 1, 8, 8) > 0.5).float()
    acc = RegionMetricAccumulator()
    acc.update(x, x, mask)
    s = acc.summary()
    assert s["pre_error"] == 0 and s["mse_generated"] == 0 and math.isinf(s["psnr_kept"])
    text = json.dumps(json_safe(s), allow_nan=False)
    assert json.loads(text)["psnr_kept"] == "inf"


def test_empty_region_is_nan_not_a_crash():
    x = torch.rand(1, 3, 4, 4)
    full = torch.ones(1, 1, 4, 4)  # everything generated: no kept pixel
    assert math.isnan(region_mse(x, x * 0, full, "kept")[0])
    assert pre_error(x, x * 0, full)[0] == 0
    assert psnr_from_mse(torch.tensor(float("nan"))).isnan()


def test_accumulator_averages_images_and_pools_psnr():
    pred, target, mask = _pair()
    acc = RegionMetricAccumulator()
    acc.update(pred[:1], target[:1], mask[:1])
    acc.update(pred[1:], target[1:], mask[1:])
    s = acc.summary()
    assert s["n_images"] == 2
    assert s["mse_kept"] == pytest.approx(0.005)
    assert s["psnr_kept"] == pytest.approx(10 * math.log10(1 / 0.005))


@pytest.mark.parametrize("mask_shape", [(2, 3, 4, 4), (1, 1, 4, 4), (2, 1, 2, 4)])
def test_mismatched_shapes_are_refused(mask_shape):
    pred, target, _ = _pair()
    with pytest.raises(ValueError, match="mask"):
        pre_error(pred, target, torch.zeros(mask_shape))
    with pytest.raises(ValueError, match="pred"):
        pre_error(pred, target[:, :, :2], torch.zeros(2, 1, 4, 4))


# ------------------------------------------------------------------------------------------------ boundary metrics
# References written independently of ldm.metrics: scipy's chessboard distance transform for the bands, a plain
# loop over pixel pairs for seam_error, diffusers' apply_overlay and cv2's GaussianBlur (A1111's own calls) for
# the paste-back baselines; the inputs are 8-bit PNG files written and read back by the test.

def _random_case(tmp_path, seed=0, size=(2, 20, 24)):
    """8-bit images and a blocky binary mask written as PNG files and read back as (B,C,H,W) in [0, 1]."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    b, h, w = size
    arrays = {"pred": rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
              "target": rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
              "mask": np.zeros((b, h, w), np.uint8)}
    arrays["mask"][0, 4:13, 5:17] = 255
    arrays["mask"][1, 9:, :11] = 255
    arrays["mask"][1, 2, 20] = 255  # a lone generated pixel
    loaded = {}
    for key, array in arrays.items():
        files = []
        for i in range(b):
            Image.fromarray(array[i]).save(tmp_path / f"{key}{i}.png")
            files.append(np.asarray(Image.open(tmp_path / f"{key}{i}.png"), dtype=np.float64) / 255.0)
        loaded[key] = np.stack(files)
    tensors = {k: torch.from_numpy(v).permute(0, 3, 1, 2).float() for k, v in loaded.items() if k != "mask"}
    tensors["mask"] = torch.from_numpy(loaded["mask"])[:, None].float()
    return loaded, tensors


def _reference_seam(pred, target, mask):
    """Loop over every 4-adjacent pair (p, q) with different mask values: mean |step_pred - step_target|."""
    out = []
    for i in range(pred.shape[0]):
        m = mask[i] >= 0.5
        values = []
        for y in range(m.shape[0]):
            for x in range(m.shape[1]):
                for dy, dx in ((0, 1), (1, 0)):
                    y2, x2 = y + dy, x + dx
                    if y2 < m.shape[0] and x2 < m.shape[1] and m[y, x] != m[y2, x2]:
                        step_p = pred[i, y, x] - pred[i, y2, x2]
                        step_t = target[i, y, x] - target[i, y2, x2]
                        values.append(np.abs(step_p - step_t).mean())
        out.append(np.mean(values) if values else np.nan)
    return np.array(out)


def _reference_band_mse(pred, target, mask, band_px, side):
    """MSE over the pixels of one side whose chessboard distance to the other side is <= band_px."""
    from scipy.ndimage import distance_transform_cdt

    out = []
    for i in range(pred.shape[0]):
        m = mask[i] >= 0.5
        this = m if side == "inner" else ~m
        # distance of each pixel of `this` to the nearest pixel of the other side
        dist = distance_transform_cdt(this, metric="chessboard")
        band = this & (dist <= band_px) & (~this).any()
        err = ((pred[i] - target[i]) ** 2)[band]
        out.append(err.mean() if err.size else np.nan)
    return np.array(out)


@pytest.mark.parametrize("band_px", [1, 3, 8])
def test_band_psnr_and_seam_error_match_numpy(tmp_path, band_px):
    from ldm.metrics import boundary_metrics

    a, t = _random_case(tmp_path)
    got = boundary_metrics(t["pred"], t["target"], t["mask"], band_px=band_px)
    for side in ("inner", "outer"):
        ref = _reference_band_mse(a["pred"], a["target"], a["mask"], band_px, side)
        np.testing.assert_allclose(got[f"mse_band_{side}"].numpy(), ref, rtol=1e-5)
        np.testing.assert_allclose(got[f"psnr_band_{side}"].numpy(), 10 * np.log10(1 / ref), rtol=1e-5)
    np.testing.assert_allclose(got["seam_error"].numpy(), _reference_seam(a["pred"], a["target"], a["mask"]),
                               rtol=1e-5)


def test_seam_error_sees_an_added_step_not_the_image_own_edge():
    from ldm.metrics import boundary_metrics

    h = w = 16
    mask = torch.zeros(1, 1, h, w)
    mask[..., :, 8:] = 1.0                               # generated right half, edge between columns 7 and 8
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    target = ((xx >= 8).float() * 0.6 + 0.2).expand(1, 3, h, w).clone()   # the image has its own edge there
    assert boundary_metrics(target, target, mask)["seam_error"].item() == 0   # reproducing it is no seam
    stepped = target.clone()
    stepped[..., 8:] += 0.1                              # the output adds a step of 0.1 at the mask edge
    m = boundary_metrics(stepped, target, mask)
    assert m["seam_error"].item() == pytest.approx(0.1, rel=1e-5)  # each of the h pairs across the edge
    # an offset confined to the generated region far from the edge is no seam either
    inside = target.clone()
    inside[..., 12:] += 0.1
    assert boundary_metrics(inside, target, mask)["seam_error"].item() == 0
    # the bands: band_px 4 covers columns 8-11 (inner) and 4-7 (outer), both unchanged
    b = boundary_metrics(inside, target, mask, band_px=4)
    assert math.isinf(b["psnr_band_inner"].item()) and math.isinf(b["psnr_band_outer"].item())
    b = boundary_metrics(inside, target, mask, band_px=5)  # columns 8-12: column 12 (error 0.1) is 1 in 5
    assert b["mse_band_inner"].item() == pytest.approx(0.01 / 5, rel=1e-5)
    assert b["mse_band_outer"].item() == 0


def test_boundary_metrics_of_an_image_without_edge_are_nan_and_skipped():
    from ldm.metrics import boundary_metrics

    x = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[1, :, 2:5, 2:5] = 1
    m = boundary_metrics(x, x * 0.5, mask)
    assert all(math.isnan(m[k][0]) for k in ("mse_band_inner", "mse_band_outer", "seam_error"))
    assert not any(math.isnan(m[k][1]) for k in ("mse_band_inner", "mse_band_outer", "seam_error"))
    acc = RegionMetricAccumulator(band_px=2)
    acc.update(x, x * 0.5, mask)
    s = acc.summary()
    assert s["seam_error"] == pytest.approx(float(m["seam_error"][1]), rel=1e-6)
    assert s["psnr_band_inner"] == pytest.approx(10 * math.log10(1 / float(m["mse_band_inner"][1])), rel=1e-6)
    with pytest.raises(ValueError, match="band_px"):
        boundary_metrics(x, x, mask, band_px=0)


def _overlay_reference(output, source, mask_u8):
    """diffusers' VaeImageProcessor.apply_overlay on PIL images (A1111 composites with the same PIL calls)."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    out = []
    for i in range(output.shape[0]):
        img = VaeImageProcessor().apply_overlay(Image.fromarray(mask_u8[i]), Image.fromarray(source[i]),
                                                Image.fromarray(output[i]))
        out.append(np.asarray(img, dtype=np.float64) / 255.0)
    return np.stack(out)


def _a1111_blur(mask_u8, r):
    """AUTOMATIC1111's mask blur: cv2.GaussianBlur along x then y, kernel 2 * int(2.5 r + 0.5) + 1, sigma r."""
    import cv2

    k = 2 * int(2.5 * r + 0.5) + 1
    out = []
    for m in mask_u8:
        m = cv2.GaussianBlur(m, (k, 1), r)
        out.append(cv2.GaussianBlur(m, (1, k), r))
    return np.stack(out)


def test_paste_back_is_diffusers_apply_overlay(tmp_path):
    from ldm.metrics import paste_back

    a, t = _random_case(tmp_path, seed=1)
    u8 = {k: np.round(v * 255).astype(np.uint8) for k, v in a.items()}
    got = quantize(paste_back(t["pred"], t["target"], t["mask"])).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, _overlay_reference(u8["pred"], u8["target"], u8["mask"]), atol=1e-6)
    kept = a["mask"] < 0.5
    assert np.array_equal(got[kept], a["target"][kept].astype(np.float32))     # zero error where kept
    assert np.array_equal(got[~kept], a["pred"][~kept].astype(np.float32))


@pytest.mark.parametrize("blur_px", [1.0, 4.0, 2.5])
def test_paste_blur_is_a1111_mask_blur_then_overlay(tmp_path, blur_px):
    from scipy.ndimage import gaussian_filter1d

    from ldm.metrics import gaussian_blur_mask, paste_back

    a, t = _random_case(tmp_path, seed=2)
    u8 = {k: np.round(v * 255).astype(np.uint8) for k, v in a.items()}
    blurred = _a1111_blur(u8["mask"], blur_px)
    # the Gaussian itself, against scipy (sigma R, radius int(2.5 R + 0.5), mirror = cv2's reflect-101)
    radius = int(2.5 * blur_px + 0.5)
    ref = gaussian_filter1d(gaussian_filter1d(a["mask"], blur_px, axis=2, mode="mirror", radius=radius),
                            blur_px, axis=1, mode="mirror", radius=radius)
    np.testing.assert_allclose(gaussian_blur_mask(t["mask"], blur_px)[:, 0].numpy(), ref, atol=1e-6)
    # cv2 rounds to 8 bits after each pass (and computes 8-bit blurs in fixed point)
    np.testing.assert_allclose(ref * 255, blurred, atol=1.5)
    pasted = paste_back(t["pred"], t["target"], t["mask"], blur_px=blur_px).permute(0, 2, 3, 1).numpy()
    alpha = (np.round(ref * 255) / 255)[..., None]  # the blurred mask as an 8-bit image holds it
    np.testing.assert_allclose(pasted, a["target"] * (1 - alpha) + a["pred"] * alpha, atol=1e-5)
    # A1111's own numbers: up to 1.5 levels of alpha from cv2's 8-bit passes, one level from PIL's premultiplied
    # 8-bit composite
    got = quantize(torch.from_numpy(pasted)).numpy()
    want = _overlay_reference(u8["pred"], u8["target"], blurred)
    assert np.abs(got - want).max() <= 2.5 / 255
    far = _reference_band_mse(a["pred"], a["target"], a["mask"], 1, "outer")  # (ensures the case has an edge)
    assert np.isfinite(far).all()


def test_gaussian_blur_mask_handles_kernels_wider_than_the_image():
    from scipy.ndimage import gaussian_filter1d

    from ldm.metrics import gaussian_blur_mask

    mask = torch.zeros(1, 1, 5, 3)
    mask[..., 1:3, 1] = 1
    got = gaussian_blur_mask(mask, 4.0)[0, 0].numpy()
    ref = gaussian_filter1d(gaussian_filter1d(mask[0, 0].numpy().astype(np.float64), 4.0, axis=1, mode="mirror",
                                              radius=10), 4.0, axis=0, mode="mirror", radius=10)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_fresh_accumulators_are_independent_and_share_settings():
    from ldm.metrics import ImageMetrics

    template = ImageMetrics(lpips=False, fid=False, band_px=2)
    a, b = template.fresh(), template.fresh()
    x = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    a.update(x, x, mask)
    b.update(x, 1 - x, mask)
    assert len(template.region) == 0 and a.summary()["pre_error"] == 0 and b.summary()["pre_error"] > 0
    assert a.region.band_px == 2 and a.missing == template.missing and a.missing is not template.missing
    with pytest.raises(ValueError, match="before it has seen any image"):
        a.fresh()
