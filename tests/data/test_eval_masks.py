"""LaMa's evaluation mask sets and the hole-size split of the report."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldm import metrics
from ldm.data.masks import LAMA_MASK_CONFIGS, MaskGenerator, lama_mask_config

# LaMa's configs/data_gen/random_*.yaml, mask_generator_kwargs, as published (irregular; box or None)
LAMA = {
    "thin_256": ((4, 50, 10, 4, 40), None),
    "thin_512": ((4, 70, 20, 4, 100), None),
    "medium_256": ((4, 5, 50, 4, 100), (0, 10, 50, 5, 1)),
    "medium_512": ((4, 10, 100, 4, 200), (0, 30, 150, 5, 1)),
    "thick_256": ((1, 5, 100, 4, 200), (10, 30, 150, 3, 1)),
    "thick_512": ((1, 5, 250, 4, 450), (10, 30, 300, 4, 1)),
}


@pytest.mark.parametrize("name", sorted(LAMA))
def test_lama_presets_are_lamas_settings(name):
    irregular, box = LAMA[name]
    g = MaskGenerator.from_config(name)
    keys = ("min_times", "max_times", "max_width", "max_angle", "max_len")
    assert tuple(g.irregular_kwargs[k] for k in keys) == irregular
    assert g.reference_size == int(name[-3:]) and g.max_area == 0.5
    if box is None:
        assert g.probs.tolist() == [1.0, 0.0]
    else:
        keys = ("margin", "bbox_min_size", "bbox_max_size", "max_times", "min_times")
        assert tuple(g.box_kwargs[k] for k in keys) == box
        assert g.probs == pytest.approx([1 / 1.3, 0.3 / 1.3])
    # LaMa's max_tamper_area: no mask covers more than half of the image
    areas = [g(96, 96, np.random.default_rng([1, i])).mean() for i in range(30)]
    assert max(areas) <= 0.5 and min(areas) > 0


def test_preset_names_pick_the_nearer_reference_size():
    assert lama_mask_config("thin", 256) is LAMA_MASK_CONFIGS["thin_256"]
    assert lama_mask_config("thick", 512) is LAMA_MASK_CONFIGS["thick_512"]
    assert lama_mask_config("medium_512", 256) is LAMA_MASK_CONFIGS["medium_512"]
    assert lama_mask_config("configs/autoencoder/random_thick_256.yaml", 256) is None
    with pytest.raises(ValueError, match="max_area"):
        MaskGenerator(max_area=0)


def test_the_training_masks_are_unchanged_by_max_area():
    """max_area defaults to 1: the yaml the training uses draws the same masks as before the presets existed."""
    g = MaskGenerator.from_config("configs/autoencoder/random_thick_256.yaml")
    assert g.max_area == 1.0
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    first = g(64, 64, a)
    kind = g.kinds[b.choice(2, p=g.probs)]
    from ldm.data.masks import box_mask, irregular_mask

    fn = irregular_mask if kind == "irregular" else box_mask
    kwargs = g.irregular_kwargs if kind == "irregular" else g.box_kwargs
    assert np.array_equal(first, fn(64, 64, b, scale=64 / 256, **kwargs))


def test_hole_size_bins_are_editbenchs():
    assert [metrics.hole_size_bin(f) for f in (0.05, 0.057, 0.1, 0.215, 0.216, 0.369, 0.37, 1.0)] == \
        [None, "small", "small", "small", "medium", "medium", "large", "large"]


def test_evaluate_splits_rows_by_hole_size(tmp_path):
    from scripts import evaluate

    indir, preds = tmp_path / "in", tmp_path / "pred"
    indir.mkdir(), preds.mkdir()
    rng = np.random.default_rng(0)
    fractions = (0.1, 0.3, 0.5, 0.02)
    errors = []
    for i, frac in enumerate(fractions):
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[:round(64 * frac)] = 255
        pred = np.clip(img.astype(int) + rng.integers(-9, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(indir / f"p{i}.png")
        Image.fromarray(mask).save(indir / f"p{i}_mask.png")
        Image.fromarray(pred).save(preds / f"p{i}.png")
        kept = mask == 0
        errors.append((((pred.astype(float) - img) / 255) ** 2)[kept].mean())
    out = tmp_path / "out"
    assert evaluate.main(["results", "--indir", str(indir), "--predictions", f"x={preds}", "--outdir", str(out),
                          "--quiet", "--no_lpips", "--no_fid", "--baselines", "paste"]) == 0
    rows = json.loads((out / "metrics.json").read_text())["decoders"]
    bins = rows["x"]["by_hole_size"]
    assert [bins[b]["n_images"] for b in ("small", "medium", "large")] == [1, 1, 1]  # 2 %: in no bin
    for b, i in (("small", 0), ("medium", 1), ("large", 2)):
        assert bins[b]["mse_kept"] == pytest.approx(errors[i], rel=1e-5)
    assert rows["x+paste"]["by_hole_size"]["large"]["psnr_kept"] == "inf"
    table = (out / "metrics.md").read_text()
    assert "By hole size" in table
    # results mode: the generated region's reference is the replaced content; no quality, no verdict, no ranking
    assert "PSNR vs replaced content (dB)" in table and "PSNR generated (dB)" not in table
    assert "PSNR band in vs replaced content (dB)" in table and "PSNR band in (dB)" not in table
    assert rows["x+paste"]["psnr_generated_ci"]["verdict"] == "agreement with the replaced content, not a quality"
    assert rows["x+paste"]["seam_error_ci"]["verdict"] in ("wins", "loses", "no difference measured")
    best = next(line for line in table.splitlines() if line.startswith("Best per column"))
    assert "replaced" not in best and "MSE generated" not in best


def test_mask_config_names_a_lama_set_in_reconstruction():
    import argparse
    from pathlib import Path

    import torch

    from scripts import evaluate

    sources = [evaluate.Source(f"s{i}", Path(f"s{i}.png"), torch.rand(3, 64, 64), None) for i in range(3)]
    opt = argparse.Namespace(mask_dir=None, mask_config="thin", seed=2)
    samples = evaluate.condition_samples(sources, evaluate.Condition("", 64), opt)
    g = MaskGenerator.from_config("thin_256")
    for i, s in enumerate(samples):
        assert np.array_equal(s.mask[0].numpy(), g(64, 64, np.random.default_rng([2, i])))
