"""The embedded demo (`make demo`) end to end with two training steps per stage: the pipeline, not the effect
(the effect needs the full step counts; README states the numbers of a full run)."""
from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from ldm.checkpoints.keys import read_state_dict
from scripts import demo


def test_demo_runs_both_stages_and_writes_report_and_figure(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--stage1-steps", "2", "--stage2-steps", "2", "--precision", "32"]) == 0
    out = capsys.readouterr().out
    assert "vanilla" in out and "asymmetric" in out and "pre_error" in out

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"vanilla", "asymmetric", "asymmetric, no mask", "pre_error_ratio", "run"}
    assert report["pre_error_ratio"] == report["vanilla"]["pre_error"] / report["asymmetric"]["pre_error"]
    run = report["run"]
    assert run["steps"] == {"stage1": 2, "stage2": 2} and run["precision"] == "32"
    wall = run["wall_time_s"]
    assert set(wall) == {"data", "stage1", "stage2", "evaluation", "total"}
    assert all(wall[k] > 0 for k in wall) and wall["total"] >= wall["stage1"] + wall["stage2"]
    for row in (report[k] for k in ("vanilla", "asymmetric", "asymmetric, no mask")):
        for key in ("pre_error", "psnr_kept", "psnr_generated", "mse_generated"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["n_images"] == len(list((tmp_path / "data" / "heldout").glob("*.png")))

    figure = np.asarray(Image.open(tmp_path / "comparison.png"))
    side = demo.EVAL_SIZE * demo.FIGURE_SCALE  # crops upscaled with nearest neighbours
    assert figure.ndim == 3 and figure.shape[1] == len(demo.FIGURE_COLUMNS) * (side + 6) - 6

    (stage1,) = (tmp_path / "logs").glob("*_demo_vanilla")
    (stage2,) = (tmp_path / "logs").glob("*_demo_asymmetric")
    sd1 = read_state_dict(stage1 / "checkpoints" / "last.ckpt")
    sd2 = read_state_dict(stage2 / "checkpoints" / "last.ckpt")
    assert not any(k.startswith("decoder.encoder.") for k in sd1)
    assert any(k.startswith("decoder.encoder.") for k in sd2)
    # stage 2 trains on the frozen stage-1 encoder: it leaves the run bit-identical
    frozen = [k for k in sd1 if k.startswith(("encoder.", "quant_conv.", "post_quant_conv."))]
    assert frozen and all(sd1[k].equal(sd2[k]) for k in frozen)
