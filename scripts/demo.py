"""The embedded demo (`make demo`): does the asymmetric decoder beat vanilla + paste-back, and where? End to end on a
CPU in minutes, with no downloads.

1. data: crops of the photographs bundled with scikit-image; two photos (chelsea, coffee) are held out whole.
2. stage 1: a small KL autoencoder (encoder + vanilla decoder, factor-4 latent of 4 channels) trained from scratch
   through main.py (configs/demo/autoencoder_vanilla.yaml).
3. stage 2: the asymmetric decoder (condition branch reading the masked image; last_blend: none, docs/decoders.md)
   trained on the frozen stage-1 encoder, starting from the stage-1 decoder, through main.py
   (configs/demo/autoencoder_asymmetric.yaml).
4. evaluation on the held-out photos decoded whole (128 x 192; the models train on 32 px crops, and are
   convolutional) with fixed masks (1 = generate, 0 = keep), the rows of ROWS: vanilla; vanilla+<recipe> for each
   blend of BASELINES (every recipe of ldm.metrics: paste = diffusers' apply_overlay, a1111 = AUTOMATIC1111's mask
   blur, the default blends of Fooocus, InvokeAI, CropAndStitch and BrushNet, colour matching, Poisson and Laplacian
   blending; none sees the pixels under the mask); asymmetric; asymmetric+paste; and asymmetric without the mask (the
   control: decode(z)). Columns: PSNR of the kept and generated regions and of the bands either side of the mask
   edge, seam_error, pre_error (ldm.metrics). A table and a verdict on stdout, outputs/demo/report.json and a figure
   outputs/demo/comparison.png (whole photos side by side, error maps on one scale, a zoom on a stretch of mask
   edge).
5. robustness rows (ROBUSTNESS): vanilla+paste, asymmetric and asymmetric+paste again with the masks drawn on an
   8x coarser grid (jagged edges) and with the photos at 1.5x the size, each against the table's own row.

    python scripts/demo.py [--out outputs/demo] [--stage1-steps N] [--stage2-steps N] [--precision auto]
                           [--boundary-weight W]

Wall time per step (data, stage 1, stage 2, evaluation) goes into report.json. On CPUs with bfloat16 instructions
(AVX-512 BF16 or AMX) both stages train in bfloat16 mixed precision (``--precision auto``), about 1.8x faster per
step than float32 there; elsewhere they train in float32. Evaluation is always float32. ``--boundary-weight W``
trains stage 2 with the seam fix (docs/demo.md); 0, the default, is the paper's loss.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from ldm import metrics  # noqa: E402
from ldm.fast import cpu_has_native_bf16  # noqa: E402
from ldm.image_io import quantize, to_uint8, write_png  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.modules.mask_edges import edge_pixels  # noqa: E402
from ldm.project import load_yaml  # noqa: E402
from ldm.util import write_atomically  # noqa: E402

log = logging.getLogger("demo")

STAGE1_CONFIG = REPO / "configs/demo/autoencoder_vanilla.yaml"
STAGE2_CONFIG = REPO / "configs/demo/autoencoder_asymmetric.yaml"
# scikit-image's bundled photographs (skimage.data); grey ones become RGB
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left",
                "motorcycle_right", "camera", "grass", "gravel", "brick", "coins")
HELDOUT_PHOTOS = ("chelsea", "coffee")
PHOTO_SIDE = 128  # short side of every photo; the held-out ones are decoded whole at this size (128 x 192)
TRAIN_CROP = 48  # training crops; the dataset takes a random 24..48 square of each and resizes it to 32
MASKS_PER_PHOTO = 4  # fixed masks per held-out photo: 8 images in the table
MASK_COVER = (0.1, 0.6)  # held-out masks cover this fraction of the photo
BLUR_PX = 4.0  # a1111: sigma of the Gaussian mask blur, pixels (scripts/evaluate.py's default)
BAND_PX = 8  # boundary bands: pixels within this chessboard distance of the other region
STAGE1_STEPS = 250
STAGE2_STEPS = 200


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


def heldout_photo(name: str, side: int) -> np.ndarray:
    """A held-out photo whole at ``side`` short side, its long side cut to a multiple of 8 around the centre (as
    the latent needs), resized from scikit-image's original (larger than 192 px on the short side)."""
    img = resize_short_side(load_photo(name), side)
    h, w = (s - s % 8 for s in img.shape[:2])
    y, x = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return np.ascontiguousarray(img[y:y + h, x:x + w])


