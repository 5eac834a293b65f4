"""scripts/evaluate.py end to end on tiny random-weight decoders and tmp folders, plus the network-metric loaders
and bad-input refusals."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import metrics
from ldm.checkpoints.files import save_state_dict
from ldm.image_io import quantize
from ldm.modules.mask_edges import coarsen_mask
from scripts import evaluate
from tests.conftest import make_autoencoder

TINY = "configs/tiny/autoencoder_kl_tiny.yaml"
TINY_WOC = "configs/tiny/autoencoder_kl_woc_tiny.yaml"


def write_png(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    if mode == "RGB":  # smooth enough that the tiny autoencoder's errors are not the whole story
        yy, xx = np.mgrid[:size[1], :size[0]]
        base = np.stack([xx * 255 / size[0], yy * 255 / size[1], np.full_like(xx, 128.0)], -1)
        array = np.clip(base + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
    else:
        array = np.zeros(shape, np.uint8)
        array[size[1] // 4: size[1] // 2, size[0] // 3: size[0] * 2 // 3] = 255
    Image.fromarray(array, mode).save(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: save_state_dict(make_autoencoder(condition=condition, num_res_blocks=2).state_dict(),
                                  root / f"{name}.ckpt") for name, condition in (("asym", True), ("vanilla", False))}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i, size in enumerate([(40, 36), (48, 48), (36, 44)]):
        write_png(root / f"img{i}.png", size, seed=i)
    return root


def run_rec(image_dir, ckpts, outdir, *extra):
    return evaluate.main(["reconstruction", "--images", str(image_dir), "--size", "32", "--outdir", str(outdir),
                          "--decoder", f"vanilla={TINY_WOC}:{ckpts['vanilla']}",
                          "--decoder", f"asym={TINY}:{ckpts['asym']}", "--quiet", "--batch_size", "2", *extra])


@pytest.fixture(scope="module")
def rec_report(image_dir, ckpts, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("rec")
    assert run_rec(image_dir, ckpts, outdir) == 0
    return outdir, json.loads((outdir / "metrics.json").read_text())


def test_reconstruction_report(rec_report, image_dir, ckpts):
    outdir, report = rec_report
    assert report["complete"] is True and report["images"] == ["img0", "img1", "img2"]
    assert report["image_size"] == [32, 32]
    assert set(report["decoders"]) == {"vanilla", "asym"}
    for r in report["decoders"].values():
        assert r["n_images"] == 3
        assert 0 < r["pre_error"] < 1 and 0 <= r["ssim"] <= 1
        assert math.isclose(r["pre_error_sum"], r["pre_error"] * 3 * 32 * 32, rel_tol=1e-6)
        assert r["lpips"] is None and r["fid"] is None  # no weights on this machine's default paths
        assert "vgg16-397923af.pth" in r["missing"]["lpips"] and metrics.INCEPTION_FILE in r["missing"]["fid"]
    table = (outdir / "metrics.md").read_text()
    assert table.count("\n| vanilla | 3 |") == 1 and table.count("\n| asym | 3 |") == 1
    # the second decoder against the first, paired per image; a verdict word only where the interval excludes 0
    ci = report["decoders"]["asym"]["psnr_kept_ci"]
    assert ci["vs"] == "vanilla" and ci["low"] <= ci["diff"] <= ci["high"] and ci["n"] == 3
    assert ci["verdict"] == ("no difference measured" if ci["low"] <= 0 <= ci["high"] else
                             "wins" if ci["low"] > 0 else "loses")
    assert "psnr_kept_ci" not in report["decoders"]["vanilla"] and "\n| asym | vanilla | " in table
    figure = Image.open(outdir / "examples.png")
    assert figure.size == (6 * 32, 3 * 32 + 14)  # input, mask, 2 decoders, 2 error maps; 3 rows + labels


def test_reconstruction_matches_a_direct_computation(rec_report, image_dir, ckpts):
    """The asym row equals pre_error of the model's own decode with the generated masks (same seeds)."""
    _, report = rec_report
    opt = evaluate.parse_args(["reconstruction", "--images", str(image_dir), "--size", "32", "--outdir", "x",
                               "--decoder", f"a={TINY}:{ckpts['asym']}", "--quiet"])
    samples = evaluate.reconstruction_samples(opt)
    model = make_autoencoder(condition=True, num_res_blocks=2)
    image = torch.stack([s.image for s in samples])
    mask = torch.stack([s.mask for s in samples])
    assert 0 < mask.mean() < 1
    with torch.no_grad():
        z = model.encode(image * 2 - 1).mode()
        pred = quantize(metrics.to_unit(model.decode(z, image * 2 - 1, mask)))
    expected = metrics.pre_error(pred, image, mask).mean().item()
    assert math.isclose(report["decoders"]["asym"]["pre_error"], expected, rel_tol=1e-4)
    # masks are fixed by (seed, index): a second call gives the same ones
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(samples, evaluate.reconstruction_samples(opt)))


