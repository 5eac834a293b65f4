"""MISATO and BrushBench as evaluate.py inputs, on small fixtures written here in each benchmark's format."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldm.data.benchmarks import brushbench_items, misato_domain, misato_items, rle_decode
from ldm.image_io import InputError
from scripts import evaluate


def _brushnet_rle2mask(mask_rle, shape):
    """BrushNet's own decoder (examples/brushnet/evaluate_brushnet.py), as published."""
    starts, lengths = [np.asarray(x, dtype=int) for x in (mask_rle[0:][::2], mask_rle[1:][::2])]
    starts -= 1
    ends = starts + lengths
    binary_mask = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        binary_mask[lo:hi] = 1
    return binary_mask.reshape(shape)


def rle_encode(mask):
    """Row-major runs of a boolean mask as BrushBench stores them: start (1-based), length, ..."""
    flat = np.concatenate([[0], np.asarray(mask).ravel().astype(np.int8), [0]])
    edges = np.nonzero(np.diff(flat))[0]
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts + 1, ends - starts) for v in pair]


def _image(seed, h, w):
    yy, xx = np.mgrid[:h, :w]
    return np.clip(np.stack([128 + 90 * np.sin(xx / (7 + seed) + c) * np.cos(yy / 9) for c in range(3)], -1),
                   0, 255).astype(np.uint8)


def test_rle_is_brushnets():
    rng = np.random.default_rng(0)
    mask = (rng.random((512, 512)) > 0.7) | (np.arange(512)[:, None] > 400)
    rle = rle_encode(mask)
    assert rle[0] >= 1 and len(rle) % 2 == 0
    np.testing.assert_array_equal(rle_decode(rle), _brushnet_rle2mask(rle, (512, 512)))
    np.testing.assert_array_equal(rle_decode(rle), mask.astype(np.float32))
    assert rle_decode([1, 3], (2, 4)).tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]  # row-major, 1-based
    with pytest.raises(ValueError, match="outside"):
        rle_decode([8, 2], (2, 4))
    with pytest.raises(ValueError, match="pairs"):
        rle_decode([1, 2, 3], (2, 4))


@pytest.fixture
def misato(tmp_path):
    root = tmp_path / "MISATO" / "512"
    (root / "image").mkdir(parents=True), (root / "mask").mkdir()
    masks = {}
    for i, name in enumerate(("0003", "0600", "1999")):
        Image.fromarray(_image(i, 48, 64)).save(root / "image" / f"{name}.png")
        mask = np.zeros((48, 64), np.uint8)
        mask[8 + i * 4:30, 10:40 + i * 5] = 255
        Image.fromarray(mask).save(root / "mask" / f"{name}.png")
        masks[name] = mask > 127
    return root, masks


def test_misato_folders_are_read_in_order_and_checked(misato, tmp_path):
    root, masks = misato
    items = misato_items(root)
    assert [i.name for i in items] == ["0003", "0600", "1999"]
    assert [misato_domain(i.name) for i in items] == ["outdoor landscape", "indoor", "background"]
    assert misato_domain("1200") == "building" and misato_domain("x") is None
    (root / "mask" / "0600.png").unlink()
    with pytest.raises(InputError, match="no mask for .*0600.png"):
        misato_items(root)
    with pytest.raises(InputError, match="expected image/ and mask/"):
        misato_items(tmp_path)


def test_misato_in_reconstruction_gives_its_masks(misato):
    root, masks = misato
    opt = evaluate.parse_args(["reconstruction", "--benchmark", f"misato={root}", "--size", "0", "--outdir", "o",
                               "--decoder", "a=c.yaml:k"])
    samples = evaluate.reconstruction_samples(opt)
    assert [s.name for s in samples] == ["0003", "0600", "1999"]
    for s in samples:
        assert s.image.shape == (3, 48, 64)
        np.testing.assert_array_equal(s.mask[0].numpy() > 0.5, masks[s.name])


@pytest.fixture
def brushbench(tmp_path):
    root = tmp_path / "BrushBench"
    (root / "images" / "a").mkdir(parents=True)
    mapping, truth = {}, {}
    for i in range(2):
        key = f"{i:09d}"
        path = f"images/a/{key}.jpg"
        Image.fromarray(_image(i, 512, 512)).save(root / path, quality=95)
        inside = np.zeros((512, 512), bool)
        inside[100 + 50 * i:300, 120:380] = True
        outside = ~np.pad(np.ones((312, 312), bool), 100)
        mapping[key] = {"image": path, "inpainting_mask": rle_encode(inside), "outpainting_mask": rle_encode(outside),
                        "caption": f"caption {i}"}
        truth[key] = {"inside": inside, "outside": outside}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root, truth


def test_brushbench_reads_inside_and_outside_masks(brushbench):
    root, truth = brushbench
    for which in ("inside", "outside"):
        items = brushbench_items(root, which)
        assert [i.name for i in items] == ["000000000", "000000001"]
        for item in items:
            np.testing.assert_array_equal(item.mask > 0.5, truth[item.name][which])
    bad = json.loads((root / "mapping_file.json").read_text())
    bad["000000001"]["image"] = "images/a/missing.jpg"
    (root / "mapping_file.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="entry '000000001': image .*missing.jpg not found"):
        brushbench_items(root)


def test_brushbench_outside_in_results_mode_scores_against_numpy(brushbench, tmp_path):
    root, truth = brushbench
    preds = tmp_path / "preds"
    preds.mkdir()
    rng = np.random.default_rng(1)
    want = []
    for key in truth:
        original = np.asarray(Image.open(next((root / "images" / "a").glob(f"{key}.jpg"))), np.float64) / 255
        pred = np.clip(original + rng.normal(0, 0.02, original.shape), 0, 1)
        Image.fromarray(np.round(pred * 255).astype(np.uint8)).save(preds / f"{key}.png")
        pred = np.round(pred * 255) / 255
        kept = ~truth[key]["outside"]
        want.append(((pred - original) ** 2)[kept].mean())
    out = tmp_path / "out"
    assert evaluate.main(["results", "--benchmark", f"brushbench_outside={root}", "--predictions", f"x={preds}",
                          "--outdir", str(out), "--quiet", "--no_lpips", "--no_fid", "--n_examples", "0"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == ["000000000", "000000001"]
    assert report["decoders"]["x"]["mse_kept"] == pytest.approx(np.mean(want), rel=1e-5)


def test_benchmark_and_folder_are_one_or_the_other(capsys):
    for args in (["results", "--predictions", "a=b", "--outdir", "o"],
                 ["results", "--indir", "i", "--benchmark", "misato=m", "--predictions", "a=b", "--outdir", "o"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(args)
        assert "give one of --indir and --benchmark" in capsys.readouterr().err
    assert evaluate.main(["results", "--benchmark", "coco=x", "--predictions", "a=b", "--outdir", "o"]) == 2
    assert "unknown benchmark 'coco'" in capsys.readouterr().err
