"""Region metrics on hand-made tensors whose answers are known."""
from __future__ import annotations

import json
import math

import pytest
import torch

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