@pytest.mark.slow
def test_reconstruction_with_mask_folder_and_tiling(image_dir, ckpts, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, size in enumerate([(40, 36), (48, 48), (36, 44)]):
        write_png(masks / f"img{i}_mask.png", size, mode="L")
    assert run_rec(image_dir, ckpts, tmp_path / "out", "--mask_dir", str(masks), "--tile", "16",
                   "--tile_overlap", "4", "--n_examples", "0", "--fast") == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["decoders"]["asym"]["n_images"] == 3
    assert not (tmp_path / "out" / "examples.png").exists()


def test_results_mode_identical_predictions_give_zero_error_and_inf_psnr(tmp_path):
    indir, same = tmp_path / "in", tmp_path / "same"
    indir.mkdir(), same.mkdir()
    for i in range(2):
        write_png(indir / f"p{i}.png", (64, 64), seed=i)
        write_png(indir / f"p{i}_mask.png", (64, 64), mode="L")
        write_png(same / f"p{i}.png", (64, 64), seed=i)
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for i in range(2):
        arr = np.asarray(Image.open(indir / f"p{i}.png")).astype(np.int16)
        arr[:8] = 255 - arr[:8]  # rows 0-7 lie in the kept region
        Image.fromarray(arr.astype(np.uint8)).save(noisy / f"p{i}.png")
    out = tmp_path / "out"
    assert evaluate.main(["results", "--indir", str(indir), "--predictions", f"same={same}",
                          "--predictions", f"noisy={noisy}", "--outdir", str(out), "--quiet"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    same_r, noisy_r = report["decoders"]["same"], report["decoders"]["noisy"]
    assert same_r["pre_error"] == 0 and same_r["psnr_kept"] == "inf" and same_r["psnr_generated"] == "inf"
    assert same_r["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert noisy_r["pre_error"] > 0 and noisy_r["psnr_generated"] == "inf"
    assert "| same | 2 | 0.00 |" in (out / "metrics.md").read_text()


def test_results_mode_bad_inputs(tmp_path, capsys):
    indir, preds = tmp_path / "in", tmp_path / "pred"
    indir.mkdir(), preds.mkdir()
    out = tmp_path / "out"

    def run(*extra):
        return evaluate.main(["results", "--indir", str(indir), "--predictions", f"x={preds}", "--outdir",
                              str(out), "--quiet", *extra])

    assert run() == 2 and "no NAME.png + NAME_mask.png pairs" in capsys.readouterr().err
    write_png(indir / "a.png", (64, 64))
    write_png(indir / "a_mask.png", (64, 64), mode="L")
    write_png(indir / "b.png", (64, 64))
    assert run() == 2 and "image without its mask b_mask.<ext>" in capsys.readouterr().err
    (indir / "b.png").unlink()
    assert run() == 2 and str(preds / "a.png") in capsys.readouterr().err  # prediction missing
    write_png(preds / "a.png", (128, 64))
    err = (run(), capsys.readouterr().err)
    assert err[0] == 2 and "128x64" in err[1] and "64x64" in err[1]  # size mismatch names both
    write_png(indir / "c.png", (64, 64))
    write_png(indir / "c_mask.png", (32, 32), mode="L")
    assert run() == 2 and "c_mask.png: mask is 32x32" in capsys.readouterr().err
    assert not out.exists()  # nothing written by any failed run


def test_reconstruction_bad_inputs(image_dir, ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert evaluate.main(["reconstruction", "--images", str(image_dir), "--outdir", str(out), "--quiet",
                          "--decoder", f"a={TINY}:{tmp_path / 'missing.ckpt'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["reconstruction", "--images", "x", "--outdir", "o", "--decoder", "a", "--size", "30"])
    assert run_rec(image_dir, ckpts, out, "--mask_dir", str(tmp_path)) == 2
    assert "3 images without a mask: " + str(tmp_path / "img0_mask.png") in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_rec(empty, ckpts, out) == 2 and "no images" in capsys.readouterr().err
    assert evaluate.main(["reconstruction", "--images", str(image_dir), "--outdir", str(out), "--quiet",
                          "--decoder", f"a={TINY}"]) == 2
    assert "NAME=CONFIG.yaml:CKPT" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_lpips_with_a_weights_file(tmp_path):
    """LPIPS is computed when the VGG16 file exists (random weights here: only identity and symmetry are known)."""
    import torchvision

    vgg = torchvision.models.vgg16(weights=None).features.state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in vgg.items()}, path)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    acc = metrics.ImageMetrics(fid=False, lpips_vgg_path=path)
    same, diff = acc.update(a, a, mask)["lpips"], acc.update(a, b, mask)["lpips"]
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)
    assert (diff > 0).all()
    torch.testing.assert_close(diff, acc.update(b, a, mask)["lpips"])
    assert set(acc.summary()["missing"]) == {"fid"}


def test_fid_missing_or_wrong_file(tmp_path):
    acc = metrics.ImageMetrics(lpips=False, fid_weights_path=tmp_path / "none.pth")
    why = acc.missing["fid"]
    assert metrics.INCEPTION_FILE in why and str(tmp_path / "none.pth") in why
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        metrics.build_fid(bad)


def test_ssim_known_values():
    a = torch.rand(2, 3, 32, 32)
    acc = metrics.ImageMetrics(lpips=False, fid=False)
    mask = torch.zeros(2, 1, 32, 32)
    torch.testing.assert_close(acc.update(a, a, mask)["ssim"], torch.ones(2))
    assert (acc.update(a, 1 - a, mask)["ssim"] < 0.5).all()


@pytest.mark.slow
def test_corrupt_weight_files_make_that_metric_na_and_keep_the_others(image_dir, ckpts, tmp_path, capsys):
    """A garbage --lpips_vgg file (UnpicklingError inside torch.load) and an Inception file with foreign keys
    (RuntimeError inside torch-fidelity) are reported as n/a naming the file; the run and other metrics go on."""
    bad_vgg = tmp_path / "bad.pth"
    bad_vgg.write_bytes(b"garbage")
    foreign = tmp_path / "foreign.pth"
    torch.save({"a": torch.zeros(2)}, foreign)
    out = tmp_path / "out"
    assert run_rec(image_dir, ckpts, out, "--lpips_vgg", str(bad_vgg), "--fid_weights", str(foreign),
                   "--n_examples", "0") == 0
    report = json.loads((out / "metrics.json").read_text())
    for r in report["decoders"].values():
        assert r["lpips"] is None and r["fid"] is None and r["pre_error"] > 0 and r["ssim"] > 0
        assert f"{bad_vgg}: not a readable VGG16 weights file" in r["missing"]["lpips"]
        assert f"{foreign}: not a readable Inception weights file" in r["missing"]["fid"]
    table = (out / "metrics.md").read_text()
    assert f"LPIPS not computed: {bad_vgg}: not a readable VGG16 weights file" in table
    assert "| n/a | " in table


def test_mask_folder_whose_count_differs_from_the_images_is_refused(image_dir, ckpts, tmp_path, capsys):
    masks, out = tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    for i, size in enumerate([(40, 36), (48, 48), (36, 44)]):
        write_png(masks / f"img{i}_mask.png", size, mode="L")
    write_png(masks / "extra_mask.png", (40, 36), mode="L")
    assert run_rec(image_dir, ckpts, out, "--mask_dir", str(masks)) == 2
    err = capsys.readouterr().err
    assert "--mask_dir" in err and "4 masks for 3 images" in err and str(masks / "extra_mask.png") in err
    (masks / "img1_mask.png").unlink()
    assert run_rec(image_dir, ckpts, out, "--mask_dir", str(masks)) == 2
    err = capsys.readouterr().err
    assert str(masks / "extra_mask.png") in err and str(masks / "img1_mask.png") in err
    assert not out.exists()


def test_folder_flags_are_named_in_errors(image_dir, ckpts, tmp_path, capsys):
    """A file or a missing path where a folder is expected: exit 2, the flag's name in the message, no report."""
    a_file, gone, out = image_dir / "img0.png", tmp_path / "gone", tmp_path / "out"
    assert run_rec(a_file, ckpts, out) == 2
    assert f"--images {a_file}: not a folder" in capsys.readouterr().err
    assert run_rec(gone, ckpts, out) == 2
    assert f"--images {gone}: not found" in capsys.readouterr().err
    assert run_rec(image_dir, ckpts, out, "--mask_dir", str(a_file)) == 2
    assert f"--mask_dir {a_file}: not a folder" in capsys.readouterr().err

    def results(indir, preds):
        return evaluate.main(["results", "--indir", str(indir), "--predictions", f"x={preds}", "--outdir", str(out),
                              "--quiet"])

    assert results(a_file, image_dir) == 2
    assert f"--indir {a_file}: not a folder" in capsys.readouterr().err
    indir = tmp_path / "in"
    indir.mkdir()
    write_png(indir / "a.png", (64, 64))
    write_png(indir / "a_mask.png", (64, 64), mode="L")
    assert results(indir, a_file) == 2
    err = capsys.readouterr().err
    assert f"--predictions {a_file}: not a folder" in err and "root:" not in err
    assert not out.exists()


def test_repeated_decoder_or_prediction_names_are_refused(image_dir, ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_rec(image_dir, ckpts, out, "--decoder", f"asym={TINY}:{ckpts['asym']}") == 2
    assert "--decoder: name(s) asym given more than once" in capsys.readouterr().err
    indir, preds = results_folders(tmp_path)
    assert evaluate.main(["results", "--indir", str(indir), "--predictions", f"x={preds}", "--predictions",
                          f"x={indir}", "--outdir", str(out), "--quiet"]) == 2
    assert "--predictions: name(s) x given more than once" in capsys.readouterr().err
    assert not out.exists()


def results_folders(tmp_path, n=2):
    indir, preds = tmp_path / "in", tmp_path / "pred"
    indir.mkdir(), preds.mkdir()
    for i in range(n):
        write_png(indir / f"p{i}.png", (64, 64), seed=i)
        write_png(indir / f"p{i}_mask.png", (64, 64), mode="L")
        write_png(preds / f"p{i}.png", (64, 64), seed=i + 10)
    return indir, preds


def test_rerun_never_leaves_a_stale_figure_and_writes_metrics_json_last(tmp_path, monkeypatch):
    import os

    indir, preds = results_folders(tmp_path)
    out = tmp_path / "out"
    real_replace, written = os.replace, []

    def recording_replace(src, dst):
        # when a file lands, an earlier run's metrics.json must already be gone unless it is the one landing
        written.append((Path(dst).name, (out / "metrics.json").exists()))
        return real_replace(src, dst)

    def run(*extra):
        return evaluate.main(["results", "--indir", str(indir), "--predictions", f"x={preds}", "--outdir", str(out),
                              "--quiet", *extra])

    assert run() == 0 and (out / "examples.png").exists() and (out / "boundary.png").exists()
    monkeypatch.setattr(os, "replace", recording_replace)
    assert run("--n_examples", "1") == 0
    assert written == [("examples.png", False), ("boundary.png", False), ("metrics.md", False),
                       ("metrics.json", False)]
    written.clear()
    assert run("--n_examples", "0") == 0
    # the earlier figures are not left next to the new numbers
    assert not (out / "examples.png").exists() and not (out / "boundary.png").exists()
    assert written == [("metrics.md", False), ("metrics.json", False)]
    assert json.loads((out / "metrics.json").read_text())["complete"] is True


def test_report_folder_inside_the_input_folder_is_refused(image_dir, ckpts, capsys):
    """examples.png in (or under) --images would be scored as an image by the next run (the folder is scanned
    recursively)."""
    before = sorted(p.name for p in image_dir.rglob("*"))
    assert run_rec(image_dir, ckpts, image_dir / "eval") == 2
    err = capsys.readouterr().err
    assert "--outdir" in err and "--images" in err
    assert sorted(p.name for p in image_dir.rglob("*")) == before


# ------------------------------------------------------------------------------------------------ baselines, edge
def test_mask_name_is_one_rule_in_any_case():
    from ldm.image_io import mask_name

    assert mask_name("a/cat_mask.png") == "cat" and mask_name("cat_MASK.PNG") == "cat"
    assert mask_name("cat_Mask.jpeg") == "cat" and mask_name("Cat_mask.webp") == "Cat"
    assert mask_name("cat.png") is None and mask_name("cat_mask.txt") is None and mask_name("catmask.png") is None


def test_coarsen_mask_is_the_block_majority_upsampled():
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(rng.random((1, 1, 10, 13)) > 0.6).float()
    got = coarsen_mask(mask, 4)[0, 0].numpy()
    m = np.pad(mask[0, 0].numpy(), ((0, 2), (0, 3)), mode="edge")  # 12 x 16: whole 4 x 4 cells
    cells = m.reshape(3, 4, 4, 4).mean(axis=(1, 3)) >= 0.5
    np.testing.assert_array_equal(got, np.kron(cells, np.ones((4, 4)))[:10, :13])
    assert torch.equal(coarsen_mask(mask, 1), mask)


@pytest.mark.slow
def test_reconstruction_baselines_and_robustness_rows(image_dir, ckpts, tmp_path):
    """--baselines, --mask_coarsen and --extra_size rows, end to end: X+paste keeps the kept region exactly and
    leaves the generated one as X made it; X[mask/4] is X evaluated with the coarsened masks; NAME_mask files of any
    case are masks, in --images (skipped) and in --mask_dir (read)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i, size in enumerate([(40, 36), (48, 48)]):
        (images / f"img{i}.png").write_bytes((image_dir / f"img{i}.png").read_bytes())
        write_png(masks / f"img{i}{'_MASK.PNG' if i else '_Mask.png'}", size, mode="L")
    write_png(images / "img0_MASK.png", (40, 36), mode="L")  # a mask next to the images: not an image
    out = tmp_path / "out"
    assert evaluate.main(["reconstruction", "--images", str(images), "--mask_dir", str(masks), "--size", "32",
                          "--outdir", str(out), "--decoder", f"asym={TINY}:{ckpts['asym']}", "--quiet",
                          "--baselines", "paste,a1111", "--mask_coarsen", "4", "--extra_size", "40",
                          "--band_px", "3"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    rows = report["decoders"]
    assert report["images"] == ["img0", "img1"]
    assert list(rows) == [f"asym{c}{b}" for c in ("", "[mask/4]", "[40px]") for b in ("", "+paste", "+a1111")]
    for cond, size in (("", 32), ("[mask/4]", 32), ("[40px]", 40)):
        x, paste, blur = (rows[f"asym{cond}{b}"] for b in ("", "+paste", "+a1111"))
        assert x["size"] == paste["size"] == size and x["baseline"] is None and blur["blur_px"] == 4.0
        assert math.isclose(x["pre_error_sum"], x["pre_error"] * 3 * size * size, rel_tol=1e-6)
        assert paste["pre_error"] == 0 and paste["psnr_kept"] == "inf" and paste["psnr_band_outer"] == "inf"
        for key in ("mse_generated", "mse_band_inner"):  # a hard paste changes no generated pixel
            assert paste[key] == x[key]
        assert 0 < blur["pre_error"] <= x["pre_error"]  # the blurred mask mixes some of X into kept pixels
        for r in (x, paste, blur):
            assert r["seam_error"] > 0 and r["n_images"] == 2 and "lpips" in r["missing"]
    # the [mask/4] rows are X decoded and scored with the coarsened masks
    opt = evaluate.parse_args(["reconstruction", "--images", str(images), "--mask_dir", str(masks), "--size", "32",
                               "--outdir", "x", "--decoder", f"a={TINY}:{ckpts['asym']}"])
    coarse = evaluate.condition_samples(evaluate.reconstruction_sources(opt), evaluate.Condition("", 32, 4), opt)
    image, mask = torch.stack([s.image for s in coarse]), torch.stack([s.mask for s in coarse])
    fine = torch.stack([s.mask for s in evaluate.reconstruction_samples(opt)])
    assert torch.equal(mask, coarsen_mask(fine, 4))
    model = make_autoencoder(condition=True, num_res_blocks=2)
    with torch.no_grad():
        pred = quantize(metrics.to_unit(model.decode(model.encode(image * 2 - 1).mode(), image * 2 - 1, mask)))
    seam = metrics.seam_error(pred, image, mask).mean().item()
    assert math.isclose(rows["asym[mask/4]"]["seam_error"], seam, rel_tol=1e-4)
    table = (out / "metrics.md").read_text()
    assert "| asym[mask/4]+paste | 2 | 0.00 | 0 | inf |" in table and "seam_error (x1e-3)" in table
    assert "Best per column (32 px, masks coarsened 4x): pre_error: asym[mask/4]+paste;" in table
    figure = Image.open(out / "boundary.png")  # label column + output and error tiles; original + 3 rows
    assert figure.size == (150 + 2 * 128 + 4, 4 * (128 + 4))


def _smooth_image(seed, size):
    """(size, size, 3) uint8 with values in [30, 200] (so that +20 never clips) and edges of its own."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    channels = [np.sin(xx / 5 + seed + c) * np.cos(yy / 7 - c) for c in range(3)]
    base = 115 + 80 * np.stack(channels, -1) + rng.normal(0, 3, (size, size, 3))
    return np.clip(np.round(base), 30, 200).astype(np.uint8)


def test_results_baselines_and_boundary_metrics_match_numpy(tmp_path):
    """results mode on files written here: every row's numbers against the numpy references of test_metrics, a step
    of 20 levels added in the hole is a seam of 20/255 that pasting back keeps, and an output that has the image's
    own edges is no seam."""
    from scipy.ndimage import gaussian_filter1d

    from tests.test_metrics import _overlay_reference, _reference_band_mse, _reference_seam

    indir, same, step, noisy = (tmp_path / n for n in ("in", "same", "step", "noisy"))
    for d in (indir, same, step, noisy):
        d.mkdir()
    originals, masks, preds = [], [], {"same": [], "step": [], "noisy": []}
    rng = np.random.default_rng(5)
    for i in range(2):
        img = _smooth_image(i, 64)
        mask = np.zeros((64, 64), np.uint8)
        mask[10 + 5 * i:40, 12:50 - 6 * i] = 255
        Image.fromarray(img).save(indir / f"p{i}.png")
        Image.fromarray(mask).save(indir / f"p{i}_MASK.png")  # any case of the suffix is a mask
        stepped = img.astype(np.int16) + 20 * (mask[..., None] > 0)
        out = {"same": img, "step": stepped.astype(np.uint8), "noisy": rng.integers(0, 256, img.shape, np.uint8)}
        for k, v in out.items():
            Image.fromarray(v).save(tmp_path / k / f"p{i}.png")
            preds[k].append(v.astype(np.float64) / 255)
        originals.append(img.astype(np.float64) / 255)
        masks.append(mask.astype(np.float64) / 255)
    out = tmp_path / "out"
    assert evaluate.main(["results", "--indir", str(indir), "--outdir", str(out), "--quiet", "--no_fid",
                          "--no_lpips", "--baselines", "paste,a1111", "--blur_px", "2", "--band_px", "3",
                          *[f"--predictions={k}={tmp_path / k}" for k in preds]]) == 0
    rows = json.loads((out / "metrics.json").read_text())["decoders"]
    x, m = np.stack(originals), np.stack(masks)
    radius = int(2.5 * 2 + 0.5)
    soft = gaussian_filter1d(gaussian_filter1d(m, 2.0, axis=2, mode="mirror", radius=radius), 2.0, axis=1,
                             mode="mirror", radius=radius)
    alpha = (np.round(soft * 255) / 255)[..., None]
    # a1111 is symmetric: under the mask its source is the other image of the set (two images: each the other's)
    source = x * (1 - m[..., None]) + x[::-1] * m[..., None]
    for k, p in preds.items():
        p = np.stack(p)
        u8 = lambda a: np.round(a * 255).astype(np.uint8)  # noqa: E731
        outputs = {k: p, f"{k}+paste": _overlay_reference(u8(p), u8(x), u8(m)),
                   f"{k}+a1111": np.round((source * (1 - alpha) + p * alpha) * 255) / 255}
        for row, o in outputs.items():
            r = rows[row]
            kept = (m < 0.5)[..., None]
            pe = (((o - x) * kept) ** 2).reshape(2, -1).sum(1) / (3 * 64 * 64)
            assert r["pre_error"] == pytest.approx(pe.mean(), rel=1e-5, abs=1e-12)
            for side in ("inner", "outer"):
                mse = _reference_band_mse(o, x, m, 3, side).mean()
                assert float(r[f"mse_band_{side}"]) == pytest.approx(mse, rel=1e-5, abs=1e-12)
            assert r["seam_error"] == pytest.approx(_reference_seam(o, x, m).mean(), rel=1e-5, abs=1e-9)
    assert rows["same"]["seam_error"] == 0 and rows["same+paste"]["seam_error"] == 0  # the image's own edges
    assert rows["step"]["seam_error"] == pytest.approx(20 / 255, rel=1e-5)
    assert rows["step+paste"]["seam_error"] == pytest.approx(20 / 255, rel=1e-5)  # pasting back keeps the step
    assert rows["step+paste"]["psnr_kept"] == "inf"
    assert rows["step+a1111"]["other_content"].startswith("another image of the set")


def test_each_mode_refuses_the_flags_of_the_other(capsys):
    base = {"results": ["results", "--indir", "i", "--predictions", "a=b", "--outdir", "o"],
            "reconstruction": ["reconstruction", "--images", "i", "--decoder", "a=c.yaml:k", "--outdir", "o"]}
    for mode, flag in (("results", "--fast"), ("results", "--seed=3"), ("results", "--mask_coarsen"),
                       ("reconstruction", "--indir"), ("reconstruction", "--max_size")):
        with pytest.raises(SystemExit):
            evaluate.parse_args(base[mode] + [flag, "4"] if "=" not in flag else base[mode] + [flag])
        err = capsys.readouterr().err
        other = "reconstruction" if mode == "results" else "results"
        assert f"{flag.split('=')[0]} is a flag of `evaluate.py {other}`, not of `{mode}`" in err
        assert evaluate.MODE_PURPOSE[mode] in err
    for extra, needle in ((["--baselines", "paste,crop"], "comma-separated list of paste, a1111"),
                          (["--blur_px", "0"], "--blur_px 0.0"), (["--band_px", "0"], "--band_px 0"),
                          (["--limit", "-1"], "--limit -1: must be >= 0"),
                          (["--bogus"], "unrecognized arguments: --bogus")):
        with pytest.raises(SystemExit):
            evaluate.parse_args(base["results"] + extra)
        assert needle in capsys.readouterr().err
    for extra, needle in ((["--mask_coarsen", "1"], "--mask_coarsen [1]"), (["--extra_size", "256"], "must differ"),
                          (["--extra_size", "44"], "--size/--extra_size 44")):
        with pytest.raises(SystemExit):
            evaluate.parse_args(base["reconstruction"] + extra)
        assert needle in capsys.readouterr().err
    opt = evaluate.parse_args(base["results"] + ["--baselines", "paste_blur,paste,paste"])  # the old name of a1111
    assert opt.baselines == ("a1111", "paste") and not hasattr(opt, "seed") and not hasattr(opt, "fast")
    assert evaluate.parse_args(base["results"] + ["--baselines", "fooocus,all"]).baselines == \
        ("fooocus",) + tuple(r for r in metrics.RECIPES if r != "fooocus")


def test_row_names_that_would_collide_are_refused(tmp_path, capsys):
    indir, preds = results_folders(tmp_path)
    out = tmp_path / "out"
    assert evaluate.main(["results", "--indir", str(indir), "--predictions", f"x={preds}", "--predictions",
                          f"x+paste={preds}", "--outdir", str(out), "--quiet", "--baselines", "paste"]) == 2
    assert "the report rows x+paste would each come from two names" in capsys.readouterr().err
    assert not out.exists()
