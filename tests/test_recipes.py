"""The composite rows X+<recipe>: the information rule, and each recipe against an independent reimplementation of
its tool's code (numpy / scipy / cv2 / skimage written here) on 8-bit PNG files the test writes and reads back."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import metrics
from ldm.image_io import quantize
from scripts import evaluate


def _files(tmp_path, seed=0, size=(2, 48, 56)):
    """(arrays, tensors): smooth 8-bit images, outputs with a colour cast, and masks (one inside the frame, one
    touching two borders), written as PNG and read back; arrays (B,H,W,3) / (B,H,W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    b, h, w = size
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([np.stack([0.5 + 0.3 * np.sin(xx / (5 + i) + c) * np.cos(yy / 7 - c) for c in range(3)], -1)
                      for i in range(b)])
    output = np.clip(image[..., ::-1] * 0.8 + 0.15 + rng.normal(0, 0.03, image.shape), 0, 1)
    mask = np.zeros((b, h, w))
    mask[0, 10:30, 12:40] = 1
    mask[1, 20:, 30:] = 1
    mask[1, 5:9, 4:9] = 1
    arrays = {"image": image, "output": output, "mask": mask}
    loaded = {}
    for key, array in arrays.items():
        files = []
        for i in range(b):
            path = tmp_path / f"{key}{i}.png"
            Image.fromarray(np.round(array[i] * 255).astype(np.uint8)).save(path)
            files.append(np.asarray(Image.open(path), dtype=np.float64) / 255)
        loaded[key] = np.stack(files)
    tensors = {k: torch.from_numpy(v).permute(0, 3, 1, 2).float() for k, v in loaded.items() if k != "mask"}
    tensors["mask"] = torch.from_numpy(loaded["mask"])[:, None].float()
    return loaded, tensors


def _np(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).double().numpy()


def _blend(output, source, alpha):
    return source * (1 - alpha[..., None]) + output * alpha[..., None]


# ------------------------------------------------------------------------------------------------ information rule
def _unrelated_case():
    """A decoder output that knows nothing of the image: flat grey. Kept pixels a smooth pattern around grey, the
    hole's reference a random 0.1 / 0.9 pattern of mean 0.5 independent of both, so grey is the best guess there
    and no legitimate use of the kept pixels can approach the hole's content."""
    rng = np.random.default_rng(0)
    h = w = 64
    yy, xx = np.mgrid[:h, :w]
    kept = 0.5 + 0.2 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    hole = np.where(rng.random((h, w, 3)) < 0.5, 0.9, 0.1)
    mask = np.zeros((h, w))
    mask[16:48, 20:44] = 1
    image = np.where(mask[..., None] > 0, hole, kept[..., None])
    image = torch.from_numpy(np.round(image * 255) / 255).float().permute(2, 0, 1)[None]
    return torch.full_like(image, 0.5), image, torch.from_numpy(mask).float()[None, None]


def test_no_recipe_beats_an_unrelated_decoder_in_the_generated_band():
    """The rule as a number: every X+<recipe> row of evaluate (the function both modes call) against X, in the
    generated band. Today's paste_blur, the original blended into the hole, beat X by 2.3 dB here (10.30 against
    7.96); it must not."""
    pred, image, mask = _unrelated_case()
    opt = argparse.Namespace(baselines=metrics.RECIPES, blur_px=4.0)
    other = torch.stack(metrics.other_content([image[0]]))
    rows = evaluate.with_baselines(pred, image, mask, opt, other)
    assert set(rows) == {""} | {f"+{r}" for r in metrics.RECIPES}
    band = {k: float(metrics.boundary_metrics(v, image, mask)["psnr_band_inner"][0]) for k, v in rows.items()}
    for row, value in band.items():
        assert value <= band[""] + 0.05, f"X{row} beats X in the generated band: {value:.2f} > {band['']:.2f} dB"
    # the same check sees a leak: the symmetric blend handed the reference under the mask wins
    leak = metrics.composite("a1111", pred, image, mask, other=image)
    assert float(metrics.boundary_metrics(leak, image, mask)["psnr_band_inner"][0]) > band[""] + 1


@pytest.mark.parametrize("recipe", metrics.RECIPES)
def test_no_recipe_reads_the_reference_under_the_mask(recipe, tmp_path):
    """Whatever the original holds under the mask, every composite is the same, bit for bit."""
    _, t = _files(tmp_path)
    other = torch.stack(metrics.other_content(list(t["image"])))
    replaced = t["image"] * (1 - t["mask"]) + torch.rand_like(t["image"]) * t["mask"]
    a = metrics.composite(recipe, t["output"], t["image"], t["mask"], other)
    b = metrics.composite(recipe, t["output"], replaced, t["mask"], other)
    assert torch.equal(a, b)
    assert a.shape == t["image"].shape and 0 <= a.min() and a.max() <= 1


@pytest.mark.parametrize("recipe", [r for r in metrics.RECIPES if r not in metrics.SYMMETRIC_RECIPES])
def test_the_other_recipes_never_show_the_source_in_the_hole(recipe, tmp_path):
    """Only the symmetric recipes blend the source into the hole: for every other one the hole is a function of
    the output and the kept pixels, and the alpha recipes leave it the output's exactly."""
    _, t = _files(tmp_path)
    a = metrics.composite(recipe, t["output"], t["image"], t["mask"], torch.zeros_like(t["image"]))
    b = metrics.composite(recipe, t["output"], t["image"], t["mask"], torch.ones_like(t["image"]))
    assert torch.equal(a, b)
    if recipe in ("paste", "fooocus", "invokeai", "brushnet"):
        hole = t["mask"].expand_as(a) > 0.5
        assert torch.allclose(a[hole], t["output"][hole], atol=1e-6)


def test_symmetric_recipes_need_other_content_and_unknown_recipes_are_refused():
    x, m = torch.rand(1, 3, 8, 8), torch.zeros(1, 1, 8, 8)
    for recipe in metrics.SYMMETRIC_RECIPES:
        with pytest.raises(ValueError, match="other content"):
            metrics.composite(recipe, x, x, m)
    with pytest.raises(ValueError, match="not one of paste, a1111"):
        metrics.composite("paste_blur", x, x, m)


def test_other_content_is_another_image_seeded():
    images = [torch.full((3, 4, 6), float(i)) for i in range(5)]
    a, b = metrics.other_content(images, seed=3), metrics.other_content(images, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    values = [int(o[0, 0, 0]) for o in a]
    shift = (values[0] - 0) % 5
    assert shift != 0 and values == [(i + shift) % 5 for i in range(5)]
    assert {int(metrics.other_content(images, seed=s)[0][0, 0, 0]) for s in range(20)} > {shift}  # the seed picks
    one = torch.arange(24.0).reshape(1, 4, 6).expand(3, -1, -1)
    assert torch.equal(metrics.other_content([one])[0], one.flip(-1).flip(-2))
    small = metrics.other_content([torch.zeros(3, 4, 6), torch.ones(3, 8, 12)])
    assert small[0].shape == (3, 4, 6) and small[1].shape == (3, 8, 12)


# ------------------------------------------------------------------------------------------------ each recipe
def test_paste_is_the_kept_pixels_over_the_output(tmp_path):
    a, t = _files(tmp_path)
    got = _np(metrics.composite("paste", t["output"], t["image"], t["mask"]))
    np.testing.assert_allclose(got, _blend(a["output"], a["image"], a["mask"]), atol=1e-6)


def test_a1111_blurs_the_mask_with_cv2_and_shows_other_content_in_the_hole(tmp_path):
    import cv2

    a, t = _files(tmp_path)
    other = torch.stack(metrics.other_content(list(t["image"])))
    got = _np(metrics.composite("a1111", t["output"], t["image"], t["mask"], other, blur_px=4.0))
    k = 2 * int(2.5 * 4 + 0.5) + 1
    alpha = np.stack([cv2.GaussianBlur(cv2.GaussianBlur(m, (k, 1), 4.0), (1, k), 4.0) for m in a["mask"]])
    alpha = np.round(np.clip(alpha, 0, 1) * 255) / 255
    source = a["image"] * (1 - a["mask"][..., None]) + a["image"][::-1] * a["mask"][..., None]
    np.testing.assert_allclose(got, _blend(a["output"], source, alpha), atol=1e-5)


def test_fooocus_is_its_morphological_open_ramp(tmp_path):
    from scipy.ndimage import maximum_filter

    a, t = _files(tmp_path)
    got = _np(metrics.composite("fooocus", t["output"], t["image"], t["mask"]))
    alphas = []
    for m in a["mask"]:
        x = np.where(m * 255 > 127, 256, 0).astype(np.int32)
        for _ in range(32):
            x = np.maximum(maximum_filter(x, size=3, mode="nearest") - 8, x)
        alphas.append(np.clip(x, 0, 255) / 255)
    alpha = np.stack(alphas)
    assert alpha[0, 15, 20] == 1 and alpha[0, 9, 20] == 248 / 255 and alpha[0, 5, 20] == 216 / 255  # outward
    np.testing.assert_allclose(got, _blend(a["output"], a["image"] * (1 - a["mask"][..., None]), alpha), atol=1e-5)


def test_invokeai_is_its_cubic_distance_fade(tmp_path):
    from scipy.ndimage import distance_transform_edt

    a, t = _files(tmp_path)
    got = _np(metrics.composite("invokeai", t["output"], t["image"], t["mask"]))
    fade = 16
    coeffs = np.polyfit([0.0, 1.0 / fade, 0.2, 0.8, 1.0], [0.0, 0.0, 0.2, 0.9, 1.0], 3)
    alphas = []
    for m in a["mask"]:
        d = np.clip(distance_transform_edt(m < 0.5) / fade, 0, 1)  # exact distances; InvokeAI's cv2 mask 5 is close
        keep = np.clip(np.where(d >= 1, 1.0, np.polyval(coeffs, d)), 0, 1)
        alphas.append(np.where(m > 0.5, 1.0, 1 - np.floor(keep * 255) / 255))
    alpha = np.stack(alphas)
    want = _blend(a["output"], a["image"] * (1 - a["mask"][..., None]), alpha)
    assert np.abs(got - want).max() < 0.02 and np.abs(got - want).mean() < 1e-3
    assert np.array_equal(got[a["mask"] > 0.5], a["output"][a["mask"] > 0.5].astype(np.float32))


def test_cropandstitch_is_its_dilate_blur_hipass_blur(tmp_path):
    from scipy.ndimage import gaussian_filter, grey_dilation

    a, t = _files(tmp_path)
    other = torch.stack(metrics.other_content(list(t["image"])))
    got = _np(metrics.composite("cropandstitch", t["output"], t["image"], t["mask"], other))
    alphas = []
    for m in a["mask"]:  # InpaintCropImproved / InpaintStitchImproved, CPU logic, mask_blend_pixels 32
        x = grey_dilation(m, footprint=np.ones((13, 13)))
        x = np.clip(gaussian_filter(x, sigma=4.0), 0, 1)
        x[x < 0.1] = 0
        alphas.append(np.clip(gaussian_filter(x, sigma=4.0), 0, 1))
    alpha = np.stack(alphas)
    assert alpha[a["mask"] > 0.5].min() < 0.8  # it reaches into the hole: other content shows there
    source = a["image"] * (1 - a["mask"][..., None]) + a["image"][::-1] * a["mask"][..., None]
    np.testing.assert_allclose(got, _blend(a["output"], source, alpha), atol=1e-5)


def test_brushnet_is_its_union_with_the_blurred_mask(tmp_path):
    import cv2

    a, t = _files(tmp_path)
    got = _np(metrics.composite("brushnet", t["output"], t["image"], t["mask"]))
    alphas = []
    for m in a["mask"]:
        blurred = cv2.GaussianBlur(m * 255, (21, 21), 0) / 255
        alphas.append(1 - (1 - m) * (1 - blurred))
    alpha = np.stack(alphas)
    np.testing.assert_allclose(got, _blend(a["output"], a["image"] * (1 - a["mask"][..., None]), alpha), atol=1e-5)


def test_colormatch_is_a_lab_transfer_over_the_kept_pixels_then_paste(tmp_path):
    from skimage.color import lab2rgb, rgb2lab

    a, t = _files(tmp_path)
    got = _np(metrics.composite("colormatch", t["output"], t["image"], t["mask"]))
    want = []
    for o, x, m in zip(a["output"], a["image"], a["mask"]):
        keep = m < 0.5
        lo, lx = rgb2lab(o), rgb2lab(x)
        matched = (lo - lo[keep].mean(0)) / lo[keep].std(0) * lx[keep].std(0) + lx[keep].mean(0)
        rgb = np.clip(lab2rgb(matched), 0, 1)
        want.append(np.where(keep[..., None], x, rgb))
    np.testing.assert_allclose(got, np.stack(want), atol=2e-3)
    # the cast is gone: the hole's mean colour moves towards the original's
    hole = a["mask"] > 0.5
    assert np.abs(got[hole].mean(0) - a["image"][hole].mean(0)).sum() < \
        np.abs(a["output"][hole].mean(0) - a["image"][hole].mean(0)).sum()


def _poisson_reference(guide, kept, hole):
    """Per hole pixel, a loop over its 4-neighbours in the image: sum (f_p - f_q) = sum (g_p - g_q), f_q = kept_q
    for a kept neighbour; solved densely."""
    h, w = hole.shape
    pixels = list(zip(*np.nonzero(hole)))
    index = {p: i for i, p in enumerate(pixels)}
    matrix = np.zeros((len(pixels), len(pixels)))
    rhs = np.zeros((len(pixels), guide.shape[-1]))
    for i, (y, x) in enumerate(pixels):
        for qy, qx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= qy < h and 0 <= qx < w:
                matrix[i, i] += 1
                rhs[i] += guide[y, x] - guide[qy, qx]
                if hole[qy, qx]:
                    matrix[i, index[(qy, qx)]] -= 1
                else:
                    rhs[i] += kept[qy, qx]
    out = kept.copy()
    out[hole] = np.clip(np.linalg.solve(matrix, rhs), 0, 1)
    return out


def test_poisson_is_the_guided_interpolation(tmp_path):
    a, t = _files(tmp_path, size=(2, 24, 28))
    t["mask"][0] = 0
    t["mask"][0, :, 6:16, 8:20] = 1
    a["mask"][0] = t["mask"][0, 0].numpy()
    got = _np(metrics.composite("poisson", t["output"], t["image"], t["mask"]))
    for i in range(2):
        hole = a["mask"][i] > 0.5
        want = _poisson_reference(a["output"][i], a["image"][i] * ~hole[..., None], hole)
        np.testing.assert_allclose(got[i], want, atol=1e-5)
        assert np.array_equal(got[i][~hole], a["image"][i][~hole].astype(np.float32))


def _pyramid_blend(output, source, mask, levels):
    """Burt-Adelson with scipy: binomial 5-tap filter, border 'mirror' (reflect-101), every second pixel; up =
    zeros between the samples, the filter times 2 per axis."""
    from scipy.ndimage import convolve1d

    kernel = np.array([1, 4, 6, 4, 1]) / 16

    def blur(x, gain=1.0):
        return convolve1d(convolve1d(x, kernel * gain, axis=0, mode="mirror"), kernel * gain, axis=1, mode="mirror")

    def up(x, shape):
        z = np.zeros(shape + x.shape[2:])
        z[::2, ::2] = x[:(shape[0] + 1) // 2, :(shape[1] + 1) // 2]
        return blur(z, 2.0)

    def pyramids(x):
        g = [x]
        for _ in range(levels):
            g.append(blur(g[-1])[::2, ::2])
        return g, [g[i] - up(g[i + 1], g[i].shape[:2]) for i in range(levels)] + [g[-1]]

    gm, _ = pyramids(mask)
    _, lo = pyramids(output)
    _, ls = pyramids(source)
    levels_ = [a[..., None] * x + (1 - a[..., None]) * y for a, x, y in zip(gm, lo, ls)]
    x = levels_[-1]
    for level in reversed(levels_[:-1]):
        x = up(x, level.shape[:2]) + level
    return np.clip(x, 0, 1)


def test_laplacian_is_the_multiband_blend(tmp_path):
    a, t = _files(tmp_path, size=(2, 45, 70))  # odd sides too
    got = _np(metrics.composite("laplacian", t["output"], t["image"], t["mask"]))
    assert metrics.laplacian_levels(45, 70) == 2
    for i in range(2):
        m = a["mask"][i]
        source = a["image"][i] * (1 - m[..., None]) + a["output"][i] * m[..., None]
        np.testing.assert_allclose(got[i], _pyramid_blend(a["output"][i], source, m, 2), atol=1e-5)


# ------------------------------------------------------------------------------------------------ gradient metrics
def test_gradient_errors_are_sobel_differences(tmp_path):
    import cv2

    from ldm.modules.mask_edges import band_masks

    a, t = _files(tmp_path)
    pred = quantize(metrics.composite("fooocus", t["output"], t["image"], t["mask"]))
    got = metrics.boundary_metrics(pred, t["image"], t["mask"], band_px=8, blend_px=5)
    p = _np(pred)
    for i in range(2):
        m = a["mask"][i] > 0.5

        def grad(x):
            return [cv2.Sobel(x, cv2.CV_64F, 1, 0, ksize=3) / 8, cv2.Sobel(x, cv2.CV_64F, 0, 1, ksize=3) / 8]

        (px, py), (tx, ty) = grad(p[i]), grad(a["image"][i])
        diff = np.sqrt((px - tx) ** 2 + (py - ty) ** 2).mean(-1)
        edge = np.zeros_like(m)
        edge[:, 1:] |= m[:, 1:] != m[:, :-1]
        edge[:, :-1] |= m[:, 1:] != m[:, :-1]
        edge[1:] |= m[1:] != m[:-1]
        edge[:-1] |= m[1:] != m[:-1]
        assert float(got["boundary_gradient_error"][i]) == pytest.approx(diff[edge].mean(), rel=1e-5)
        inner, outer = band_masks(t["mask"][i:i + 1], 5)
        band = ((inner + outer)[0, 0] > 0).numpy()
        assert float(got["band_gradient_error"][i]) == pytest.approx(diff[band].mean(), rel=1e-5)
        kept_band = (outer[0, 0] > 0).numpy()
        mse = ((p[i] - a["image"][i]) ** 2)[kept_band].mean()
        assert float(got["mse_blend_outer"][i]) == pytest.approx(mse, rel=1e-5)


def test_an_outward_feather_is_seen_by_the_band_gradient_not_by_seam_error(tmp_path):
    """Fooocus' ramp keeps the output's own step at the mask edge (its seam_error is the output's) and moves the
    blend into the kept band, where psnr_blend_outer pays and band_gradient_error sees the transition."""
    _, t = _files(tmp_path)
    x = t["output"]
    fooocus = quantize(metrics.composite("fooocus", x, t["image"], t["mask"]))
    paste = quantize(metrics.composite("paste", x, t["image"], t["mask"]))
    mx, mf, mp = (metrics.boundary_metrics(o, t["image"], t["mask"]) for o in (x, fooocus, paste))
    assert torch.allclose(mf["seam_error"], mx["seam_error"], rtol=0.05)
    assert (mf["psnr_blend_outer"] < mp["psnr_blend_outer"]).all()  # paste keeps the kept band exactly
    assert (mf["band_gradient_error"] != mx["band_gradient_error"]).all()


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_bootstrap_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 40)
    got = metrics.paired_bootstrap(a, b, seed=7, resamples=500)
    d = a - b
    draws = np.random.default_rng(7).integers(0, 40, (500, 40))
    means = np.array([d[row].mean() for row in draws])
    assert got["diff"] == pytest.approx(d.mean()) and got["n"] == 40
    assert got["low"] == pytest.approx(np.quantile(means, 0.025))
    assert got["high"] == pytest.approx(np.quantile(means, 0.975))
    # the normal approximation: mean +- 1.96 sd / sqrt(n), within a few percent on this many draws
    wide = metrics.paired_bootstrap(a, b, seed=7, resamples=20000)
    half = 1.96 * d.std() / np.sqrt(40)
    assert wide["high"] - wide["low"] == pytest.approx(2 * half, rel=0.08)
    assert metrics.verdict(got, higher_is_better=True) == "wins"
    assert metrics.verdict(got, higher_is_better=False) == "loses"
    assert metrics.verdict(metrics.paired_bootstrap(a, a + rng.normal(0, 1e-3, 40)), True) \
        == "no difference measured"
    assert metrics.paired_bootstrap([1.0, float("nan")], [0.0, 2.0])["n"] == 1
    assert metrics.paired_bootstrap([float("inf")], [2.0]) is None
    assert metrics.paired_bootstrap([float("inf")], [float("inf")])["diff"] == 0


def test_composites_of_a_whole_batch_take_their_other_content_from_it(tmp_path):
    _, t = _files(tmp_path)
    rows = metrics.composites("all", t["output"], t["image"], t["mask"], seed=4)
    assert tuple(rows) == metrics.RECIPES
    other = torch.stack(metrics.other_content(list(t["image"]), 4))
    assert torch.equal(rows["a1111"], metrics.composite("a1111", t["output"], t["image"], t["mask"], other))
    assert tuple(metrics.composites(["poisson", "paste"], t["output"], t["image"], t["mask"])) == ("poisson", "paste")


def test_every_recipe_end_to_end_keeps_the_rule(tmp_path):
    """results mode with --baselines all on files: a flat grey prediction (unrelated to the images), originals whose
    holes hold random content; every X+<recipe> row exists with its intervals, and none beats X in the generated
    band (the interval's upper end included)."""
    indir, preds = tmp_path / "in", tmp_path / "grey"
    indir.mkdir(), preds.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        _, image, mask = _unrelated_case()
        hole = np.where(rng.random((64, 64, 3)) < 0.5, 0.9, 0.1)
        x = image[0].permute(1, 2, 0).numpy()
        x = np.where(mask[0, 0, ..., None].numpy() > 0, hole, x)
        Image.fromarray(np.round(x * 255).astype(np.uint8)).save(indir / f"p{i}.png")
        Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8)).save(indir / f"p{i}_mask.png")
        Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(preds / f"p{i}.png")
    out = tmp_path / "out"
    assert evaluate.main(["results", "--indir", str(indir), "--predictions", f"grey={preds}", "--outdir", str(out),
                          "--quiet", "--no_lpips", "--no_fid", "--baselines", "all", "--n_examples", "0"]) == 0
    rows = json.loads((out / "metrics.json").read_text())["decoders"]
    assert list(rows) == ["grey"] + [f"grey+{r}" for r in metrics.RECIPES]
    for recipe in metrics.RECIPES:
        row = rows[f"grey+{recipe}"]
        assert row["baseline"] == recipe and row["psnr_band_inner"] <= rows["grey"]["psnr_band_inner"] + 0.05
        ci = row["psnr_band_inner_ci"]
        assert ci["vs"] == "grey" and ci["low"] <= ci["high"] <= 0.05
    assert rows["grey+a1111"]["other_seed"] == 0 and "other_content" in rows["grey+cropandstitch"]
    assert "other_content" not in rows["grey+fooocus"]
