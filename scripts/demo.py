"""The embedded demo (`make demo`): the paper's effect, end to end, on a CPU in minutes, with no downloads.

1. data: crops of the photographs bundled with scikit-image; two photos (chelsea, coffee) are held out.
2. stage 1: a small KL autoencoder (encoder + vanilla decoder) trained from scratch through main.py
   (configs/demo/autoencoder_vanilla.yaml).
3. stage 2: the asymmetric decoder (condition branch reading the masked image) trained on the frozen stage-1
   encoder, starting from the stage-1 decoder, through main.py (configs/demo/autoencoder_asymmetric.yaml).
4. evaluation on the held-out crops with fixed masks (1 = generate, 0 = keep): pre_error (squared error in the kept
   region per element, images in [0, 1]), error in the generated region, PSNR in each region; a table on stdout,
   outputs/demo/report.json and a side-by-side figure outputs/demo/comparison.png.

    python scripts/demo.py [--out outputs/demo] [--stage1-steps N] [--stage2-steps N] [--precision auto]

Wall time per step (data, stage 1, stage 2, evaluation) goes into report.json. On CPUs with bfloat16 instructions
(AVX-512 BF16 or AMX) both stages train in bfloat16 mixed precision (``--precision auto``), about 1.8x faster per
step than float32 there; elsewhere they train in float32. Evaluation is always float32.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from ldm import metrics  # noqa: E402
from ldm.checkpoints.loading import load_model  # noqa: E402
from ldm.data.inpainting import ImageFolderInpainting  # noqa: E402
from ldm.image_io import quantize, to_uint8, write_png  # noqa: E402
from ldm.util import write_atomically  # noqa: E402

log = logging.getLogger("demo")

STAGE1_CONFIG = REPO / "configs/demo/autoencoder_vanilla.yaml"
STAGE2_CONFIG = REPO / "configs/demo/autoencoder_asymmetric.yaml"
# scikit-image's bundled photographs (skimage.data); grey ones become RGB
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left",
                "motorcycle_right", "camera", "grass", "gravel", "brick", "coins")
HELDOUT_PHOTOS = ("chelsea", "coffee")
PHOTO_SIDE = 128  # short side of each photo before cropping
TRAIN_CROP = 48  # training crops; the dataset takes a random 24..48 square of each and resizes it to 32
EVAL_SIZE = 32
STAGE1_STEPS = 500
STAGE2_STEPS = 1300


def load_photo(name: str) -> np.ndarray:
    """A scikit-image photo as (H, W, 3) uint8 RGB."""
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def resize_short_side(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = side / min(h, w)
    return cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def prepare_data(data_dir: Path, n_train: int = 2000, seed: int = 0) -> Tuple[Path, Path]:
    """Random ``TRAIN_CROP`` crops of the training photos and a grid of ``EVAL_SIZE`` crops of the held-out ones."""
    train_dir, heldout_dir = data_dir / "train", data_dir / "heldout"
    done = data_dir / ".complete"
    stamp = f"{n_train} {seed} {PHOTO_SIDE} {TRAIN_CROP} {EVAL_SIZE}\n"
    if done.is_file() and done.read_text() == stamp:
        return train_dir, heldout_dir
    rng = np.random.default_rng(seed)
    photos = [resize_short_side(load_photo(n), PHOTO_SIDE) for n in TRAIN_PHOTOS]
    for i in range(n_train):
        img = photos[i % len(photos)]
        y = int(rng.integers(0, img.shape[0] - TRAIN_CROP + 1))
        x = int(rng.integers(0, img.shape[1] - TRAIN_CROP + 1))
        write_png(img[y:y + TRAIN_CROP, x:x + TRAIN_CROP], train_dir / f"{TRAIN_PHOTOS[i % len(photos)]}_{i:05d}.png")
    for name in HELDOUT_PHOTOS:
        img = resize_short_side(load_photo(name), PHOTO_SIDE)
        ys = np.linspace(0, img.shape[0] - EVAL_SIZE, 6).astype(int)
        xs = np.linspace(0, img.shape[1] - EVAL_SIZE, 8).astype(int)
        for y in ys:
            for x in xs:
                write_png(img[y:y + EVAL_SIZE, x:x + EVAL_SIZE], heldout_dir / f"{name}_{y:03d}_{x:03d}.png")
    done.write_text(stamp)
    print(f"data: {n_train} training crops of {len(TRAIN_PHOTOS)} photos in {train_dir}, "
          f"{len(HELDOUT_PHOTOS) * 48} held-out crops of {', '.join(HELDOUT_PHOTOS)} in {heldout_dir}")
    return train_dir, heldout_dir


def data_overrides(train_dir: Path, heldout_dir: Path) -> List[str]:
    return [f"data.params.train.params.root={train_dir}", f"data.params.validation.params.root={heldout_dir}"]


def cpu_has_bf16() -> bool:
    """True where the CPU has bfloat16 instructions (x86 AVX-512 BF16 or AMX; read from /proc/cpuinfo, so Linux
    only). Without them oneDNN emulates bfloat16 and mixed precision is no faster than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_stage(config: Path, name: str, logdir: Path, steps: int, precision: str,
                overrides: Sequence[str]) -> Tuple[Path, float]:
    """Run ``main.py`` on ``config`` in a subprocess; returns (run folder, wall seconds including start-up)."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    run_dir = logdir / f"{stamp}_{name}"
    cmd = [sys.executable, str(REPO / "main.py"), "--base", str(config), "-t", "--no-test", "--logdir", str(logdir),
           "-n", name, "--wandb", "off", "--max_steps", str(steps), "--precision", precision, *overrides]
    print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, LDM_RUN_TIMESTAMP=stamp, PYTHONPATH=str(REPO))
    started = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise RuntimeError(f"{name}: main.py finished without {run_dir / 'checkpoints' / 'last.ckpt'}")
    seconds = time.time() - started
    print(f"== {name}: {steps} steps in {seconds:.0f} s, run folder {run_dir}", flush=True)
    return run_dir, seconds


def load_trained(run_dir: Path) -> torch.nn.Module:
    """The model of a run from its saved config and last.ckpt, without its training loss."""
    from omegaconf import OmegaConf

    project = sorted((run_dir / "configs").glob("*-project.yaml"))[-1]
    config = OmegaConf.load(project).model
    config.params.lossconfig = {"target": "torch.nn.Identity"}
    config.params.ckpt_path = None
    return load_model(config, run_dir / "checkpoints" / "last.ckpt")


@torch.no_grad()
def evaluate(vanilla: torch.nn.Module, asymmetric: torch.nn.Module, heldout_dir: Path, mask_config: str,
             seed: int = 0) -> Tuple[Dict[str, Dict[str, float]], Dict[str, torch.Tensor]]:
    """Both models on every held-out crop with its fixed mask; latents are the posterior mode of each model's own
    (identical, frozen) encoder. Returns (metrics per model, tensors for the figure)."""
    data = ImageFolderInpainting(root=heldout_dir, size=EVAL_SIZE, mask_config=mask_config, no_mask_prob=0.0,
                                 random_crop=False, fixed_masks=True, seed=seed)
    batch = [data[i] for i in range(len(data))]
    x = torch.stack([b["image"] for b in batch])
    mask = torch.stack([b["mask"] for b in batch])
    outputs = {
        "vanilla": vanilla.decode(vanilla.encode(x).mode()),
        "asymmetric": asymmetric.decode(asymmetric.encode(x).mode(), x, mask),
        "asymmetric, no mask": asymmetric.decode(asymmetric.encode(x).mode()),
    }
    table = {}
    for name, rec in outputs.items():
        acc = metrics.RegionMetricAccumulator()
        # scored as the 8-bit images a user would save, like the paper's evaluation
        acc.update(quantize(metrics.to_unit(rec)), quantize(metrics.to_unit(x)), mask)
        table[name] = acc.summary()
    return table, {"image": x, "mask": mask, **outputs}


def format_table(table: Dict[str, Dict[str, float]]) -> str:
    columns = (("pre_error", "pre_error", "{:.3e}"), ("mse_generated", "mse generated", "{:.3e}"),
               ("psnr_kept", "PSNR kept dB", "{:.2f}"), ("psnr_generated", "PSNR generated dB", "{:.2f}"))
    lines = [f"{'decoder':<22}" + "".join(f"{title:>19}" for _, title, _ in columns)]
    for name, row in table.items():
        lines.append(f"{name:<22}" + "".join(f"{fmt.format(row[key]):>19}" for key, _, fmt in columns))
    return "\n".join(lines)


FIGURE_SCALE = 6  # nearest-neighbour upscaling of the 32 px crops in the figure
ERROR_SCALE = 0.25  # error maps: |error| (images in [0, 1]) from 0 (black) to >= ERROR_SCALE (white), all maps
FIGURE_COLUMNS = ("input", "mask (white = generate)", "vanilla", "asymmetric", "|error| vanilla",
                  "|error| asymmetric")


def side_by_side(tensors: Dict[str, torch.Tensor], path: Path, rows: int = 6, scale: int = FIGURE_SCALE) -> None:
    """Rows of held-out crops, upscaled ``scale`` x with nearest neighbours, in the columns of ``FIGURE_COLUMNS``;
    both error maps share one scale (``ERROR_SCALE``), drawn as a bar under the figure."""
    x, mask = tensors["image"], tensors["mask"]
    idx = torch.linspace(0, len(x) - 1, rows).round().long()
    side, gap = EVAL_SIZE * scale, 6

    def tile(img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (side, side), interpolation=cv2.INTER_NEAREST)

    def rgb(t: torch.Tensor) -> np.ndarray:
        return tile(to_uint8(t[None])[0])

    def grey(values: np.ndarray) -> np.ndarray:
        v = (np.clip(values / ERROR_SCALE, 0, 1) * 255).round().astype(np.uint8)
        return np.repeat(v[..., None], 3, axis=-1)

    def err(t: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
        return tile(grey((metrics.to_unit(t) - metrics.to_unit(ref)).abs().mean(0).numpy()))

    def text(img: np.ndarray, label: str, x0: int, y0: int) -> None:
        cv2.putText(img, label, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)

    width = len(FIGURE_COLUMNS) * (side + gap) - gap
    parts = [np.full((30, width, 3), 255, np.uint8)]
    for c, label in enumerate(FIGURE_COLUMNS):
        text(parts[0], label, c * (side + gap) + 2, 20)
    for i in idx.tolist():
        cols = [rgb(x[i]), rgb(mask[i].expand(3, -1, -1) * 2 - 1), rgb(tensors["vanilla"][i]),
                rgb(tensors["asymmetric"][i]), err(tensors["vanilla"][i], x[i]), err(tensors["asymmetric"][i], x[i])]
        white = np.full((side, gap, 3), 255, np.uint8)
        parts.append(np.concatenate([c for col in cols for c in (col, white)][:-1], axis=1))
        parts.append(np.full((gap, width, 3), 255, np.uint8))
    # the error scale: a ramp under the two error columns
    bar = np.full((44, width, 3), 255, np.uint8)
    x0 = 4 * (side + gap)
    bar[4:20, x0:width] = grey(np.linspace(0, ERROR_SCALE, width - x0))[None]
    text(bar, "0", x0, 38)
    text(bar, f">= {ERROR_SCALE:g} (images in [0, 1])", width - 230, 38)
    text(bar, "both error maps, one scale:", 2, 16)
    parts.append(bar)
    write_png(np.concatenate(parts, axis=0), path)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (data, logs, report)")
    parser.add_argument("--stage1-steps", type=int, default=STAGE1_STEPS)
    parser.add_argument("--stage2-steps", type=int, default=STAGE2_STEPS)
    parser.add_argument("--precision", choices=("auto", "32", "bf16-mixed"), default="auto",
                        help="training precision of both stages; auto: bf16-mixed where the CPU has bfloat16 "
                             "instructions, else 32")
    args = parser.parse_args(argv)
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if cpu_has_bf16() else "32")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    seconds = {}
    started = time.time()
    out = Path(args.out).resolve()
    train_dir, heldout_dir = prepare_data(out / "data")
    seconds["data"] = time.time() - started
    logdir = out / "logs"
    stage1, seconds["stage1"] = train_stage(STAGE1_CONFIG, "demo_vanilla", logdir, args.stage1_steps, precision,
                                            data_overrides(train_dir, heldout_dir))
    stage2, seconds["stage2"] = train_stage(STAGE2_CONFIG, "demo_asymmetric", logdir, args.stage2_steps, precision,
                                            data_overrides(train_dir, heldout_dir)
                                            + [f"model.params.ckpt_path={stage1 / 'checkpoints' / 'last.ckpt'}"])

    from omegaconf import OmegaConf

    evaluation_started = time.time()
    mask_config = OmegaConf.load(STAGE2_CONFIG).data.params.validation.params.mask_config
    table, tensors = evaluate(load_trained(stage1), load_trained(stage2), heldout_dir, mask_config)
    print(f"\nheld-out crops: {len(tensors['image'])} x {EVAL_SIZE}px of {', '.join(HELDOUT_PHOTOS)}, fixed masks "
          "(1 = generate), 8-bit images in [0, 1]; pre_error = squared error in the kept region / (3*H*W)")
    print(format_table(table))
    ratio = table["vanilla"]["pre_error"] / max(table["asymmetric"]["pre_error"], 1e-12)
    print(f"kept-region error: the asymmetric decoder's pre_error is {ratio:.0f}x below the vanilla decoder's")
    side_by_side(tensors, out / "comparison.png")
    seconds["evaluation"] = time.time() - evaluation_started
    seconds["total"] = time.time() - started
    report = {name: metrics.json_safe(table[name]) for name in table}
    report["pre_error_ratio"] = ratio
    report["run"] = {"steps": {"stage1": args.stage1_steps, "stage2": args.stage2_steps}, "precision": precision,
                     "cpu_count": os.cpu_count(), "wall_time_s": {k: round(v, 1) for k, v in seconds.items()}}
    write_atomically(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"\nwall time: data {seconds['data']:.0f} s, stage 1 {seconds['stage1']:.0f} s ({args.stage1_steps} steps), "
          f"stage 2 {seconds['stage2']:.0f} s ({args.stage2_steps} steps), evaluation and figure "
          f"{seconds['evaluation']:.0f} s; total {seconds['total']:.0f} s ({precision}, {os.cpu_count()} CPUs)")
    print(f"wrote {out / 'report.json'} and {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
