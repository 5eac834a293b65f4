"""Evaluate decoders with the paper's metrics: pre_error, error and PSNR in the kept and generated regions, LPIPS,
SSIM and FID. Writes ``metrics.json``, ``metrics.md`` (one row per decoder) and ``examples.png`` to ``--outdir``.

Two modes:

reconstruction -- encode each image with the frozen encoder and decode it with the image and a fixed mask (the
paper's protocol). Masks come from the project's mask generator, seeded per image (``--seed``, image index), or from
``--mask_dir`` (``NAME_mask.png`` next to ``NAME.*``), so every decoder sees the same masks::

    python scripts/evaluate.py reconstruction --images data/val --size 256 \\
        --decoder vanilla=configs/autoencoder/autoencoder_kl_woc_32x32x4.yaml:stable_vqgan.ckpt \\
        --decoder base=configs/autoencoder/autoencoder_kl_32x32x4.yaml:base.ckpt --outdir outputs/eval

results -- images already produced (e.g. by ``inpaint_st.py``): ``--indir`` holds ``NAME.png`` + ``NAME_mask.png``
(inpaint_st.py's input), each ``--predictions LABEL=DIR`` holds ``NAME.png``. Originals and masks are resized by
inpaint_st.py's own rule (``--max_size``, sides floored to multiples of 64) so they match its outputs::

    python scripts/evaluate.py results --indir inputs --predictions vanilla=out_sd --predictions base=out_base

Images are compared in [0, 1] after 8-bit quantisation (what the saved files hold). ``pre_error`` is the per-element
mean the paper's table reports, ``pre_error_sum`` the original code's per-image sum (see ``ldm/metrics.py``). PSNR of
identical regions is ``inf``, written as the string "inf" in JSON. FID compares each decoder's set of outputs with
the set of originals. LPIPS needs torchvision's VGG16 file and FID the
torch-fidelity InceptionV3 file: when missing, the report says which file and where, and gives the other metrics.
The report is written only when every image was evaluated (atomically); a failure leaves no report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]

from ldm import metrics  # noqa: E402
from ldm.checkpoints.files import CheckpointError  # noqa: E402
from ldm.checkpoints.loading import load_model  # noqa: E402
from ldm.cli.common import pick_device, precision_scope, prepare_outdir, refuse_overlap, seed_everything  # noqa: E402
from ldm.data.inpainting import find_images  # noqa: E402
from ldm.data.masks import DEFAULT_MASK_CONFIG, MaskGenerator  # noqa: E402
from ldm.fast import FastDecode  # noqa: E402
from ldm.image_io import (  # noqa: E402
    IMAGE_EXTENSIONS,
    InputError,
    NonFiniteError,
    check_finite,
    find_pairs,
    quantize,
    read_image,
    read_mask,
    read_pair,
    to_uint8,
    write_png,
)
from ldm.latent_spaces import latent_space_of
from ldm.project import FAST_HELP  # noqa: E402
from ldm.util import WriteError, write_atomically  # noqa: E402

log = logging.getLogger("evaluate")
MASK_SUFFIX = "_mask"


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class Sample:
    """One evaluation item: ``image`` (3,H,W) in [0,1], ``mask`` (1,H,W) in {0,1} (1 = generate)."""
    name: str
    image: torch.Tensor
    mask: torch.Tensor


def parse_spec(spec: str, flag: str, with_ckpt: bool) -> Tuple[str, str, Optional[str]]:
    """``NAME=CONFIG:CKPT`` (``--decoder``) or ``NAME=DIR`` (``--predictions``) -> (name, path, ckpt)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise InputError(f"{flag} {spec!r}: expected {'NAME=CONFIG:CKPT' if with_ckpt else 'NAME=DIR'}")
    if not with_ckpt:
        return name, rest, None
    config, sep, ckpt = rest.rpartition(":")
    if not sep or not config.endswith((".yaml", ".yml")):
        # no checkpoint given: random weights are never what an evaluation wants
        raise InputError(f"{flag} {spec!r}: expected NAME=CONFIG.yaml:CKPT (config and checkpoint)")
    return name, config, ckpt


