"""The Python parts of ``scripts/gpu_check.sh``: training data and configs for its main.py runs, a step timer
callback, and the report.

    python scripts/gpu_check.py prepare --work DIR [--cpu-smoke]      # shards + configs (+ a VGG16-shaped file)
    python scripts/gpu_check.py report --work DIR [--out docs/reports]  # DIR's results -> gpu_check_<device>.md

``prepare`` writes webdataset shards of synthetic JPEGs and ``DIR/train.yaml``: the base recipe
(``configs/autoencoder/autoencoder_kl_32x32x4_train.yaml``) at 256 px reading those shards, with random starting
weights (no ``stable_vqgan.ckpt`` needed), the discriminator on from step 0 (the full step) and LPIPS on a
VGG16-shaped file of random weights (``DIR/vgg16.pth``: the cost of the real one, no download). ``--cpu-smoke``:
the tiny decoder at 32 px without LPIPS, for a check of the script on a CPU.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

import pytorch_lightning as pl

from ldm.project import load_yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = "configs/autoencoder/autoencoder_kl_32x32x4_train.yaml"
TINY_CONFIG = "configs/tiny/autoencoder_kl_tiny.yaml"


class StepTimer(pl.Callback):
    """Writes the median wall time of the training steps after ``skip`` warm-up steps (compilation, cuDNN
    autotuning) to ``path`` as JSON when training ends."""

    def __init__(self, path: str, skip: int = 20):
        self.path, self.skip = Path(path), int(skip)
        self.stamps: List[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.strategy.root_device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])][self.skip:]
        batch = trainer.train_dataloader.batch_size if trainer.train_dataloader is not None else None
        result = {"steps_timed": len(steps), "skipped": self.skip, "batch": batch,
                  "median_ms": statistics.median(steps) * 1e3 if steps else None,
                  "precision": str(trainer.precision)}
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(result, indent=2) + "\n")


def prepare(work: Path, smoke: bool) -> None:
    import numpy as np
    import torch
    import webdataset as wds
    from omegaconf import OmegaConf
    from PIL import Image

    work.mkdir(parents=True, exist_ok=True)
    side, n, size = (48, 32, 32) if smoke else (384, 256, 256)
    rng = np.random.default_rng(0)
    (work / "shards").mkdir(exist_ok=True)
    for s in range(0, n, 32):
        with wds.TarWriter(str(work / "shards" / f"{s // 32:05d}.tar")) as sink:
            for i in range(s, s + 32):
                small = Image.fromarray(rng.integers(0, 256, (side // 16, side // 12, 3), dtype=np.uint8))
                buf = io.BytesIO()
                small.resize((side * 4 // 3, side), Image.BILINEAR).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": "synthetic"})
    config = load_yaml(REPO / TRAIN_CONFIG)
    config.model.params.ckpt_path = None
    config.model.params.lossconfig.params.disc_start = 0
    if smoke:
        config.model.params.ddconfig = load_yaml(REPO / TINY_CONFIG).model.params.ddconfig
        config.model.params.lossconfig.params.perceptual_weight = 0
        config.data.params.batch_size = 2
        config.data.params.num_workers = 1
    else:
        import torchvision

        torch.manual_seed(0)
        torch.save(torchvision.models.vgg16().state_dict(), work / "vgg16.pth")
        config.model.params.lossconfig.params.vgg_path = str(work / "vgg16.pth")
    steps = 300  # more than any run takes: one epoch, so no epoch-end checkpoint inside the timed steps
    shards = {"target": "ldm.data.shards.WebDatasetInpainting",
              "params": {"urls": str(work / "shards" / f"{{00000..{(n - 1) // 32:05d}}}.tar"),
                         "epoch_size": steps * int(config.data.params.batch_size), "size": size,
                         "shuffle_buffer": 64, "mask_config": "configs/autoencoder/random_thick_256.yaml"}}
    config.data.params.train = shards
    config.data.params.pop("validation")
    config.lightning.modelcheckpoint.params.every_n_train_steps = 0
    config.lightning.periodic_checkpoints = {"keep": 0}
    OmegaConf.save(config, work / "train.yaml")
    print(work / "train.yaml")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run)"


def report(work: Path, out: Optional[Path]) -> Path:
    """``work``'s stage log, benchmark tables and main.py timings -> one markdown report."""
    name = device_name()
    stages = [line.split() for line in (work / "stages.txt").read_text().splitlines() if line.strip()] \
        if (work / "stages.txt").is_file() else []
    lines = [f"# GPU check on {name}", "", f"Written by `bash scripts/gpu_check.sh` on {time.strftime('%Y-%m-%d')}."
             " Random weights throughout (speed and memory do not depend on them).", "", "## Stages", "",
             "| stage | exit status | seconds |", "|---|---|---|"]
    for stage in stages:
        status = {"0": "ok", "124": "timed out"}.get(stage[1], stage[1])
        lines.append(f"| {stage[0]} | {status} | {stage[2]} |")
    timings = {k: json.loads((work / f"{k}.json").read_text()) for k in ("plain", "fast")
               if (work / f"{k}.json").is_file()}
    if timings:
        lines += ["", "## main.py, base recipe at 256 px from shards", "",
                  f"Median step after the first {next(iter(timings.values()))['skipped']} (compilation and "
                  "autotuning); the discriminator on from step 0. "
                  "The original two-forward step is the `original` row of the training-step table below "
                  "(same harness as `ours`).", "", "| run | precision | batch | steps timed | median ms/step | "
                  "images/s | vs main.py |", "|---|---|---|---|---|---|---|"]
        plain = timings.get("plain", {}).get("median_ms")
        for key, t in timings.items():
            ms = t["median_ms"]
            ips = t["batch"] / ms * 1e3 if ms and t["batch"] else None
            ratio = plain / ms if ms and plain else None
            lines.append(f"| main.py{' --fast' if key == 'fast' else ''} | {t['precision']} | {t['batch']} | "
                         f"{t['steps_timed']} | {ms and f'{ms:.1f}'} | {ips and f'{ips:.1f}'} | "
                         f"{ratio and f'{ratio:.2f}x'} |")
    for part, title in (("decode_base", "Decode: base"), ("decode_large2", "Decode: large2"),
                        ("compiled", "Decode, eager path compiled (both implementations)"),
                        ("scale", "Training step, memory, loaders")):
        md = work / f"{part}.md"
        if md.is_file():
            lines += ["", f"## {title}", "", md.read_text().strip()]
    ddp = work / "ddp.log"
    if ddp.is_file():
        tail = [ln for ln in ddp.read_text().splitlines() if "max_steps" in ln or "Error" in ln][-3:]
        lines += ["", "## DDP on the device", "", "main.py from the shards with Lightning's DDP strategy "
                  "(one process on the device: its process group (NCCL on a GPU), the DDP-wrapped model, the shard "
                  "loader's rank split):", "", "```text", *tail, "```"]
    text = "\n".join(lines) + "\n"
    path = (out if out is not None else work) / f"gpu_check_{_slug(name)}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare", help="shards and the training config for the main.py runs")
    a.add_argument("--work", required=True, type=Path)
    a.add_argument("--cpu-smoke", action="store_true", help="tiny sizes for a CPU check of the script")
    b = sub.add_parser("report", help="assemble the report")
    b.add_argument("--work", required=True, type=Path)
    b.add_argument("--out", type=Path, default=None, help="folder of the report (default: --work)")
    opt = p.parse_args(argv)
    if opt.command == "prepare":
        prepare(opt.work, opt.cpu_smoke)
    else:
        report(opt.work, opt.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