def prepare_data(data_dir: Path, n_train: int = 2000, seed: int = 0) -> Tuple[Path, Path]:
    """Random ``TRAIN_CROP`` crops of the training photos, and each held-out photo whole at ``PHOTO_SIDE`` short
    side (its long side cut to a multiple of 8 around the centre, as the latent needs)."""
    train_dir, heldout_dir = data_dir / "train", data_dir / "heldout"
    done = data_dir / ".complete"
    stamp = f"{n_train} {seed} {PHOTO_SIDE} {TRAIN_CROP} whole\n"
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
        write_png(heldout_photo(name, PHOTO_SIDE), heldout_dir / f"{name}.png")
    done.write_text(stamp)
    print(f"data: {n_train} training crops of {len(TRAIN_PHOTOS)} photos in {train_dir}, "
          f"{len(HELDOUT_PHOTOS)} held-out photos ({', '.join(HELDOUT_PHOTOS)}) in {heldout_dir}")
    return train_dir, heldout_dir


def data_overrides(train_dir: Path, heldout_dir: Path) -> List[str]:
    return [f"data.params.train.params.root={train_dir}", f"data.params.validation.params.root={heldout_dir}"]


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

    project = sorted((run_dir / "configs").glob("*-project.yaml"))[-1]
    config = load_yaml(project).model
    config.params.lossconfig = {"target": "torch.nn.Identity"}
    config.params.ckpt_path = None
    return load_model(config, run_dir / "checkpoints" / "last.ckpt")


def heldout_masks(mask_config: str, height: int, width: int, count: int, seed: int = 0) -> List[np.ndarray]:
    """``count`` masks (1 = generate) of the training distribution at the held-out size, drawn from generators
    seeded ``(seed, i)``; draws covering less than ``MASK_COVER[0]`` or more than ``MASK_COVER[1]`` of the image
    are skipped (a mask with nothing to keep, or no hole, has no boundary to judge)."""
    from ldm.data.masks import MaskGenerator

    generator = MaskGenerator.from_config(mask_config)
    masks, i = [], 0
    while len(masks) < count:
        mask = generator(height, width, np.random.default_rng([seed, i]))
        i += 1
        if MASK_COVER[0] <= mask.mean() <= MASK_COVER[1]:
            masks.append(mask)
    return masks