def refuse_duplicates(names: Sequence[str], flag: str) -> None:
    """Names key the report's rows: a repeated one would silently replace the earlier row."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{flag}: name(s) {', '.join(repeated)} given more than once (each name is one report row; "
                         "give every decoder its own name)")


def resize_center_crop(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C,H,W) -> (C,size,size): shorter side to ``size`` (antialiased bicubic, or nearest for masks), centre crop.
    ``size`` 0 keeps the image, cropped to multiples of 8 (the latent grid)."""
    c, h, w = x.shape
    if size == 0:
        h8, w8 = h - h % 8, w - w % 8
        top, left = (h - h8) // 2, (w - w8) // 2
        return x[:, top:top + h8, left:left + w8]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        if mode == "nearest":
            x = F.interpolate(x[None], size=(nh, nw), mode="nearest")[0]
        else:
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
            x = x.clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size]


def require_folder(path: str, flag: str) -> Path:
    """``path`` as a Path, or an InputError naming ``flag`` when it is missing or not a folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InputError(f"{flag} {path}: not found")
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: not a folder")
    return folder


def check_mask_folder(mask_dir: Path, paths: Sequence[Path]) -> None:
    """Every image has ``NAME_mask.png`` in ``mask_dir`` and every ``*_mask.png`` there has its image: counts that
    differ mean the folders do not belong together, so refuse rather than evaluate a subset silently."""
    suffix = f"{MASK_SUFFIX}.png"
    masks = {p.name[: -len(suffix)]: p for p in mask_dir.iterdir() if p.is_file() and p.name.endswith(suffix)}
    names = {p.stem: p for p in paths}
    extra, missing = sorted(masks.keys() - names.keys()), sorted(names.keys() - masks.keys())
    if extra or missing:
        problems = []
        if extra:
            problems.append(f"{len(extra)} masks without an image in --images: "
                            + ", ".join(str(masks[n]) for n in extra[:5]) + (" ..." if len(extra) > 5 else ""))
        if missing:
            problems.append(f"{len(missing)} images without a mask: "
                            + ", ".join(str(mask_dir / f"{n}{suffix}") for n in missing[:5])
                            + " not found" + (" ..." if len(missing) > 5 else ""))
        raise InputError(f"--mask_dir {mask_dir}: {len(masks)} masks for {len(names)} images; " + "; ".join(problems))


def reconstruction_samples(opt: argparse.Namespace) -> List[Sample]:
    """Images of ``--images`` (``*_mask`` files excluded) with their fixed masks, in sorted order."""
    folder = require_folder(opt.images, "--images")
    mask_dir = require_folder(opt.mask_dir, "--mask_dir") if opt.mask_dir else None
    try:
        found = find_images(folder)
    except ValueError:
        found = []
    paths = [Path(p) for p in found if not Path(p).stem.endswith(MASK_SUFFIX)]
    if not paths:
        raise InputError(f"--images {opt.images}: no images (extensions {', '.join(IMAGE_EXTENSIONS)}; "
                         f"*_mask files are not counted)")
    if mask_dir is not None:
        check_mask_folder(mask_dir, paths)
    if opt.limit:
        paths = paths[:opt.limit]
    generator = None if mask_dir is not None else MaskGenerator.from_config(opt.mask_config)
    samples, names = [], set()
    for index, path in enumerate(tqdm(paths, desc="loading images", disable=opt.quiet)):
        if path.stem in names:
            raise InputError(f"{path}: two images named {path.stem!r} (names key the masks and the report)")
        names.add(path.stem)
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)
        if mask_dir is not None:
            mask_path = mask_dir / f"{path.stem}{MASK_SUFFIX}.png"
            mask = torch.from_numpy(read_mask(mask_path) >= 0.5).float()[None]
            if mask.shape[-2:] != image.shape[-2:]:
                raise InputError(f"{mask_path}: mask is {mask.shape[-1]}x{mask.shape[-2]} but {path} is "
                                 f"{image.shape[-1]}x{image.shape[-2]}")
            image = resize_center_crop(image, opt.size, "bicubic")
            mask = resize_center_crop(mask, opt.size, "nearest")
        else:
            image = resize_center_crop(image, opt.size, "bicubic")
            # seeded by (seed, index): the same mask for every decoder and every run
            rng = np.random.default_rng([opt.seed, index])
            mask = torch.from_numpy(generator(image.shape[-2], image.shape[-1], rng))[None]
        if min(image.shape[-2:]) < 8:
            raise InputError(f"{path}: too small ({image.shape[-1]}x{image.shape[-2]}) for the 8x latent grid")
        samples.append(Sample(path.stem, quantize(image), mask.float()))
    return samples


def results_samples(opt: argparse.Namespace) -> Tuple[List[Sample], Dict[str, Dict[str, torch.Tensor]]]:
    """Originals and masks of ``--indir`` and, per ``--predictions`` label, the predicted images by name."""
    refuse_duplicates([parse_spec(s, "--predictions", with_ckpt=False)[0] for s in opt.predictions], "--predictions")
    indir = require_folder(opt.indir, "--indir")
    pairs, problems = find_pairs(indir)
    if problems:
        raise InputError("; ".join(problems))
    if not pairs:
        raise InputError(f"--indir {indir}: no NAME.png + NAME_mask.png pairs")
    if opt.limit:
        pairs = pairs[:opt.limit]
    samples = []
    for pair in tqdm(pairs, desc="loading originals", disable=opt.quiet):
        image, mask = read_pair(pair, opt.max_size)
        samples.append(Sample(pair.name, quantize(metrics.to_unit(image[0])), mask[0]))
    predictions: Dict[str, Dict[str, torch.Tensor]] = {}
    for spec in opt.predictions:
        label, folder, _ = parse_spec(spec, "--predictions", with_ckpt=False)
        folder = require_folder(folder, "--predictions")
        missing = [f"{folder / (s.name + '.png')}" for s in samples if not (folder / f"{s.name}.png").is_file()]
        if missing:
            raise InputError(f"--predictions {label}: {len(missing)} of {len(samples)} predictions missing: "
                             + ", ".join(missing[:5]))
        predictions[label] = {}
        for s in samples:
            path = folder / f"{s.name}.png"
            pred = torch.from_numpy(read_image(path)).permute(2, 0, 1)
            if pred.shape != s.image.shape:
                raise InputError(f"{path}: {pred.shape[-1]}x{pred.shape[-2]} but the original "
                                 f"{indir / (s.name + '.png')} resized by inpaint_st's rule (--max_size "
                                 f"{opt.max_size}) is {s.image.shape[-1]}x{s.image.shape[-2]}")
            predictions[label][s.name] = pred
    return samples, predictions


def batches(samples: Sequence[Sample], batch_size: int) -> Iterator[List[Sample]]:
    """Consecutive runs of same-sized samples, at most ``batch_size`` long."""
    batch: List[Sample] = []
    for s in samples:
        if batch and (len(batch) == batch_size or batch[0].image.shape != s.image.shape):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------------ metrics
def image_metrics(opt: argparse.Namespace, device: torch.device) -> metrics.ImageMetrics:
    """One decoder's accumulator of every metric (LPIPS / FID skipped, with the reason, when weights are missing)."""
    return metrics.ImageMetrics(lpips=not opt.no_lpips, fid=not opt.no_fid, lpips_vgg_path=opt.lpips_vgg,
                                fid_weights_path=opt.fid_weights, device=device)


