"""scripts/benchmark.py: the quick mode runs every path (ours and diffusers, eager and fast, tiled, the attention
call, the training step) on the tiny config and writes its report; FLOP counts equal a hand count. No timing
assertions: numbers go to the report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts import benchmark


@pytest.mark.slow
def test_quick_mode_writes_a_complete_report(tmp_path):
    out = tmp_path / "bench_v1.5"  # a dot in the name is kept (with_suffix would write bench_v1.json)
    assert benchmark.main(["--quick", "--in_process", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_v1.5.json", "bench_v1.5.md"]
    out = tmp_path / "bench_v1.5.json"
    report = json.loads(out.read_text())
    results = report["results"]
    assert not [r for r in results if "error" in r]
    kinds = {(r["impl"], r["path"], r["kind"], r["condition"], r["size"], r["tiled"]) for r in results}
    for path in ("eager", "fast"):
        assert ("diffusers", path, "decode", True, 64, False) in kinds
        assert ("ours", path, "decode", True, 64, False) in kinds
    assert {("ours", "eager", "decode", c, 128, t) for c in (True, False) for t in (True, False)} <= kinds
    assert {("ours", "eager", "train_step", True, 32, False), ("original", "eager", "train_step", True, 32, False),
            ("ours", "fast", "train_step", True, 32, False), ("ours", "eager", "attention", True, 64, False)} <= kinds
    assert len(results) == 16 + 4 + 1 + 3
    assert all(r["latency_ms"] > 0 and len(r["times_ms"]) == 1 for r in results)
    assert all(r["gflop"] > r["attention_gflop"] > 0 for r in results if r["kind"] == "decode")
    # the tiling comparison rows time their attention blocks: a part of the latency
    tiling_rows = [r for r in results if r["kind"] == "decode" and r["size"] == 128]
    assert len(tiling_rows) == 4 and all(0 < r["attention_ms"] < r["latency_ms"] for r in tiling_rows)
    # the fast rows of ours carry their distance to our float32 output
    assert all(r["psnr_db"] >= 40 for r in results
               if r["impl"] == "ours" and r["path"] == "fast" and r["kind"] == "decode")
    attention = next(r for r in results if r["kind"] == "attention")
    assert "math" not in attention["kernel"] and attention["tokens"] == 32 * 32
    # the training step: every phase of main.py's step, and the original's second forward
    steps = {(r["impl"], r["path"]): r for r in results if r["kind"] == "train_step"}
    phases = {"decoder forward", "generator loss", "generator backward", "generator Adam", "discriminator loss",
              "discriminator backward", "discriminator Adam"}
    assert set(steps["ours", "eager"]["phases_ms"]) == phases
    assert set(steps["original", "eager"]["phases_ms"]) == phases | {"second forward"}
    assert all(r["images_per_s"] > 0 for r in steps.values()) and "fused Adam" in steps["ours", "fast"]["settings"]
    assert "LPIPS" in steps["ours", "eager"]["lpips"] or "VGG16" in steps["ours", "eager"]["lpips"]
    assert report["matmul"]["tflops"] > 0 and report["machine"]["torch"] == torch.__version__
    table = (tmp_path / "bench_v1.5.md").read_text()
    for section in ("### Decode", "### Tiled decoding", "### One attention call", "### Training step"):
        assert section in table
    assert ("No GPU in this run" in table) == ("gpu" not in report["machine"])
    # decode rows (ours and diffusers side by side, untiled 128 too), tiled rows, attention, training steps
    assert table.count("\n| tiny |") == 8 + 2 + 2 + 1 + 3
    assert benchmark.TRAIN_STEP_NOTE in table


def test_help_says_what_the_training_step_measures(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the whole step as main.py runs it" in text and "--suite" in text


def test_cpu_suite_covers_the_issue_comparisons():
    """--suite cpu: base at 512 on the eager, fast and fast_fp32 paths against diffusers; tiling at 1024 and 2048
    against untiled; the attention call; the training step of base, large and large2 (ours, original, fast)."""
    cases = benchmark.plan(benchmark.parse_args(["--suite", "cpu"]))
    decode = {(c["impl"], c["path"]) for c in cases if c["kind"] == "decode" and c["size"] == 512}
    assert decode == {(i, p) for i in ("ours", "diffusers") for p in ("eager", "fast", "fast_fp32")}
    assert {(c["size"], c["tiled"]) for c in cases if c["variant"] == "narrow"} == {
        (s, t) for s in (1024, 2048) for t in (True, False)}
    assert {(c["variant"], c["impl"], c["path"]) for c in cases if c["kind"] == "train_step"} == {
        (v, i, p) for v in ("base", "large", "large2") for i, p in (("ours", "eager"), ("original", "eager"),
                                                                    ("ours", "fast"))}


@pytest.mark.slow
def test_cpu_case_in_a_subprocess_reports_peak_memory():
    case = dict(variant="tiny", impl="ours", path="eager", condition=True, size=64, tiled=False, kind="decode")
    opt = dict(device="cpu", batch=1, dtype="fp32", channels_last=True, compile=False, warmup=0, repeats=1,
               tile=64, tile_overlap=16, threads=1, psnr=False)
    result = benchmark.run_case_subprocess(case, opt, timeout=300)
    assert "error" not in result, result.get("error")
    # at least the 3x64x64 float32 output plus the 32-channel full-resolution activations
    assert result["peak_mib"] > 32 * 64 * 64 * 4 / 2 ** 20


def test_flop_count_equals_a_hand_count():
    """Convolutions (2 * out elements * in/groups * k*k) plus the mid attention's projections (4 * 2*T*C*C) and its
    two attention matmuls (2 * 2*T*T*C); the attention part is also returned alone."""
    model = benchmark.build_model("tiny")
    z, image, mask = benchmark.make_inputs(32, model.downsample_factor, 1, "cpu")
    counts = []

    def hook(module, inputs, output):
        counts.append(2 * output.numel() * module.in_channels // module.groups * module.kernel_size[0]
                      * module.kernel_size[1])

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.decoder(model.post_quant_conv(z), image, mask)
    tokens, channels = z.shape[-1] * z.shape[-2], model.decoder.mid.attn_1.q.in_channels
    # the mid attention: its four 1x1 projections run as matmuls (no conv hook fires), then q k^T and (.) v
    attention = 4 * (2 * tokens * channels * channels) + 2 * (2 * tokens * tokens * channels)
    assert benchmark.count_flops("tiny", 32, 1, True, None, 0) == (sum(counts) + attention, attention)


def test_report_paths_keep_dots_in_the_name(tmp_path):
    assert benchmark.report_paths(str(tmp_path / "bench_v1.5")) == (tmp_path / "bench_v1.5.json",
                                                                     tmp_path / "bench_v1.5.md")
    for given in ("docs/benchmark_cpu", "docs/benchmark_cpu.json", "docs/benchmark_cpu.md"):
        assert benchmark.report_paths(given) == (Path("docs/benchmark_cpu.json"), Path("docs/benchmark_cpu.md"))
    # generated reports have a folder of their own, found from any working folder
    assert benchmark.parse_args(["--suite", "cpu"]).out == str(benchmark.REPO / "docs/reports/benchmark_cpu")


def test_tiling_overhead_outside_attention_by_hand():
    untiled = {"latency_ms": 100.0, "attention_ms": 40.0, "gflop": 10.0, "attention_gflop": 5.0}
    tiled = {"latency_ms": 90.0, "attention_ms": 5.0, "gflop": 8.5, "attention_gflop": 0.5}
    (time_ratio, flop_ratio, overhead), share, outside = benchmark.tiling_overhead(untiled, tiled)
    assert (time_ratio, flop_ratio) == pytest.approx((0.9, 0.85)) and overhead == pytest.approx(0.9 / 0.85)
    assert share == "40 % / 50 %" and outside == pytest.approx((85 / 60) / (8 / 5))
    del untiled["attention_ms"]  # rows measured without the attention clock
    assert benchmark.tiling_overhead(untiled, tiled)[1:] == (None, None)


@pytest.mark.slow
def test_scale_quick_reports_training_memory_batches_and_loader_rates(tmp_path):
    """--suite scale_quick: the training step's peak with and without gradient checkpointing at two batches, the
    batch estimates, and images/s of the folder, shard and datasets loaders over the same images."""
    assert benchmark.main(["--suite", "scale_quick", "--in_process", "--threads", "1", "--out",
                           str(tmp_path / "scale")]) == 0
    report = json.loads((tmp_path / "scale.json").read_text())
    assert not [r for r in report["results"] if "error" in r]
    memory = [r for r in report["results"] if r["kind"] == "train_memory"]
    assert sorted((r["checkpointing"], r["batch"]) for r in memory) == [(False, 1), (False, 2), (True, 1), (True, 2)]
    assert all(r["static_mib"] > 0 and r["peak_mib"] >= 0 for r in memory)
    loaders = {r["impl"]: r for r in report["results"] if r["kind"] == "loader"}
    assert set(loaders) == {"folder", "shards", "hf"} and all(r["images"] == 32 and r["images_per_s"] > 0
                                                        for r in loaders.values())
    table = (tmp_path / "scale.md").read_text()
    assert "### Training memory and the batch that fits" in table and "### Data loader" in table
    assert "estimated from the CPU peak" in table


def test_batch_estimates_follow_the_two_measured_batches():
    rows = [{"batch": 1, "peak_mib": 3000.0, "static_mib": 2000.0}, {"batch": 2, "peak_mib": 5000.0,
                                                                     "static_mib": 2000.0}]
    # 24 GiB = 24576 MiB: 2000 held + 3000 at batch 1 + 2000 per further image -> 1 + 19576 // 2000 = 10
    assert benchmark.batch_estimates(rows, 24) == 10
    assert benchmark.batch_estimates(rows, 4) == 0  # not even batch 1 fits
    assert benchmark.batch_estimates(rows[:1], 24) is None