def heldout_batch(photos: Sequence[Tuple[str, np.ndarray]], mask_config: str,
                  coarsen: int = 1) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``photos`` (name, (H, W, 3) float32 RGB in [0, 1]) with ``MASKS_PER_PHOTO`` fixed masks each, drawn at the
    photo's size (seeded by the image's index, so every size gets the same draws) and, with ``coarsen`` F > 1,
    redrawn on a grid F times coarser (:func:`ldm.modules.mask_edges.coarsen_mask`): images (N,3,H,W) in [-1, 1],
    masks (N,1,H,W) and a name per image."""
    from ldm.modules.mask_edges import coarsen_mask

    images, masks, names = [], [], []
    for stem, rgb in photos:
        h, w = rgb.shape[:2]
        for k, mask in enumerate(heldout_masks(mask_config, h, w, MASKS_PER_PHOTO, seed=len(names))):
            images.append(torch.from_numpy(rgb.transpose(2, 0, 1).copy()) * 2 - 1)
            masks.append(coarsen_mask(torch.from_numpy(mask)[None], coarsen))
            names.append(f"{stem} mask {k}")
    return torch.stack(images), torch.stack(masks), names


def load_heldout(heldout_dir: Path) -> List[Tuple[str, np.ndarray]]:
    """Every held-out photo of ``heldout_dir``, whole: (name, (H, W, 3) float32 RGB in [0, 1]), for
    :func:`heldout_batch`."""
    from ldm.image_io import open_image, to_rgb

    photos = []
    for path in sorted(heldout_dir.glob("*.png")):
        with open_image(path) as img:
            photos.append((path.stem, to_rgb(img, str(path))))
    return photos


# The blends users apply to a decoder's output, each a row vanilla+<recipe>: every recipe of ldm.metrics (the
# one home of each, and of the rule that a recipe sees the output, the kept pixels and the mask, never the
# reference under the mask); asymmetric+paste is what a user of the asymmetric decoder would save.
BASELINES = metrics.RECIPES
ROWS = ("vanilla", *(f"vanilla+{b}" for b in BASELINES), "asymmetric", "asymmetric+paste", "asymmetric, no mask")


@torch.no_grad()
def decode_unmasked(vanilla: torch.nn.Module, asymmetric: torch.nn.Module, x: torch.Tensor,
                    control: bool = True) -> Dict[str, List[torch.Tensor]]:
    """What does not depend on the mask, one image at a time: the vanilla output (``"vanilla"``), the asymmetric
    model's latent (``"z"``) and, with ``control``, its decode without image and mask (``"asymmetric, no mask"``).
    Latents are the posterior mode of each model's own (identical, frozen) encoder; outputs are not clamped."""
    out: Dict[str, List[torch.Tensor]] = {"vanilla": [], "z": [], "asymmetric, no mask": []}
    for i in range(len(x)):
        xi = x[i:i + 1]
        out["vanilla"].append(vanilla.decode(vanilla.encode(xi).mode()))
        out["z"].append(asymmetric.encode(xi).mode())
        if control:
            out["asymmetric, no mask"].append(asymmetric.decode(out["z"][-1]))
    return out


@torch.no_grad()
def evaluate(vanilla: torch.nn.Module, asymmetric: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor,
             rows: Sequence[str] = ROWS, unmasked: Optional[Dict[str, List[torch.Tensor]]] = None
             ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, torch.Tensor]]:
    """Every row of ``rows`` (of ``ROWS``) on the held-out images, each decoded whole (the autoencoder is
    convolutional). ``unmasked``: :func:`decode_unmasked` of these images, when another mask set already made it.
    The ``vanilla+<recipe>`` rows are :func:`ldm.metrics.composites` of the vanilla output by each recipe of
    ``BASELINES`` (``paste``: diffusers' ``apply_overlay``; ``a1111``: AUTOMATIC1111's mask blur of sigma
    ``BLUR_PX``; Fooocus', InvokeAI's, CropAndStitch's and BrushNet's default blends; colour matching, Poisson and
    Laplacian blending: docs/evaluation.md); ``asymmetric+paste`` is ``paste`` over the asymmetric output. Every row
    is scored as the 8-bit image a user would save. Returns (metrics per row, tensors in [-1, 1] for the figure)."""
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise ValueError(f"rows {sorted(unknown)}: not among {ROWS}")
    if unmasked is None:
        unmasked = decode_unmasked(vanilla, asymmetric, x, control="asymmetric, no mask" in rows)
    outputs: Dict[str, List[torch.Tensor]] = {name: [] for name in ROWS}
    outputs["vanilla"], outputs["asymmetric, no mask"] = unmasked["vanilla"], unmasked["asymmetric, no mask"]
    if {"asymmetric", "asymmetric+paste"} & set(rows):
        outputs["asymmetric"] = [asymmetric.decode(unmasked["z"][i], x[i:i + 1], mask[i:i + 1])
                                 for i in range(len(x))]
    # composited in [0, 1] over the whole set at once, as users paste (the symmetric recipes show another photo
    # of the set in the hole: ldm.metrics.other_content), and scored as the 8-bit images a user would save
    for source in ("vanilla", "asymmetric"):
        recipes = [r for r in BASELINES if f"{source}+{r}" in rows]
        if not recipes:
            continue
        out = metrics.to_unit(torch.cat(outputs[source]))
        for recipe, composite in metrics.composites(recipes, out, metrics.to_unit(x), mask,
                                                    blur_px=BLUR_PX).items():
            outputs[f"{source}+{recipe}"] = [quantize(composite) * 2 - 1]
    target = quantize(metrics.to_unit(x))
    table, tensors, per_image = {}, {"image": x, "mask": mask}, {}
    for name in rows:
        rec = torch.cat(outputs[name]).clamp(-1, 1)
        tensors[name] = rec
        acc = metrics.RegionMetricAccumulator(band_px=BAND_PX)
        acc.update(quantize(metrics.to_unit(rec)), target, mask)
        table[name], per_image[name] = acc.summary(), acc.values
    add_intervals(table, per_image)
    return table, tensors


