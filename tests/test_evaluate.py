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
                                  root / f"{name}.ckpt")
            for name, condition in (("asym", True), ("vanilla", False))}


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
    assert table.count("\n| vanilla |") == 1 and table.count("\n| asym |") == 1
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

    assert run() == 0 and (out / "examples.png").exists()
    monkeypatch.setattr(os, "replace", recording_replace)
    assert run("--n_examples", "1") == 0
    assert written == [("examples.png", False), ("metrics.md", False), ("metrics.json", False)]
    written.clear()
    assert run("--n_examples", "0") == 0
    assert not (out / "examples.png").exists()  # the earlier figure is not left next to the new numbers
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
