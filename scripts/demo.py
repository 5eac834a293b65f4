"""The embedded demo (`make demo`): the paper's effect, end to end, on a CPU in minutes, with no downloads.

1. data: crops of the photographs bundled with scikit-image; two photos (chelsea, coffee) are held out.
2. stage 1: a small KL autoencoder (encoder + vanilla decoder) trained from scratch through main.py
   (configs/demo/autoencoder_vanilla.yaml).
3. stage 2: the asymmetric decoder (condition branch reading the masked image) trained on the frozen stage-1
   encoder, starting from the stage-1 decoder, through main.py (configs/demo/autoencoder_asymmetric.yaml).
4. evaluation on the held-out crops with fixed masks (1 = generate, 0 = keep): pre_error (squared error in the kept
   region per element, images in [0, 1]), error in the generated region, PSNR in each region; a table on stdout,
   outputs/demo/report.json and a side-by-side figure outputs/demo/comparison.png.

    python scripts/demo.py [--out outputs/demo] [--stage1-steps 1500] [--stage2-steps 1600]
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
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from ldm.util import write_atomically  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.data.inpainting import ImageFolderInpainting  # noqa: E402
from ldm import metrics  # noqa: E402

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


def write_png(path: Path, rgb: np.ndarray) -> None:
    write_atomically(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1))


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
        write_png(train_dir / f"{TRAIN_PHOTOS[i % len(photos)]}_{i:05d}.png", img[y:y + TRAIN_CROP, x:x + TRAIN_CROP])
    for name in HELDOUT_PHOTOS:
        img = resize_short_side(load_photo(name), PHOTO_SIDE)
        ys = np.linspace(0, img.shape[0] - EVAL_SIZE, 6).astype(int)
        xs = np.linspace(0, img.shape[1] - EVAL_SIZE, 8).astype(int)
        for y in ys:
            for x in xs:
                write_png(heldout_dir / f"{name}_{y:03d}_{x:03d}.png", img[y:y + EVAL_SIZE, x:x + EVAL_SIZE])
    done.write_text(stamp)
    print(f"data: {n_train} training crops of {len(TRAIN_PHOTOS)} photos in {train_dir}, "
          f"{len(HELDOUT_PHOTOS) * 48} held-out crops of {', '.join(HELDOUT_PHOTOS)} in {heldout_dir}")
    return train_dir, heldout_dir


def data_overrides(train_dir: Path, heldout_dir: Path) -> List[str]:
    return [f"data.params.train.params.root={train_dir}", f"data.params.validation.params.root={heldout_dir}"]


def train_stage(config: Path, name: str, logdir: Path, steps: int, overrides: Sequence[str]) -> Path:
    """Run ``main.py`` on ``config`` in a subprocess; returns the run folder."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    run_dir = logdir / f"{stamp}_{name}"
    cmd = [sys.executable, str(REPO / "main.py"), "--base", str(config), "-t", "--no-test", "--logdir", str(logdir),
           "-n", name, "--wandb", "off", "--max_steps", str(steps), *overrides]
    print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, LDM_RUN_TIMESTAMP=stamp, PYTHONPATH=str(REPO))
    started = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        raise RuntimeError(f"{name}: main.py finished without {run_dir / 'checkpoints' / 'last.ckpt'}")
    print(f"== {name}: {steps} steps in {time.time() - started:.0f} s, run folder {run_dir}", flush=True)
    return run_dir


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
        acc.update(metrics.quantize_uint8(metrics.to_unit(rec)), metrics.quantize_uint8(metrics.to_unit(x)), mask)
        table[name] = acc.summary()
    return table, {"image": x, "mask": mask, **outputs}


def format_table(table: Dict[str, Dict[str, float]]) -> str:
    columns = (("pre_error", "pre_error", "{:.3e}"), ("mse_generated", "mse generated", "{:.3e}"),
               ("psnr_kept", "PSNR kept dB", "{:.2f}"), ("psnr_generated", "PSNR generated dB", "{:.2f}"))
    lines = [f"{'decoder':<22}" + "".join(f"{title:>19}" for _, title, _ in columns)]
    for name, row in table.items():
        lines.append(f"{name:<22}" + "".join(f"{fmt.format(row[key]):>19}" for key, _, fmt in columns))
    return "\n".join(lines)