# the columns that get a 95 % interval: each row against vanilla, and asymmetric+paste against every blend
CI_KEYS = ("psnr_kept", "psnr_generated", "psnr_band_outer", "seam_error")


def add_intervals(table: Dict[str, Dict[str, Any]], per_image: Dict[str, Dict[str, List[float]]]) -> None:
    """Paired bootstrap 95 % intervals (:func:`ldm.metrics.paired_bootstrap`, per image, seeded) into ``table``:
    ``<key>_ci`` of each row is its difference to ``vanilla`` (row - vanilla); ``seam_error_vs_<row>_ci`` of
    ``asymmetric+paste`` its difference to each ``vanilla+<recipe>`` row."""
    if "vanilla" in per_image:
        for name in per_image:
            if name != "vanilla":
                for key in CI_KEYS:
                    table[name][f"{key}_ci"] = metrics.paired_bootstrap(per_image[name][key],
                                                                        per_image["vanilla"][key])
    if "asymmetric+paste" in per_image:
        for name in per_image:
            if name.startswith("vanilla+"):
                table["asymmetric+paste"][f"seam_error_vs_{name}_ci"] = metrics.paired_bootstrap(
                    per_image["asymmetric+paste"]["seam_error"], per_image[name]["seam_error"])


# (key, title, format, higher is better)
COLUMNS = (("psnr_kept", "PSNR kept", "{:.2f}", True), ("psnr_generated", "PSNR generated", "{:.2f}", True),
           ("psnr_band_outer", "PSNR kept band", "{:.2f}", True),
           ("psnr_band_inner", "PSNR generated band", "{:.2f}", True),
           ("seam_error", "seam_error", "{:.4f}", False), ("pre_error", "pre_error", "{:.2e}", False))
WHERE = {"psnr_kept": "the kept region", "psnr_generated": "the generated region",
         "psnr_band_outer": "the kept pixels within {band} px of the hole",
         "psnr_band_inner": "the generated pixels within {band} px of the kept region",
         "seam_error": "the step at the mask edge (seam_error)"}


