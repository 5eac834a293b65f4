"""The embedded demo (`make demo`) end to end with two training steps per stage: the pipeline, not the effect
(the effect needs the full step counts; docs/demo.md states the numbers of a full run)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from ldm.checkpoints.keys import read_state_dict
from scripts import demo


@pytest.mark.slow
def test_demo_runs_both_stages_and_writes_report_and_figure(tmp_path, capsys, monkeypatch):
    # one mask per held-out photo, not four: the evaluation of every row and condition at a quarter of the cost
    monkeypatch.setattr(demo, "MASKS_PER_PHOTO", 1)
    assert demo.main(["--out", str(tmp_path), "--stage1-steps", "2", "--stage2-steps", "2", "--precision", "32"]) == 0
    out = capsys.readouterr().out
    assert "| vanilla+paste |" in out and "seam_error" in out and "asymmetric against vanilla+paste" in out

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"rows", "verdict", "robustness", "run"}
    assert tuple(report["rows"]) == demo.ROWS
    heldout = sorted((tmp_path / "data" / "heldout").glob("*.png"))
    assert [p.stem for p in heldout] == sorted(demo.HELDOUT_PHOTOS)
    sizes = {Image.open(p).size for p in heldout}
    assert all(min(s) >= 128 and s[0] % 8 == 0 and s[1] % 8 == 0 for s in sizes), sizes
    columns = [key for key, *_ in demo.COLUMNS]
    for name, row in report["rows"].items():
        assert row["n_images"] == len(heldout) * demo.MASKS_PER_PHOTO, name
        for key in columns:
            # the recipes that put the input back where mask = 0 (paste, and after their own step colormatch and
            # poisson): exact after 8 bits
            exact = name in ("asymmetric+paste", *(f"vanilla+{r}" for r in ("paste", "colormatch", "poisson")))
            if exact and key in ("psnr_kept", "psnr_band_outer"):
                assert row[key] == "inf", (name, key, row[key])  # the input pasted back: exact after 8 bits
            else:
                assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row[key])
    assert report["rows"]["vanilla+paste"]["pre_error"] == 0
    # 95 % paired intervals: every row against vanilla, asymmetric+paste against every blend at the seam
    ci = report["rows"]["asymmetric"]["seam_error_ci"]
    assert ci["low"] <= ci["diff"] <= ci["high"] and ci["n"] == len(heldout) * demo.MASKS_PER_PHOTO
    assert {f"seam_error_vs_vanilla+{r}_ci" for r in demo.BASELINES} <= set(report["rows"]["asymmetric+paste"])
    # paste-back leaves the generated region of the vanilla output alone (the blur reaches past the edge)
    for model in ("vanilla", "asymmetric"):
        assert report["rows"][f"{model}+paste"]["psnr_generated"] == report["rows"][model]["psnr_generated"]
    assert report["rows"]["asymmetric+paste"]["pre_error"] == 0
    assert len(report["verdict"]) == len(demo.WHERE) + 2 and report["verdict"][-1].startswith("asymmetric+paste")
    # the robustness rows: the same photos and mask draws, coarsened or at another size; paste-back stays exact
    assert list(report["robustness"]) == [label for label, _, _ in demo.ROBUSTNESS]
    for label, rows in report["robustness"].items():
        assert tuple(rows) == demo.ROBUST_ROWS, label
        assert all(row["n_images"] == len(heldout) * demo.MASKS_PER_PHOTO for row in rows.values()), label
        assert rows["vanilla+paste"]["psnr_kept"] == "inf", label
    assert "| masks drawn 8x coarser | asymmetric |" in out
    run = report["run"]
    assert run["steps"] == {"stage1": 2, "stage2": 2} and run["precision"] == "32"
    wall = run["wall_time_s"]
    assert set(wall) == {"data", "stage1", "stage2", "evaluation", "total"}
    assert all(wall[k] > 0 for k in wall) and wall["total"] >= wall["stage1"] + wall["stage2"]

    figure = np.asarray(Image.open(tmp_path / "comparison.png"))
    (w, h), = sizes
    assert figure.ndim == 3 and figure.shape[1] == (len(demo.FIGURE_ROWS) + 1) * (w + demo.GAP) - demo.GAP
    assert figure.shape[0] > len(demo.HELDOUT_PHOTOS) * 3 * h  # outputs, error maps and zooms per photo

    (stage1,) = (tmp_path / "logs").glob("*_demo_vanilla")
    (stage2,) = (tmp_path / "logs").glob("*_demo_asymmetric")
    sd1 = read_state_dict(stage1 / "checkpoints" / "last.ckpt")
    sd2 = read_state_dict(stage2 / "checkpoints" / "last.ckpt")
    assert not any(k.startswith("decoder.encoder.") for k in sd1)
    assert any(k.startswith("decoder.encoder.") for k in sd2)
    # stage 2 trains on the frozen stage-1 encoder: it leaves the run bit-identical
    frozen = [k for k in sd1 if k.startswith(("encoder.", "quant_conv.", "post_quant_conv."))]
    assert frozen and all(sd1[k].equal(sd2[k]) for k in frozen)


def test_edge_window_is_centred_on_the_mask_edge_nearest_the_centre():
    import torch

    mask = torch.zeros(1, 40, 60)
    mask[:, :, 45:] = 1  # a vertical edge between columns 44 and 45
    y0, x0 = demo.edge_window(mask, 10, 16)
    assert (y0, x0) == (15, 36)  # centred on the edge pixel (20, 44), of the two sides the one nearer the centre
    assert demo.edge_window(torch.ones(1, 40, 60), 10, 16) == (15, 22)  # no edge: the centre


def test_robustness_masks_are_the_main_draws_coarsened():
    import torch

    from ldm.modules.mask_edges import coarsen_mask

    rgb = np.random.default_rng(0).random((64, 96, 3), dtype=np.float32)
    config = "configs/autoencoder/random_thick_256.yaml"
    x, mask, names = demo.heldout_batch([("photo", rgb)], config)
    x8, mask8, _ = demo.heldout_batch([("photo", rgb)], config, coarsen=8)
    assert x.shape == (demo.MASKS_PER_PHOTO, 3, 64, 96) and torch.equal(x, x8)
    assert names == [f"photo mask {k}" for k in range(demo.MASKS_PER_PHOTO)]
    assert torch.equal(mask8, coarsen_mask(mask, 8)) and not torch.equal(mask8, mask)


def test_decodes_without_the_mask_are_reused_across_mask_sets_exactly():
    # the robustness rows score the main images' vanilla outputs and latents again under coarsened masks
    import torch

    from ldm.modules.mask_edges import coarsen_mask
    from tests.conftest import make_autoencoder

    vanilla, asymmetric = make_autoencoder(condition=False, seed=0), make_autoencoder(condition=True, seed=1)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(2, 1, 16, 24)
    mask[0, :, 3:11, 5:17] = 1
    mask[1, :, 6:16, 2:9] = 1
    coarse = coarsen_mask(mask, 4)
    unmasked = demo.decode_unmasked(vanilla, asymmetric, x)
    fresh, _ = demo.evaluate(vanilla, asymmetric, x, coarse)
    reused, _ = demo.evaluate(vanilla, asymmetric, x, coarse, unmasked=unmasked)
    assert fresh == reused and tuple(fresh) == demo.ROWS
    assert fresh != demo.evaluate(vanilla, asymmetric, x, mask, unmasked=unmasked)[0]