def side_by_side(tensors: Dict[str, torch.Tensor], path: Path, rows: int = 8, scale: int = 4) -> None:
    """Rows of held-out crops: input | mask | masked input | vanilla | asymmetric | |error| x4 of both."""
    x, mask = tensors["image"], tensors["mask"]
    idx = torch.linspace(0, len(x) - 1, rows).long()

    def rgb(t: torch.Tensor) -> np.ndarray:
        return (((t.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    def err(t: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
        e = ((t.clamp(-1, 1) - ref).abs().mean(0) / 2 * 4).clamp(0, 1)
        return (np.repeat(e.numpy()[..., None], 3, axis=2) * 255).round().astype(np.uint8)

    pad = np.full((EVAL_SIZE, 2, 3), 255, np.uint8)
    lines = []
    for i in idx.tolist():
        cols = [rgb(x[i]), rgb(mask[i].expand(3, -1, -1) * 2 - 1), rgb((1 - mask[i]) * x[i]),
                rgb(tensors["vanilla"][i]), rgb(tensors["asymmetric"][i]),
                err(tensors["vanilla"][i], x[i]), err(tensors["asymmetric"][i], x[i])]
        lines.append(np.concatenate([c for col in cols for c in (col, pad)], axis=1))
        lines.append(np.full((2, lines[-1].shape[1], 3), 255, np.uint8))
    figure = np.concatenate(lines, axis=0)
    figure = cv2.resize(figure, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    header = np.full((22, figure.shape[1], 3), 255, np.uint8)
    labels = ("input", "mask", "masked input", "vanilla", "asymmetric", "|err| x4 van.", "|err| x4 asym.")
    for i, label in enumerate(labels):
        cv2.putText(header, label, (i * (EVAL_SIZE + 2) * scale + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    write_png(path, np.concatenate([header, figure], axis=0))


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (data, logs, report)")
    parser.add_argument("--stage1-steps", type=int, default=1500)
    parser.add_argument("--stage2-steps", type=int, default=1600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    started = time.time()
    out = Path(args.out).resolve()
    train_dir, heldout_dir = prepare_data(out / "data")
    logdir = out / "logs"
    stage1 = train_stage(STAGE1_CONFIG, "demo_vanilla", logdir, args.stage1_steps,
                         data_overrides(train_dir, heldout_dir))
    stage2 = train_stage(STAGE2_CONFIG, "demo_asymmetric", logdir, args.stage2_steps,
                         data_overrides(train_dir, heldout_dir)
                         + [f"model.params.ckpt_path={stage1 / 'checkpoints' / 'last.ckpt'}"])

    from omegaconf import OmegaConf

    mask_config = OmegaConf.load(STAGE2_CONFIG).data.params.validation.params.mask_config
    table, tensors = evaluate(load_trained(stage1), load_trained(stage2), heldout_dir, mask_config)
    print(f"\nheld-out crops: {len(tensors['image'])} x {EVAL_SIZE}px of {', '.join(HELDOUT_PHOTOS)}, fixed masks "
          "(1 = generate), 8-bit images in [0, 1]; pre_error = squared error in the kept region / (3*H*W)")
    print(format_table(table))
    ratio = table["vanilla"]["pre_error"] / max(table["asymmetric"]["pre_error"], 1e-12)
    print(f"kept-region error: the asymmetric decoder's pre_error is {ratio:.0f}x below the vanilla decoder's")
    report = {name: metrics.json_safe(table[name]) for name in ("vanilla", "asymmetric")}
    write_atomically(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    side_by_side(tensors, out / "comparison.png")
    print(f"\nwrote {out / 'report.json'} and {out / 'comparison.png'} "
          f"(columns: input, mask, masked input, vanilla, asymmetric, |error| x4 vanilla, asymmetric); "
          f"total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