def format_table(table: Dict[str, Dict[str, float]]) -> str:
    """The table as markdown (PSNR in dB)."""
    lines = ["| decoder | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(row[key]) for key, _, fmt, _ in COLUMNS) + " |")
    return "\n".join(lines)


def verdict(table: Dict[str, Dict[str, float]]) -> List[str]:
    """Which row scores best where (the point values), in plain words, and asymmetric+paste against every blend at
    the seam by the 95 % intervals (a verdict word only where the interval excludes 0); the control row (no mask)
    is not a candidate."""
    lines = []
    candidates = [name for name in table if name != "asymmetric, no mask"]
    for key, _, fmt, higher in COLUMNS:
        if key not in WHERE:
            continue
        values = {name: table[name][key] for name in candidates}
        best = (max if higher else min)(values, key=values.get)
        others = ", ".join(f"{name} {fmt.format(v)}" for name, v in values.items() if name != best)
        unit = " dB" if key.startswith("psnr") else ""
        lines.append(f"{WHERE[key].format(band=BAND_PX)}: {best} wins ({fmt.format(values[best])}{unit}; {others})")
    asym, paste = table["asymmetric"], table["vanilla+paste"]
    better = [WHERE[k].format(band=BAND_PX) for k, _, _, higher in COLUMNS if k in WHERE
              and (asym[k] > paste[k] if higher else asym[k] < paste[k])]
    worse = [WHERE[k].format(band=BAND_PX) for k, _, _, higher in COLUMNS if k in WHERE
             and (asym[k] < paste[k] if higher else asym[k] > paste[k])]
    lines.append("asymmetric against vanilla+paste: better in " + ("; ".join(better) or "nothing")
                 + "; worse in " + ("; ".join(worse) or "nothing"))
    seam = table["asymmetric+paste"]["seam_error"]
    words: Dict[str, List[str]] = {"wins": [], "loses": [], "no difference measured": [], "no interval": []}
    for name in table:
        if name.startswith("vanilla+"):
            ci = table["asymmetric+paste"].get(f"seam_error_vs_{name}_ci")
            words[metrics.verdict(ci, higher_is_better=False)].append(
                f"{name} {table[name]['seam_error']:.4f}" + (f" [{ci['low']:+.4f}, {ci['high']:+.4f}]" if ci else ""))
    lines.append(f"asymmetric+paste at the seam ({seam:.4f}; 95 % interval of the difference per image): lower than "
                 + ("; ".join(words["wins"]) or "none") + "; higher than " + ("; ".join(words["loses"]) or "none")
                 + "; no difference measured against " + ("; ".join(words["no difference measured"]) or "none"))
    return lines


FIGURE_ROWS = ("vanilla", "vanilla+paste", "vanilla+fooocus", "asymmetric", "asymmetric+paste",
               "asymmetric, no mask")
ERROR_SCALE = 0.25  # error maps: mean |error| over channels (images in [0, 1]) from 0 to >= ERROR_SCALE, all maps
ZOOM = 4  # zoom factor of the boundary crops (nearest neighbours)
GAP = 6


def edge_window(mask: torch.Tensor, height: int, width: int) -> Tuple[int, int]:
    """Top-left corner of a ``height`` x ``width`` window centred on the mask-edge pixel nearest the image centre
    (:func:`ldm.modules.mask_edges.edge_pixels`; the centre when the mask has no edge): a
    stretch of mask edge chosen without looking at any output."""
    edge = edge_pixels(mask[0])
    ys, xs = torch.nonzero(edge, as_tuple=True)
    H, W = edge.shape
    if len(ys) == 0:
        cy, cx = H // 2, W // 2
    else:
        k = int(torch.argmin((ys - H / 2) ** 2 + (xs - W / 2) ** 2))
        cy, cx = int(ys[k]), int(xs[k])
    return min(max(cy - height // 2, 0), H - height), min(max(cx - width // 2, 0), W - width)


def side_by_side(tensors: Dict[str, torch.Tensor], names: Sequence[str], path: Path,
                 images: Sequence[int]) -> None:
    """For each held-out image in ``images`` three rows: the outputs of every method (first column: the input with
    the mask edge drawn and the zoom window boxed), their error maps on one colour scale (first column: the mask,
    white = generate), and a ``ZOOM`` x zoom on a stretch of mask edge (first column: the input). Whole images at
    their own size (the short side is at least 128 px)."""
    x, mask = tensors["image"], tensors["mask"]
    H, W = x.shape[-2:]
    zh, zw = H // ZOOM, W // ZOOM

    def rgb(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(to_uint8(t[None])[0])

    def heat(values: np.ndarray) -> np.ndarray:
        v = (np.clip(values / ERROR_SCALE, 0, 1) * 255).round().astype(np.uint8)
        return cv2.applyColorMap(v, cv2.COLORMAP_INFERNO)[..., ::-1]

    def zoom(img: np.ndarray, y0: int, x0: int) -> np.ndarray:
        return cv2.resize(img[y0:y0 + zh, x0:x0 + zw], (W, H), interpolation=cv2.INTER_NEAREST)

    def text(img: np.ndarray, label: str, x0: int, y0: int, colour=(0, 0, 0)) -> None:
        cv2.putText(img, label, (x0, y0), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)

    columns = ["input", *FIGURE_ROWS]
    width = len(columns) * (W + GAP) - GAP
    white_col = np.full((H, GAP, 3), 255, np.uint8)

    def row(tiles: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([c for t in tiles for c in (t, white_col)][:-1], axis=1)

    header = np.full((24, width, 3), 255, np.uint8)
    for c, label in enumerate(columns):
        text(header, label, c * (W + GAP) + 2, 16)
    parts = [header]
    for i in images:
        m = mask[i, 0].numpy() >= 0.5
        y0, x0 = edge_window(mask[i], zh, zw)
        contour = (cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0) & ~m
        source = rgb(x[i])
        marked = source.copy()
        marked[contour] = (0, 255, 255)
        cv2.rectangle(marked, (x0, y0), (x0 + zw - 1, y0 + zh - 1), (255, 0, 0), 1)
        outs = [rgb(tensors[name][i]) for name in FIGURE_ROWS]
        errors = [heat((metrics.to_unit(tensors[name][i]) - metrics.to_unit(x[i])).abs().mean(0).numpy())
                  for name in FIGURE_ROWS]
        mask_tile = np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2)
        label = np.full((18, width, 3), 255, np.uint8)
        text(label, f"{names[i]} ({W}x{H}): outputs, |error|, {ZOOM}x zoom on the boxed stretch of mask edge",
             2, 13)
        parts += [label, row([marked, *outs]), np.full((GAP, width, 3), 255, np.uint8),
                  row([mask_tile, *errors]), np.full((GAP, width, 3), 255, np.uint8),
                  row([zoom(t, y0, x0) for t in [source, *outs]]), np.full((2 * GAP, width, 3), 255, np.uint8)]
    bar = np.full((40, width, 3), 255, np.uint8)
    x_start = W + GAP
    bar[4:18, x_start:width] = heat(np.linspace(0, ERROR_SCALE, width - x_start)[None])[0][None]
    text(bar, "|error|, one scale:", 2, 16)
    text(bar, "0", x_start, 34)
    text(bar, f">= {ERROR_SCALE:g} (mean over channels, images in [0, 1])", width - 330, 34)
    parts.append(bar)
    write_png(np.concatenate(parts, axis=0), path)


# Robustness conditions, as ASUKA's users meet them: (label, short side of the photos, mask coarsening factor)
ROBUSTNESS = (("masks drawn 8x coarser", PHOTO_SIDE, 8), ("photos at 192 px, 1.5x", 192, 1))
ROBUST_ROWS = ("vanilla+paste", "asymmetric", "asymmetric+paste")
ROBUST_COLUMNS = ("psnr_kept", "psnr_generated", "seam_error")


def evaluate_robustness(vanilla: torch.nn.Module, asymmetric: torch.nn.Module, mask_config: str,
                        photos: Sequence[Tuple[str, np.ndarray]],
                        unmasked: Dict[str, List[torch.Tensor]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``ROBUST_ROWS`` under each condition of ``ROBUSTNESS``: the held-out photos at that short side (``photos``
    and their :func:`decode_unmasked` ``unmasked`` at ``PHOTO_SIDE``, the main table's; from scikit-image's
    originals at another side) with the same mask draws (at that size; coarsened). {label: {row: metrics}}."""
    out = {}
    for label, side, coarsen in ROBUSTNESS:
        at_side = photos if side == PHOTO_SIDE else [
            (name, heldout_photo(name, side).astype(np.float32) / 255) for name in HELDOUT_PHOTOS]
        x, mask, _ = heldout_batch(at_side, mask_config, coarsen)
        out[label] = evaluate(vanilla, asymmetric, x, mask, rows=ROBUST_ROWS,
                              unmasked=unmasked if side == PHOTO_SIDE else None)[0]
    return out


def format_robustness(table: Dict[str, Dict[str, float]], robustness: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Markdown: each condition's rows, and each value's change against the same row of the main table."""
    titles = {key: title for key, title, _, _ in COLUMNS}
    lines = ["| condition | decoder | " + " | ".join(f"{titles[k]} (change)" for k in ROBUST_COLUMNS) + " |",
             "|---|---|" + "---|" * len(ROBUST_COLUMNS)]
    formats = {key: fmt for key, _, fmt, _ in COLUMNS}
    for label, rows in robustness.items():
        for name, row in rows.items():
            cells = []
            for key in ROBUST_COLUMNS:
                value, main_value = row[key], table[name][key]
                change = value - main_value if math.isfinite(value) and math.isfinite(main_value) else None
                sign = "" if change is None else f" ({'+' if change >= 0 else '-'}{formats[key].format(abs(change))})"
                cells.append(formats[key].format(value) + sign)
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_runs(stage1: Path, stage2: Path, heldout_dir: Path, figure: Path
                  ) -> Tuple[Dict[str, Dict[str, float]], List[str], Dict[str, Dict[str, Dict[str, float]]]]:
    """Evaluate the two trained runs on the held-out photos: print the table, the verdict and the robustness
    table, write the figure. Returns (table, verdict lines, robustness)."""

    mask_config = load_yaml(STAGE2_CONFIG).data.params.validation.params.mask_config
    photos = load_heldout(heldout_dir)
    x, mask, names = heldout_batch(photos, mask_config)
    vanilla, asymmetric = load_trained(stage1), load_trained(stage2)
    unmasked = decode_unmasked(vanilla, asymmetric, x)
    table, tensors = evaluate(vanilla, asymmetric, x, mask, unmasked=unmasked)
    print(f"\nheld-out: {', '.join(HELDOUT_PHOTOS)}, whole ({x.shape[-1]}x{x.shape[-2]}), {MASKS_PER_PHOTO} fixed "
          f"masks each (1 = generate), scored as 8-bit images in [0, 1]; PSNR in dB; bands: {BAND_PX} px either "
          f"side of the mask edge; seam_error: mean |output step - image step| across the edge; a1111: "
          f"Gaussian mask blur, sigma {BLUR_PX:g} px")
    print(format_table(table))
    lines = verdict(table)
    print("\n" + "\n".join(lines))
    side_by_side(tensors, names, figure, images=range(0, len(x), MASKS_PER_PHOTO))
    robustness = evaluate_robustness(vanilla, asymmetric, mask_config, photos, unmasked)
    print("\nrobustness (the same photos and mask draws; change against the table above):")
    print(format_robustness(table, robustness))
    return table, lines, robustness


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (data, logs, report)")
    parser.add_argument("--stage1-steps", type=int, default=STAGE1_STEPS)
    parser.add_argument("--stage2-steps", type=int, default=STAGE2_STEPS)
    parser.add_argument("--precision", choices=("auto", "32", "bf16-mixed"), default="auto",
                        help="training precision of both stages; auto: bf16-mixed where the CPU has bfloat16 "
                             "instructions, else 32")
    parser.add_argument("--boundary-weight", type=float, default=0.0,
                        help="stage 2's seam fix (off by default, the paper's loss): the L1 term weighs 1 + W at the "
                             "pixels within 2 px of the mask edge (LPIPSWithDiscriminator boundary_weight)")
    args = parser.parse_args(argv)
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if cpu_has_native_bf16() else "32")
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
                                            + [f"model.params.ckpt_path={stage1 / 'checkpoints' / 'last.ckpt'}",
                                               f"model.params.lossconfig.params.boundary_weight={args.boundary_weight}"])

    evaluation_started = time.time()
    table, lines, robustness = evaluate_runs(stage1, stage2, heldout_dir, out / "comparison.png")
    seconds["evaluation"] = time.time() - evaluation_started
    seconds["total"] = time.time() - started
    report = {"rows": {name: metrics.json_safe(table[name]) for name in table}, "verdict": lines,
              "robustness": {label: {name: metrics.json_safe(row) for name, row in rows.items()}
                             for label, rows in robustness.items()}}
    report["run"] = {"steps": {"stage1": args.stage1_steps, "stage2": args.stage2_steps}, "precision": precision,
                     "boundary_weight": args.boundary_weight,
                     "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "wall_time_s": {k: round(v, 1) for k, v in seconds.items()}}
    write_atomically(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(f"\nwall time: data {seconds['data']:.0f} s, stage 1 {seconds['stage1']:.0f} s ({args.stage1_steps} steps), "
          f"stage 2 {seconds['stage2']:.0f} s ({args.stage2_steps} steps), evaluation and figure "
          f"{seconds['evaluation']:.0f} s; total {seconds['total']:.0f} s ({precision}, {torch.get_num_threads()} "
          f"threads, {os.cpu_count()} CPUs)")
    print(f"wrote {out / 'report.json'} and {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