def stack(batch: Sequence[Sample], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([s.image for s in batch]).to(device), torch.stack([s.mask for s in batch]).to(device))


# ------------------------------------------------------------------------------------------------ modes
def reconstruct(decoder: FastDecode, image: torch.Tensor, mask: torch.Tensor, opt: argparse.Namespace,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Encode the image, decode with image + mask as the prior; (B,3,H,W) in [0,1] after 8-bit quantisation."""
    model = decoder.model
    x = image * 2 - 1
    posterior = model.encode(x)
    z = posterior.sample(generator) if opt.sample_posterior else posterior.mode()
    rec = check_finite(decoder.decode(z, x, mask), "the decoded images")  # NaN must not become metrics
    return quantize(metrics.to_unit(rec.float()))


def run_reconstruction(opt: argparse.Namespace, device: torch.device):
    specs = [parse_spec(s, "--decoder", with_ckpt=True) for s in opt.decoder]
    refuse_duplicates([name for name, _, _ in specs], "--decoder")
    for name, config, ckpt in specs:
        for path, what in ((config, "config"), (ckpt, "checkpoint")):
            if not Path(path).exists():
                raise InputError(f"--decoder {name}: {what} not found: {path}")
    samples = reconstruction_samples(opt)
    results, examples = {}, {}
    for name, config, ckpt in specs:
        model = load_model(config, ckpt, device=device)
        space = latent_space_of(model)
        if opt.precision == "autocast" and device.type == "cuda" and space is not None and not space.fp16_safe:
            print(f"warning: --decoder {name}: the {space.models} VAE overflows in float16 (NaN/inf images); "
                  "use --precision full", file=sys.stderr)
        if opt.tile:
            model.enable_tiling(opt.tile, opt.tile_overlap)
        decoder = FastDecode(model, device, enabled=opt.fast)
        generator = seed_everything(opt.seed, device) if opt.sample_posterior else None
        scorer = image_metrics(opt, device)
        examples[name] = []
        with torch.inference_mode(), precision_scope(opt.precision, device):
            for batch in tqdm(list(batches(samples, opt.batch_size)), desc=f"decoder {name}", disable=opt.quiet):
                image, mask = stack(batch, device)
                try:
                    pred = reconstruct(decoder, image, mask, opt, generator)
                except NonFiniteError as e:
                    raise NonFiniteError(f"--decoder {name} ({ckpt}) on {', '.join(s.name for s in batch)}: "
                                         f"{e}") from None
                scorer.update(pred, image, mask)
                examples[name].extend(pred[:max(0, opt.n_examples - len(examples[name]))].cpu())
        results[name] = {"config": config, "checkpoint": ckpt, **scorer.summary()}
        del model
    return samples, results, examples


def run_results(opt: argparse.Namespace, device: torch.device):
    samples, predictions = results_samples(opt)
    results, examples = {}, {}
    for label, preds in predictions.items():
        scorer = image_metrics(opt, device)
        with torch.inference_mode():
            for batch in tqdm(list(batches(samples, opt.batch_size)), desc=f"predictions {label}",
                              disable=opt.quiet):
                image, mask = stack(batch, device)
                pred = torch.stack([preds[s.name] for s in batch]).to(device)
                scorer.update(pred, image, mask)
        results[label] = {"folder": dict(parse_spec(s, "--predictions", False)[:2] for s in opt.predictions)[label],
                          **scorer.summary()}
        examples[label] = [preds[s.name] for s in samples[:opt.n_examples]]
    return samples, results, examples


# ------------------------------------------------------------------------------------------------ report
def markdown_table(results: Dict[str, Dict]) -> str:
    """One row per decoder, as the paper's tables."""
    def num(v, fmt):
        if v is None:
            return "n/a"
        if isinstance(v, str) or v == float("inf"):
            return "inf"
        return format(v, fmt)

    lines = ["| decoder | images | pre_error (x1e-5) | pre_error_sum | PSNR kept (dB) | PSNR generated (dB) | "
             "MSE generated | LPIPS | SSIM | FID |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        pe = None if r["pre_error"] is None else r["pre_error"] * 1e5
        lines.append(f"| {name} | {r['n_images']} | {num(pe, '.2f')} | {num(r['pre_error_sum'], '.4g')} | "
                     f"{num(r['psnr_kept'], '.2f')} | {num(r['psnr_generated'], '.2f')} | "
                     f"{num(r['mse_generated'], '.4g')} | {num(r['lpips'], '.4f')} | {num(r['ssim'], '.4f')} | "
                     f"{num(r['fid'], '.2f')} |")
    lines.append("")
    lines.append("pre_error: squared error in the kept region (mask 0) per element, images in [0, 1] "
                 "(= pre_error_sum / (3*H*W), the magnitude of the paper's table); pre_error_sum: the original "
                 "code's per-image sum. PSNR from the mean region MSE.")
    for name, why in next(iter(results.values()))["missing"].items():
        lines.append(f"\n{name.upper()} not computed: {why}")
    return "\n".join(lines) + "\n"


def error_map(pred: torch.Tensor, target: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """(3,H,W) grey map of the absolute error, amplified ``gain`` times."""
    return ((pred - target).abs().mean(0, keepdim=True) * gain).clamp(0, 1).expand(3, -1, -1)


def example_figure(samples: Sequence[Sample], examples: Dict[str, List[torch.Tensor]], label_h: int = 14
                   ) -> np.ndarray:
    """Rows = images; columns: input, masked input (holes grey), each decoder, each decoder's error map x4."""
    names = list(examples)
    n = min(len(v) for v in examples.values()) if examples else 0
    columns = ["input", "mask"] + names + [f"|err| x4 {k}" for k in names]
    rows = []
    for i in range(n):
        s = samples[i]
        tiles = [s.image, s.image * (1 - s.mask) + 0.5 * s.mask]
        tiles += [examples[k][i] for k in names]
        tiles += [error_map(examples[k][i], s.image) for k in names]
        rows.append(torch.cat(tiles, dim=-1))
    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows]
    grid = to_uint8(torch.cat(rows, dim=-2)[None] * 2 - 1)[0]
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + label_h), "white")
    canvas.paste(Image.fromarray(grid), (0, label_h))
    draw, col_w = ImageDraw.Draw(canvas), samples[0].image.shape[-1]
    for j, text in enumerate(columns):
        draw.text((j * col_w + 2, 1), text[: max(4, col_w // 6)], fill="black")
    return np.asarray(canvas)


def write_report(outdir: Path, report: Dict, table: str, figure: Optional[np.ndarray]) -> None:
    """metrics.json (``"complete": true``) is written last: an earlier run's is removed first, so whenever a
    metrics.json exists, metrics.md and examples.png (or its absence, with ``--n_examples 0``) belong to it."""
    outdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics.json_safe(report), indent=2, allow_nan=False) + "\n"
    (outdir / "metrics.json").unlink(missing_ok=True)
    if figure is not None:
        write_png(figure, outdir / "examples.png")
    elif (outdir / "examples.png").exists():  # an earlier run's figure would show other decoders / images
        (outdir / "examples.png").unlink()
        log.info("removed %s of an earlier run (--n_examples 0)", outdir / "examples.png")
    write_atomically(outdir / "metrics.md", lambda tmp: Path(tmp).write_text(table))
    write_atomically(outdir / "metrics.json", lambda tmp: Path(tmp).write_text(text))


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)
    rec = sub.add_parser("reconstruction", help="encode + decode images with fixed masks")
    rec.add_argument("--images", required=True, help="folder of images (recursive; *_mask files are skipped)")
    rec.add_argument("--decoder", action="append", required=True, metavar="NAME=CONFIG:CKPT",
                     help="a decoder to evaluate (repeat for several: one report row each)")
    rec.add_argument("--mask_dir", help="folder with NAME_mask.png per image (default: generated masks)")
    rec.add_argument("--mask_config", default=str(DEFAULT_MASK_CONFIG), help="mask generator yaml")
    rec.add_argument("--size", type=int, default=256,
                     help="shorter side resized to SIZE, centre crop SIZExSIZE; 0 = native size (cropped to x8)")
    rec.add_argument("--sample_posterior", action="store_true",
                     help="decode a posterior sample (seeded by --seed) instead of its mode")
    rec.add_argument("--precision", choices=("full", "autocast"), default="full",
                     help="autocast = float16 on CUDA (no effect on CPU); not for SDXL's VAE, which "
                     "overflows in float16")
    rec.add_argument("--fast", action="store_true", help=FAST_HELP)
    rec.add_argument("--tile", type=int, default=0,
                     help="decode in tiles of TILE image pixels (model.enable_tiling); 0 = off")
    rec.add_argument("--tile_overlap", type=int, default=128, help="tile overlap in image pixels")
    res = sub.add_parser("results", help="score images produced elsewhere (e.g. inpaint_st.py outputs)")
    res.add_argument("--indir", required=True, help="NAME.png + NAME_mask.png (inpaint_st.py's input folder)")
    res.add_argument("--predictions", action="append", required=True, metavar="LABEL=DIR",
                     help="folder of NAME.png predictions (repeat for several)")
    res.add_argument("--max_size", type=int, default=640, help="inpaint_st.py's --max_size the outputs were made with")
    for q in (rec, res):
        q.add_argument("--outdir", required=True, help="metrics.json, metrics.md, examples.png go here")
        q.add_argument("--batch_size", type=int, default=8)
        q.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
        q.add_argument("--seed", type=int, default=0, help="mask and posterior seed")
        q.add_argument("--device", default="auto")
        q.add_argument("--n_examples", type=int, default=4, help="rows of examples.png (0 = no figure)")
        q.add_argument("--lpips_vgg", help="torchvision vgg16-397923af.pth (default: torch hub cache)")
        q.add_argument("--fid_weights", help=f"{metrics.INCEPTION_FILE} (default: torch hub cache)")
        q.add_argument("--no_lpips", action="store_true")
        q.add_argument("--no_fid", action="store_true")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
    opt = p.parse_args(argv)
    if opt.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if opt.mode == "reconstruction" and opt.size not in (0,) and (opt.size < 8 or opt.size % 8):
        p.error(f"--size {opt.size}: must be 0 or a multiple of 8")
    return opt


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opt = parse_args(argv)
    device = pick_device(opt.device)
    try:
        # the report's examples.png would become an input of the next run (and with --indir a file without a mask)
        inputs = [("--images", opt.images)] if opt.mode == "reconstruction" else [("--indir", opt.indir)]
        for flag, folder in inputs:
            refuse_overlap(opt.outdir, folder, "--outdir", flag)
        prepare_outdir(opt.outdir, create=False)  # writable: found before any model loads
        run = run_reconstruction if opt.mode == "reconstruction" else run_results
        samples, results, examples = run(opt, device)
    except (InputError, CheckpointError, OSError, ValueError) as err:  # OSError: unreadable inputs, not a folder
        print(f"error: {err}", file=sys.stderr)
        print("no report written", file=sys.stderr)
        return 2
    report = {
        "complete": True,
        "mode": opt.mode,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "images": [s.name for s in samples],
        "image_size": list(samples[0].image.shape[-2:]) if len({s.image.shape for s in samples}) == 1 else "mixed",
        "protocol": {k: v for k, v in vars(opt).items() if k not in ("quiet",)},
        "decoders": results,
    }
    table = markdown_table(results)
    figure = example_figure(samples, examples) if opt.n_examples > 0 else None
    try:
        write_report(Path(opt.outdir), report, table, figure)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {Path(opt.outdir) / 'metrics.json'}, metrics.md" + (", examples.png" if figure is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
