"""Evaluate decoders with the paper's metrics and at the mask edge: pre_error, error and PSNR in the kept and
generated regions and in a band either side of the edge, seam_error, LPIPS, SSIM and FID. Writes ``metrics.json``,
``metrics.md`` (one row per decoder), ``examples.png`` and ``boundary.png`` (a zoom on a stretch of mask edge) to
``--outdir``. docs/evaluation.md defines every number.

Two modes, each with its own flags (``evaluate.py MODE -h``):

reconstruction -- encode each image with the frozen encoder and decode it with the image and a fixed mask (the
paper's protocol). Masks come from the project's mask generator, seeded per image (``--seed``, image index), or from
``--mask_dir`` (``NAME_mask.<ext>`` per image ``NAME``), so every decoder sees the same masks::

    python scripts/evaluate.py reconstruction --images data/val --size 256 \\
        --decoder vanilla=configs/autoencoder/autoencoder_kl_woc_32x32x4.yaml:stable_vqgan.ckpt \\
        --decoder base=configs/autoencoder/autoencoder_kl_32x32x4.yaml:base.ckpt --outdir outputs/eval \\
        --baselines all --mask_coarsen 8 --extra_size 512

results -- images already produced (e.g. by ``inpaint_st.py``): ``--indir`` holds ``NAME.<ext>`` +
``NAME_mask.<ext>`` (inpaint_st.py's input), each ``--predictions LABEL=DIR`` holds ``NAME.png``. Originals and
masks are resized by inpaint_st.py's own rule (``--max_size``, sides floored to multiples of 64) so they match its
outputs::

    python scripts/evaluate.py results --indir inputs --predictions vanilla=out_sd --predictions base=out_base \\
        --outdir outputs/eval_inpaint --baselines paste

Recipes (``--baselines paste,fooocus,...`` or ``all``): for every decoder or prediction row ``X``, a row
``X+<recipe>``: X composited with the original as a tool does it (paste, a1111, fooocus, invokeai, cropandstitch,
brushnet, colormatch, poisson, laplacian; ``ldm.metrics.composite``), seeing only X, the kept pixels and the mask;
the symmetric a1111 gets another image of the set under the mask (``--other_seed``), never the original. Every row
but the reference ones gets paired per-image differences with 95 % bootstrap intervals (``*_ci``, ``--ci_seed``).
Robustness rows (reconstruction): ``--mask_coarsen F`` adds ``X[mask/F]``, the same masks at 1/F resolution,
nearest-upsampled (jagged edges); ``--extra_size S`` adds ``X[Spx]``, the images resized to S. Recipes apply to those
rows too.

Images are compared in [0, 1] after 8-bit quantisation (what the saved files hold). ``pre_error`` is the per-element
mean the paper's table reports, ``pre_error_sum`` the original code's per-image sum (see ``ldm/metrics.py``). PSNR of
identical regions is ``inf``, written as the string "inf" in JSON. FID compares each row's set of outputs with
the set of originals. LPIPS needs torchvision's VGG16 file and FID the
torch-fidelity InceptionV3 file: when missing, the report says which file and where, and gives the other metrics.
The report is written only when every image was evaluated (atomically); a failure leaves no report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from ldm import metrics
from ldm.checkpoints.files import CheckpointError
from ldm.cli.common import pick_device, precision_scope, prepare_outdir, refuse_overlap, seed_everything
from ldm.data.benchmarks import benchmark_items
from ldm.data.inpainting import find_images
from ldm.data.masks import DEFAULT_MASK_CONFIG, MaskGenerator, lama_mask_config
from ldm.fast import FastDecode
from ldm.image_io import (
    IMAGE_EXTENSIONS,
    MASK_SUFFIX,
    InputError,
    NonFiniteError,
    check_finite,
    find_pairs,
    mask_name,
    quantize,
    read_image,
    read_mask,
    read_pair,
    to_uint8,
    write_png,
)
from ldm.latent_spaces import latent_space_of
from ldm.loading import load_model
from ldm.modules.mask_edges import coarsen_mask, edge_pixels
from ldm.project import FAST_HELP
from ldm.util import WriteError, write_atomically

log = logging.getLogger("evaluate")
BASELINES = metrics.RECIPES
# the name the recipe a1111 had before every recipe had its tool's name (README's command lines still use it)
BASELINE_ALIASES = {"paste_blur": "a1111"}


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


def check_mask_folder(mask_dir: Path, paths: Sequence[Path]) -> Dict[str, Path]:
    """NAME -> mask file: every image has ``NAME_mask.<ext>`` in ``mask_dir`` (:func:`ldm.image_io.mask_name`'s
    rule) and every mask there has its image: counts that differ mean the folders do not belong together, so refuse
    rather than evaluate a subset silently."""
    masks: Dict[str, Path] = {}
    for p in sorted(mask_dir.iterdir()):
        name = mask_name(p) if p.is_file() and not p.name.startswith(".") else None
        if name is None:
            continue
        if name in masks:
            raise InputError(f"--mask_dir {mask_dir}: two masks for {name!r}: {masks[name].name}, {p.name}; keep one")
        masks[name] = p
    names = {p.stem: p for p in paths}
    extra, missing = sorted(masks.keys() - names.keys()), sorted(names.keys() - masks.keys())
    if extra or missing:
        problems = []
        if extra:
            problems.append(f"{len(extra)} masks without an image in --images: "
                            + ", ".join(str(masks[n]) for n in extra[:5]) + (" ..." if len(extra) > 5 else ""))
        if missing:
            problems.append(f"{len(missing)} images without a mask: "
                            + ", ".join(str(mask_dir / f"{n}{MASK_SUFFIX}.png") for n in missing[:5])
                            + " not found" + (" ..." if len(missing) > 5 else ""))
        raise InputError(f"--mask_dir {mask_dir}: {len(masks)} masks for {len(names)} images; " + "; ".join(problems))
    return masks


@dataclass
class Condition:
    """One evaluation condition of the reconstruction mode: the main protocol (``label`` "") or a robustness row
    (``[mask/F]``: masks coarsened F times; ``[Spx]``: images at another size)."""
    label: str
    size: int
    coarsen: int = 1


def conditions(opt: argparse.Namespace) -> List[Condition]:
    """The main protocol first, then one condition per ``--mask_coarsen`` and per ``--extra_size``."""
    out = [Condition("", opt.size)]
    out += [Condition(f"[mask/{f}]", opt.size, f) for f in opt.mask_coarsen]
    out += [Condition(f"[{s}px]", s) for s in opt.extra_size]
    return out


@dataclass
class Source:
    """An image of ``--images`` as read (3,H,W) in [0, 1], with its ``--mask_dir`` mask (1,H,W) if any."""
    name: str
    path: Path
    image: torch.Tensor
    mask: Optional[torch.Tensor]


def benchmark_sources(spec: str, limit: int = 0) -> List[Source]:
    """``--benchmark KIND=DIR`` (:func:`ldm.data.benchmarks.benchmark_items`) as sources, each with its mask. A
    BrushBench image of another size is resized to its 512 x 512 mask (bicubic, as BrushNet's evaluation does)."""
    _, items = benchmark_items(spec)
    sources = []
    for item in items[:limit or None]:
        image = torch.from_numpy(read_image(item.image_path)).permute(2, 0, 1)
        mask = item.mask if item.mask is not None else read_mask(item.mask_path)
        mask = torch.from_numpy(mask >= 0.5).float()[None]
        if mask.shape[-2:] != image.shape[-2:]:
            if item.mask_path is not None:
                raise InputError(f"{item.mask_path}: mask is {mask.shape[-1]}x{mask.shape[-2]} but {item.image_path} "
                                 f"is {image.shape[-1]}x{image.shape[-2]}")
            image = F.interpolate(image[None], size=tuple(mask.shape[-2:]), mode="bicubic", antialias=True,
                                  align_corners=False)[0].clamp(0, 1)
        sources.append(Source(item.name, item.image_path, image, mask))
    return sources


def reconstruction_sources(opt: argparse.Namespace) -> List[Source]:
    """Images of ``--images`` (mask files excluded by :func:`ldm.image_io.mask_name`'s rule) with their
    ``--mask_dir`` masks, in sorted order; or the images and masks of ``--benchmark``."""
    if opt.benchmark:
        return benchmark_sources(opt.benchmark, opt.limit)
    folder = require_folder(opt.images, "--images")
    mask_dir = require_folder(opt.mask_dir, "--mask_dir") if opt.mask_dir else None
    try:
        found = find_images(folder)
    except ValueError:
        found = []
    paths = [Path(p) for p in found if mask_name(p) is None]
    if not paths:
        raise InputError(f"--images {opt.images}: no images (extensions {', '.join(IMAGE_EXTENSIONS)}; "
                         f"NAME{MASK_SUFFIX}.<ext> files are not counted)")
    mask_files = check_mask_folder(mask_dir, paths) if mask_dir is not None else {}
    if opt.limit:
        paths = paths[:opt.limit]
    sources, names = [], set()
    for path in tqdm(paths, desc="loading images", disable=opt.quiet):
        if path.stem in names:
            raise InputError(f"{path}: two images named {path.stem!r} (names key the masks and the report)")
        names.add(path.stem)
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)
        mask = None
        if mask_dir is not None:
            mask_path = mask_files[path.stem]
            mask = torch.from_numpy(read_mask(mask_path) >= 0.5).float()[None]
            if mask.shape[-2:] != image.shape[-2:]:
                raise InputError(f"{mask_path}: mask is {mask.shape[-1]}x{mask.shape[-2]} but {path} is "
                                 f"{image.shape[-1]}x{image.shape[-2]}")
        sources.append(Source(path.stem, path, image, mask))
    return sources


def condition_samples(sources: Sequence[Source], condition: Condition, opt: argparse.Namespace) -> List[Sample]:
    """The samples of one condition: images resized to its size, masks from ``--mask_dir`` (resized, nearest) or
    the mask generator seeded by (``--seed``, image index) at that size, then coarsened."""
    generator = None if opt.mask_dir else MaskGenerator.from_config(
        lama_mask_config(opt.mask_config, condition.size) or opt.mask_config)
    samples = []
    for index, src in enumerate(sources):
        image = resize_center_crop(src.image, condition.size, "bicubic")
        if src.mask is not None:
            mask = resize_center_crop(src.mask, condition.size, "nearest")
        else:
            # seeded by (seed, index): the same mask for every decoder and every run
            rng = np.random.default_rng([opt.seed, index])
            mask = torch.from_numpy(generator(image.shape[-2], image.shape[-1], rng))[None]
        if min(image.shape[-2:]) < 8:
            raise InputError(f"{src.path}: too small ({image.shape[-1]}x{image.shape[-2]}) for the 8x latent grid")
        samples.append(Sample(src.name, quantize(image), coarsen_mask(mask.float(), condition.coarsen)))
    return samples


def reconstruction_samples(opt: argparse.Namespace) -> List[Sample]:
    """The samples of the main protocol (``--size``, masks as given or generated)."""
    return condition_samples(reconstruction_sources(opt), Condition("", opt.size), opt)


def results_samples(opt: argparse.Namespace) -> Tuple[List[Sample], Dict[str, Dict[str, torch.Tensor]]]:
    """Originals and masks of ``--indir`` (or ``--benchmark``, at their own size) and, per ``--predictions``
    label, the predicted images by name."""
    refuse_duplicates([parse_spec(s, "--predictions", with_ckpt=False)[0] for s in opt.predictions], "--predictions")
    samples = []
    if opt.benchmark:
        indir = Path(opt.benchmark.partition("=")[2])
        samples = [Sample(s.name, quantize(s.image), s.mask) for s in benchmark_sources(opt.benchmark, opt.limit)]
    else:
        indir = require_folder(opt.indir, "--indir")
        pairs, problems = find_pairs(indir)
        if problems:
            raise InputError("; ".join(problems))
        if not pairs:
            raise InputError(f"--indir {indir}: no NAME.png + NAME_mask.png pairs")
        if opt.limit:
            pairs = pairs[:opt.limit]
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
    """The accumulator of every metric for one row (LPIPS / FID skipped, with the reason, when weights are missing);
    further rows take :meth:`~ldm.metrics.ImageMetrics.fresh` copies of it (the networks are loaded once)."""
    return metrics.ImageMetrics(lpips=not opt.no_lpips, fid=not opt.no_fid, lpips_vgg_path=opt.lpips_vgg,
                                fid_weights_path=opt.fid_weights, device=device, band_px=opt.band_px,
                                blend_px=opt.blend_px)


def with_baselines(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, opt: argparse.Namespace,
                   other: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Row suffix -> output: ``""`` is ``pred`` itself, ``"+<recipe>"`` each ``--baselines`` recipe's composite
    (:func:`ldm.metrics.composite`: it sees ``pred``, the kept pixels and the mask; the symmetric recipes get
    ``other`` in the hole, :func:`ldm.metrics.other_content`), 8-bit quantised like every output."""
    out = {"": pred}
    for recipe, composite in metrics.composites(opt.baselines, pred, image, mask, other,
                                                 blur_px=opt.blur_px).items():
        out[f"+{recipe}"] = quantize(composite)
    return out


def other_images(samples: Sequence[Sample], opt: argparse.Namespace) -> Dict[str, torch.Tensor]:
    """NAME -> the content the symmetric recipes blend into that sample's hole (never its own image):
    :func:`ldm.metrics.other_content` of the set, seeded by ``--other_seed``."""
    others = metrics.other_content([s.image for s in samples], opt.other_seed)
    return {s.name: o for s, o in zip(samples, others)}


def refuse_row_collisions(names: Sequence[str], labels: Sequence[str], opt: argparse.Namespace, flag: str) -> None:
    """Row names are NAME + condition label + baseline suffix: a name such as ``a+paste`` next to ``a`` with
    ``--baselines paste`` would give two rows one name."""
    suffixes = [""] + [f"+{b}" for b in opt.baselines]
    rows = [f"{n}{c}{s}" for n in names for c in labels for s in suffixes]
    repeated = sorted({r for r in rows if rows.count(r) > 1})
    if repeated:
        raise InputError(f"{flag}: the report rows {', '.join(repeated)} would each come from two names; rename "
                         "the one that ends like a row suffix (+<recipe>, [mask/F], [Spx])")


OTHER_CONTENT = ("another image of the set, the same shift for every image (drawn from --other_seed), resized to "
                 "the image; a set of one image: that image rotated 180 degrees")


def row_info(suffix: str, opt: argparse.Namespace) -> Dict:
    """What a row is, for metrics.json: its baseline recipe (None for the output itself), the a1111 blur and what
    fills the hole for a symmetric recipe."""
    baseline = suffix[1:] or None
    info: Dict = {"baseline": baseline}
    if baseline == "a1111":
        info["blur_px"] = opt.blur_px
    if baseline in metrics.SYMMETRIC_RECIPES:
        info["other_content"] = OTHER_CONTENT
        info["other_seed"] = opt.other_seed
    return info


def stack(batch: Sequence[Sample], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([s.image for s in batch]).to(device), torch.stack([s.mask for s in batch]).to(device))


# keys with a paired interval against the row each row is compared with (its decoder's own row for X+<recipe>,
# the first decoder's for another decoder)
CI_KEYS = ("psnr_kept", "psnr_generated", "psnr_band_inner", "psnr_band_outer", "psnr_blend_outer", "seam_error",
           "boundary_gradient_error", "band_gradient_error")
# results mode: the generated region's reference is the content that was replaced; agreement with it is no quality
REPLACED_KEYS = ("psnr_generated", "psnr_band_inner", "mse_generated")


def by_hole_size(region: metrics.RegionMetricAccumulator, samples: Sequence[Sample]) -> Dict[str, Dict]:
    """The region metrics of the images in each hole-size bin (:data:`ldm.metrics.HOLE_SIZES`: small 5.7-21.5 %,
    medium 21.5-36.9 %, large > 36.9 % of the image generated), with ``n_images`` (0 for an empty bin)."""
    bins = [metrics.hole_size_bin(float((s.mask >= 0.5).float().mean())) for s in samples]
    return {name: region.summary([i for i, b in enumerate(bins) if b == name]) for name, _, _ in metrics.HOLE_SIZES}


def add_intervals(results: Dict[str, Dict], per_image: Dict[str, Dict[str, List[float]]], bases: Dict[str, str],
                  opt: argparse.Namespace) -> None:
    """``<key>_ci`` in every row but the reference ones: the paired per-image difference to row ``bases[row]``
    (:func:`ldm.metrics.paired_bootstrap`, seeded by ``--ci_seed``) and its verdict; in results mode the keys of
    :data:`REPLACED_KEYS` get no verdict word."""
    for row, base in bases.items():
        if row == base:
            continue
        for key in CI_KEYS:
            interval = metrics.paired_bootstrap(per_image[row][key], per_image[base][key], opt.ci_seed)
            entry = {"vs": base, **(interval or {"diff": None, "low": None, "high": None})}
            if opt.mode == "results" and key in REPLACED_KEYS:
                entry["verdict"] = "agreement with the replaced content, not a quality"
            else:
                entry["verdict"] = metrics.verdict(interval, key in HIGHER_IS_BETTER)
            results[row][f"{key}_ci"] = entry


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
    conds = conditions(opt)
    refuse_row_collisions([name for name, _, _ in specs], [c.label for c in conds], opt, "--decoder")
    sources = reconstruction_sources(opt)
    sets = {c.label: condition_samples(sources, c, opt) for c in conds}
    others = {c.label: other_images(sets[c.label], opt) for c in conds}
    template = image_metrics(opt, device)
    results, examples, per_image, bases = {}, {}, {}, {}
    for name, config, ckpt in specs:
        model = load_model(config, ckpt, device=device)
        space = latent_space_of(model)
        if opt.precision == "autocast" and device.type == "cuda" and space is not None and not space.fp16_safe:
            print(f"warning: --decoder {name}: the {space.models} VAE overflows in float16 (NaN/inf images); "
                  "use --precision full", file=sys.stderr)
        if opt.tile:
            model.enable_tiling(opt.tile, opt.tile_overlap)
        decoder = FastDecode(model, device, enabled=opt.fast)
        for cond in conds:
            # the same posterior samples for every condition and decoder
            generator = seed_everything(opt.seed, device) if opt.sample_posterior else None
            scorers: Dict[str, metrics.ImageMetrics] = {}
            with torch.inference_mode(), precision_scope(opt.precision, device):
                for batch in tqdm(list(batches(sets[cond.label], opt.batch_size)), desc=f"decoder {name}{cond.label}",
                                  disable=opt.quiet):
                    image, mask = stack(batch, device)
                    try:
                        pred = reconstruct(decoder, image, mask, opt, generator)
                    except NonFiniteError as e:
                        raise NonFiniteError(f"--decoder {name} ({ckpt}) on {', '.join(s.name for s in batch)}: "
                                             f"{e}") from None
                    other = torch.stack([others[cond.label][s.name] for s in batch]).to(device)
                    for suffix, out in with_baselines(pred, image, mask, opt, other).items():
                        row = f"{name}{cond.label}{suffix}"
                        scorers.setdefault(row, template.fresh()).update(out, image, mask)
                        if not cond.label:
                            kept = examples.setdefault(row, [])
                            kept.extend(out[:max(0, opt.n_examples - len(kept))].cpu())
            for row, scorer in scorers.items():
                suffix = row[len(name) + len(cond.label):]
                results[row] = {"config": config, "checkpoint": ckpt, "decoder": name, **row_info(suffix, opt),
                                "size": cond.size, "mask_coarsen": cond.coarsen, **scorer.summary()}
                per_image[row] = scorer.region.values
                bases[row] = (f"{name}{cond.label}" if suffix else f"{specs[0][0]}{cond.label}")
                results[row]["by_hole_size"] = by_hole_size(scorer.region, sets[cond.label])
        del model, decoder
    add_intervals(results, per_image, bases, opt)
    return sets[""], results, examples


def run_results(opt: argparse.Namespace, device: torch.device):
    folders = dict(parse_spec(s, "--predictions", False)[:2] for s in opt.predictions)
    refuse_row_collisions(list(folders), [""], opt, "--predictions")
    samples, predictions = results_samples(opt)
    others = other_images(samples, opt)
    template = image_metrics(opt, device)
    results, examples, per_image, bases = {}, {}, {}, {}
    first = next(iter(predictions))
    for label, preds in predictions.items():
        scorers: Dict[str, metrics.ImageMetrics] = {}
        with torch.inference_mode():
            for batch in tqdm(list(batches(samples, opt.batch_size)), desc=f"predictions {label}",
                              disable=opt.quiet):
                image, mask = stack(batch, device)
                pred = torch.stack([preds[s.name] for s in batch]).to(device)
                other = torch.stack([others[s.name] for s in batch]).to(device)
                for suffix, out in with_baselines(pred, image, mask, opt, other).items():
                    scorers.setdefault(label + suffix, template.fresh()).update(out, image, mask)
                    kept = examples.setdefault(label + suffix, [])
                    kept.extend(out[:max(0, opt.n_examples - len(kept))].cpu())
        for row, scorer in scorers.items():
            results[row] = {"folder": folders[label], "predictions": label, **row_info(row[len(label):], opt),
                            **scorer.summary()}
            per_image[row] = scorer.region.values
            bases[row] = label if row != label else first
            results[row]["by_hole_size"] = by_hole_size(scorer.region, samples)
    add_intervals(results, per_image, bases, opt)
    return samples, results, examples


# ------------------------------------------------------------------------------------------------ report
# (key, column header, format, scale): one column per metric of every row
COLUMNS = (("n_images", "images", "d", 1), ("pre_error", "pre_error (x1e-5)", ".2f", 1e5),
           ("pre_error_sum", "pre_error_sum", ".4g", 1), ("psnr_kept", "PSNR kept (dB)", ".2f", 1),
           ("psnr_generated", "PSNR generated (dB)", ".2f", 1), ("psnr_band_inner", "PSNR band in (dB)", ".2f", 1),
           ("psnr_band_outer", "PSNR band out (dB)", ".2f", 1), ("psnr_blend_outer", "PSNR blend out (dB)", ".2f", 1),
           ("seam_error", "seam_error (x1e-3)", ".2f", 1e3),
           ("boundary_gradient_error", "boundary grad (x1e-3)", ".2f", 1e3),
           ("band_gradient_error", "band grad (x1e-3)", ".2f", 1e3),
           ("mse_generated", "MSE generated", ".4g", 1), ("lpips", "LPIPS", ".4f", 1), ("ssim", "SSIM", ".4f", 1),
           ("fid", "FID", ".2f", 1))
# results mode: the same numbers, named for what they are there
RESULTS_HEADERS = {"psnr_generated": "PSNR vs replaced content (dB)",
                   "psnr_band_inner": "PSNR band in vs replaced content (dB)",
                   "mse_generated": "MSE vs replaced content"}
# the column's best value is the highest (PSNR, SSIM) or the lowest (errors, LPIPS, FID)
HIGHER_IS_BETTER = ("psnr_kept", "psnr_generated", "psnr_band_inner", "psnr_band_outer", "psnr_blend_outer", "ssim")
# the paired-difference table of metrics.md: (key, header, scale)
CI_COLUMNS = (("psnr_kept", "PSNR kept (dB)", 1), ("psnr_band_inner", "PSNR band in (dB)", 1),
              ("psnr_blend_outer", "PSNR blend out (dB)", 1), ("seam_error", "seam_error (x1e-3)", 1e3),
              ("boundary_gradient_error", "boundary grad (x1e-3)", 1e3),
              ("band_gradient_error", "band grad (x1e-3)", 1e3))


def _value(v) -> Optional[float]:
    """A report number as a float (``"inf"`` strings included), None when not computed or nan."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def best_rows(results: Dict[str, Dict], mode: str = "reconstruction") -> List[str]:
    """One entry per metric: the row(s) with the best value (ties listed together). Compare only rows of one
    condition (the same images and masks): callers pass one group at a time. In results mode the agreement with
    the replaced content ranks nothing."""
    lines = []
    for key, header, _, _ in COLUMNS[1:]:
        if key == "pre_error_sum" or (mode == "results" and key in REPLACED_KEYS):
            continue  # the same ranking as pre_error; not a quality
        values = {name: _value(r.get(key)) for name, r in results.items()}
        values = {k: v for k, v in values.items() if v is not None}
        if len(values) < 2:
            continue
        best = max(values.values()) if key in HIGHER_IS_BETTER else min(values.values())
        winners = [k for k, v in values.items() if v == best]
        lines.append(f"{header.split(' (')[0]}: {', '.join(winners)}")
    return lines


RECIPE_LINES = {
    "paste": "the original pasted where the mask keeps (diffusers' apply_overlay)",
    "a1111": "AUTOMATIC1111's mask blur, a Gaussian of sigma {blur_px:g} px, symmetric: other content in the hole",
    "fooocus": "Fooocus' 32 px linear ramp outward",
    "invokeai": "InvokeAI's 16 px cubic distance fade outward",
    "cropandstitch": "Inpaint-CropAndStitch's blend 32: dilate 13 px, sigma 4 twice, symmetric: other content in "
                     "the hole",
    "brushnet": "BrushNet's 1 - (1 - m)(1 - G21(m)), outward",
    "colormatch": "Lab mean/std of X matched to the original over the kept pixels, then pasted",
    "poisson": "Poisson blending: X's gradients in the hole, the kept pixels as boundary",
    "laplacian": "multi-band (Laplacian pyramid) blend through the mask",
}


def markdown_table(results: Dict[str, Dict], band_px: int = metrics.DEFAULT_BAND_PX,
                   blur_px: Optional[float] = None, mode: str = "reconstruction",
                   blend_px: int = metrics.DEFAULT_BLEND_PX) -> str:
    """One row per decoder / prediction folder, baseline and condition, as the paper's tables, then the best
    row per column, the paired differences with their intervals and the definitions. In results mode the
    generated region's columns are named for what they are there (agreement with the replaced content)."""
    def num(v, fmt, scale):
        v = _value(v)
        if v is None:
            return "n/a"
        if math.isinf(v):
            return "inf"
        return format(int(v) if fmt == "d" else v * scale, fmt)

    headers = [RESULTS_HEADERS.get(k, h) if mode == "results" else h for k, h, _, _ in COLUMNS]
    lines = ["| row | " + " | ".join(headers) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(num(r.get(k), fmt, scale) for k, _, fmt, scale in COLUMNS) + " |")
    lines.append("")
    groups: Dict[Tuple, Dict[str, Dict]] = {}
    for name, r in results.items():  # rows of one condition see the same images and masks
        groups.setdefault((r.get("size"), r.get("mask_coarsen", 1)), {})[name] = r
    for (size, coarsen), rows in groups.items():
        best = best_rows(rows, mode)
        if best:
            which = [] if size is None else [f"{size} px" if size else "native size"]
            which += [f"masks coarsened {coarsen}x"] if coarsen > 1 else []
            lines.append(f"Best per column{' (' + ', '.join(which) + ')' if which else ''}: " + "; ".join(best) + ".")
            lines.append("")
    lines += interval_table(results, mode)
    lines += hole_size_table(results, mode)
    recipes = [r.get("baseline") for r in results.values() if r.get("baseline")]
    described = "; ".join(f"X+{name}: " + RECIPE_LINES[name].format(blur_px=blur_px or metrics.A1111_BLUR_PX)
                          for name in dict.fromkeys(recipes))
    generated = ("PSNR vs replaced content / band in vs replaced content: the generated region and its rim "
                 "against the content that was replaced there, a distance, not a quality; " if mode == "results"
                 else "")
    lines.append("pre_error: squared error in the kept region (mask 0) per element, images in [0, 1] "
                 "(= pre_error_sum / (3*H*W), the magnitude of the paper's table); pre_error_sum: the original "
                 "code's per-image sum. PSNR from the mean region MSE. Band in / out: the generated pixels within "
                 f"{band_px} px (chessboard) of a kept pixel / the kept pixels within {band_px} px of a generated "
                 f"one; blend out: the kept pixels within {blend_px} px. " + generated + "seam_error: mean |step of "
                 "the output - step of the original| over the pixel pairs across the mask edge; boundary grad: "
                 "mean |Sobel gradient of the output - of the original| on the edge pixels (MISATO); band grad: the "
                 f"same over every pixel within {blend_px} px of the edge, both sides, where recipes blend. Every "
                 "X+recipe row sees only X, the kept pixels and the mask"
                 + (f" ({described})" if described else "")
                 + ". X[mask/F]: masks coarsened F times; X[Spx]: images at S px. docs/evaluation.md defines each.")
    for name, why in next(iter(results.values()))["missing"].items():
        lines.append(f"\n{name.upper()} not computed: {why}")
    return "\n".join(lines) + "\n"


def hole_size_table(results: Dict[str, Dict], mode: str) -> List[str]:
    """Per row and hole-size bin: images, PSNR kept, PSNR band in, seam_error (x1e-3)."""
    rows = [(name, r["by_hole_size"]) for name, r in results.items() if "by_hole_size" in r]
    if not rows:
        return []
    band = "band in vs replaced" if mode == "results" else "band in"
    lines = ["By hole size (share of the image generated: small 5.7-21.5 %, medium 21.5-36.9 %, large > 36.9 %; "
             f"per bin: images, PSNR kept, PSNR {band} (dB), seam_error (x1e-3)):", "",
             "| row | " + " | ".join(name for name, _, _ in metrics.HOLE_SIZES) + " |",
             "|---" * (len(metrics.HOLE_SIZES) + 1) + "|"]

    def cell(b):
        if not b.get("n_images"):
            return "0"
        parts = [_value(b.get(k)) for k in ("psnr_kept", "psnr_band_inner", "seam_error")]
        text = ["inf" if v is not None and math.isinf(v) else "n/a" if v is None else f"{v * s:.2f}"
                for v, s in zip(parts, (1, 1, 1e3))]
        return f"{b['n_images']}: " + " / ".join(text)

    for name, bins in rows:
        lines.append(f"| {name} | " + " | ".join(cell(bins[b]) for b, _, _ in metrics.HOLE_SIZES) + " |")
    return lines + [""]


def interval_table(results: Dict[str, Dict], mode: str = "reconstruction") -> List[str]:
    """The ``*_ci`` entries as a table: per row, against the row it is compared with, the mean per-image
    difference, its 95 % bootstrap interval and the verdict ("wins" / "loses" only where the interval excludes 0)."""
    rows = [(name, r) for name, r in results.items() if any(f"{k}_ci" in r for k, _, _ in CI_COLUMNS)]
    if not rows:
        return []

    def cell(entry, scale):
        if not entry or entry.get("diff") is None:
            return "n/a"
        return (f"{entry['diff'] * scale:+.2f} [{entry['low'] * scale:+.2f}, {entry['high'] * scale:+.2f}] "
                f"{entry['verdict']}")

    n = next((e["n"] for _, r in rows for k, _, _ in CI_COLUMNS if (e := r.get(f"{k}_ci")) and e.get("n")), None)
    lines = [f"Paired differences, row minus the row it is compared with: mean over {n} images, 95 % bootstrap "
             f"interval ({metrics.CI_RESAMPLES} resamples of the images), and a verdict only where the interval "
             "excludes 0:", "",
             "| row | vs | " + " | ".join(RESULTS_HEADERS.get(k, h) if mode == "results" else h
                                          for k, h, _ in CI_COLUMNS) + " |",
             "|---" * (len(CI_COLUMNS) + 2) + "|"]
    for name, r in rows:
        vs = next(r[f"{k}_ci"]["vs"] for k, _, _ in CI_COLUMNS if f"{k}_ci" in r)
        lines.append(f"| {name} | {vs} | " + " | ".join(cell(r.get(f"{k}_ci"), s) for k, _, s in CI_COLUMNS) + " |")
    return lines + [""]


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


def boundary_window(samples: Sequence[Sample], n: int, crop: int) -> Optional[Tuple[int, int, int]]:
    """(image index, top, left) of the ``crop`` x ``crop`` window, among the first ``n`` images, that holds the
    most mask-edge pixels (the first such window in reading order); None when no image has an edge."""
    best, where = 0, None
    for i in range(n):
        edge = edge_pixels(samples[i].mask[0]).float()[None, None]
        size = min(crop, *edge.shape[-2:])
        counts = F.avg_pool2d(edge, size, stride=1) * size * size
        value = float(counts.max())
        if value > best:
            flat = int(counts.flatten().argmax())
            best, where = value, (i, flat // counts.shape[-1], flat % counts.shape[-1])
    return where


def boundary_figure(samples: Sequence[Sample], examples: Dict[str, List[torch.Tensor]], crop: int = 32,
                    zoom_px: int = 128, label_w: int = 150) -> Optional[np.ndarray]:
    """A zoom on a stretch of mask edge: the window of :func:`boundary_window`, nearest-upscaled to about
    ``zoom_px``; first line the original and the masked original (holes grey, edge pixels red), then one line per
    row: its output and its |error| x4 (every error map on one scale, as in examples.png)."""
    n = min((len(v) for v in examples.values()), default=0)
    where = boundary_window(samples, n, crop)
    if where is None:
        return None
    i, top, left = where
    s = samples[i]
    size = min(crop, *s.image.shape[-2:])
    zoom = max(1, zoom_px // size)

    def cut(x):
        x = x[:, top:top + size, left:left + size]
        return x.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1)

    edge = edge_pixels(s.mask[0])[None].float()
    masked = s.image * (1 - s.mask) + 0.5 * s.mask
    masked = masked * (1 - edge) + edge * torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    lines = [("original / mask edge", [s.image, masked])]
    lines += [(name, [examples[name][i], error_map(examples[name][i], s.image)]) for name in examples]
    tile = size * zoom
    gap = 4
    canvas = Image.new("RGB", (label_w + 2 * tile + gap, len(lines) * (tile + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (text, tiles) in enumerate(lines):
        y = j * (tile + gap)
        for k, t in enumerate(tiles):
            canvas.paste(Image.fromarray(to_uint8(cut(t)[None] * 2 - 1)[0]), (label_w + k * (tile + gap), y))
        draw.text((2, y + 2), text[:label_w // 6], fill="black")
    draw.text((2, canvas.height - 12), f"{s.name} y{top} x{left} x{zoom}", fill="grey")
    return np.asarray(canvas)


FIGURES = ("examples.png", "boundary.png")


def write_report(outdir: Path, report: Dict, table: str, figures: Dict[str, Optional[np.ndarray]]) -> None:
    """metrics.json (``"complete": true``) is written last: an earlier run's is removed first, so whenever a
    metrics.json exists, metrics.md and the figures of :data:`FIGURES` (or their absence, with ``--n_examples 0``
    or no mask edge) belong to it."""
    outdir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics.json_safe(report), indent=2, allow_nan=False) + "\n"
    (outdir / "metrics.json").unlink(missing_ok=True)
    for name in FIGURES:
        figure = figures.get(name)
        if figure is not None:
            write_png(figure, outdir / name)
        elif (outdir / name).exists():  # an earlier run's figure would show other decoders / images
            (outdir / name).unlink()
            log.info("removed %s of an earlier run", outdir / name)
    write_atomically(outdir / "metrics.md", lambda tmp: Path(tmp).write_text(table))
    write_atomically(outdir / "metrics.json", lambda tmp: Path(tmp).write_text(text))


# ------------------------------------------------------------------------------------------------ CLI
MODE_PURPOSE = {"reconstruction": "encodes and decodes the images of --images itself",
                "results": "scores images already made elsewhere and decodes nothing"}


def baseline_list(text: str) -> Tuple[str, ...]:
    """``--baselines paste,fooocus`` -> ("paste", "fooocus"); ``all`` -> every recipe; ``paste_blur`` is
    ``a1111``; unknown names refused."""
    names = tuple(BASELINE_ALIASES.get(n.strip(), n.strip()) for n in text.split(",") if n.strip())
    if "all" in names:
        names = tuple(n for n in names if n != "all") + BASELINES
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(BASELINES)}, or all")
    return tuple(dict.fromkeys(names))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)
    rec = sub.add_parser("reconstruction", help="encode + decode images with fixed masks")
    rec.add_argument("--images", help="folder of images (recursive; NAME_mask.<ext> files skipped); or --benchmark")
    rec.add_argument("--decoder", action="append", required=True, metavar="NAME=CONFIG:CKPT",
                     help="a decoder to evaluate (repeat for several: one report row each)")
    rec.add_argument("--mask_dir", help="folder with NAME_mask.<ext> per image (default: generated masks)")
    rec.add_argument("--mask_config", default=str(DEFAULT_MASK_CONFIG),
                     help="mask generator: a yaml, or LaMa's evaluation sets thin, medium, thick (the 256 or 512 "
                     "settings, whichever is nearer to --size) or thin_256 ... thick_512")
    rec.add_argument("--seed", type=int, default=0, help="mask and posterior seed")
    rec.add_argument("--size", type=int, default=256,
                     help="shorter side resized to SIZE, centre crop SIZExSIZE; 0 = native size (cropped to x8)")
    rec.add_argument("--mask_coarsen", type=int, action="append", default=[], metavar="F",
                     help="robustness rows X[mask/F]: the same masks drawn on a grid F times coarser and "
                     "nearest-upsampled (jagged edges); repeat for several")
    rec.add_argument("--extra_size", type=int, action="append", default=[], metavar="S",
                     help="robustness rows X[Spx]: the images resized to S (a multiple of 8) instead of --size, "
                     "e.g. a size other than the training one; repeat for several")
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
    res.add_argument("--indir", help="NAME.<ext> + NAME_mask.<ext> (inpaint_st.py's input folder); or --benchmark")
    res.add_argument("--predictions", action="append", required=True, metavar="LABEL=DIR",
                     help="folder of NAME.png predictions (repeat for several)")
    res.add_argument("--max_size", type=int, default=640, help="inpaint_st.py's --max_size the outputs were made with")
    for q in (rec, res):
        q.add_argument("--benchmark", metavar="KIND=DIR",
                       help="a benchmark's images and masks instead of --images / --indir: misato=DIR (DIR/image/"
                       "NNNN.png + DIR/mask/NNNN.png), brushbench=DIR or brushbench_outside=DIR (DIR/mapping_file"
                       ".json, inside or outside masks); predictions are named by its image names / keys")
        q.add_argument("--outdir", required=True, help="metrics.json, metrics.md, examples.png, boundary.png go here")
        q.add_argument("--baselines", type=baseline_list, default=(), metavar="RECIPE,...|all",
                       help="add a row X+RECIPE for every row X: X composited with the original by a tool's recipe, "
                       "seeing only X, the kept pixels and the mask (" + ", ".join(BASELINES) + "; all = every "
                       "one; paste_blur = a1111); docs/evaluation.md defines each")
        q.add_argument("--blur_px", type=float, default=metrics.A1111_BLUR_PX, metavar="R",
                       help="a1111's mask blur: a Gaussian of sigma R px, kernel 2*int(2.5R+0.5)+1 taps, "
                       "borders reflected (cv2.GaussianBlur as AUTOMATIC1111 calls it)")
        q.add_argument("--other_seed", type=int, default=0,
                       help="the symmetric recipes (a1111, cropandstitch) blend into the hole's rim other "
                       "content, never the original: another image of the set, the shift drawn from this seed")
        q.add_argument("--ci_seed", type=int, default=0, help="seed of the bootstrap intervals")
        q.add_argument("--band_px", type=int, default=metrics.DEFAULT_BAND_PX, metavar="K",
                       help="width of the bands either side of the mask edge (chessboard distance) for the band PSNRs")
        q.add_argument("--blend_px", type=int, default=metrics.DEFAULT_BLEND_PX, metavar="W",
                       help="width of the blend band either side of the edge, where recipes blend: "
                       "band_gradient_error and PSNR blend out")
        q.add_argument("--batch_size", type=int, default=8)
        q.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
        q.add_argument("--device", default="auto")
        q.add_argument("--n_examples", type=int, default=4,
                       help="rows of examples.png; boundary.png zooms on one of them (0 = no figures)")
        q.add_argument("--lpips_vgg", help="torchvision vgg16-397923af.pth (default: torch hub cache)")
        q.add_argument("--fid_weights", help=f"{metrics.INCEPTION_FILE} (default: torch hub cache)")
        q.add_argument("--no_lpips", action="store_true")
        q.add_argument("--no_fid", action="store_true")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
    opt, unknown = p.parse_known_args(argv)
    if unknown:
        # a flag of the other mode: say so, rather than argparse's bare "unrecognized arguments"
        other = "results" if opt.mode == "reconstruction" else "reconstruction"
        own = (rec if opt.mode == "reconstruction" else res)._option_string_actions
        theirs = (res if opt.mode == "reconstruction" else rec)._option_string_actions
        for arg in unknown:
            flag = arg.split("=", 1)[0]
            if flag in theirs and flag not in own:
                p.error(f"{flag} is a flag of `evaluate.py {other}`, not of `{opt.mode}`: {opt.mode} mode "
                        f"{MODE_PURPOSE[opt.mode]} (see `evaluate.py {opt.mode} -h`)")
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    source = "--images" if opt.mode == "reconstruction" else "--indir"
    if bool(getattr(opt, source[2:])) == bool(opt.benchmark):
        p.error(f"give one of {source} and --benchmark")
    if opt.benchmark and getattr(opt, "mask_dir", None):
        p.error("--mask_dir: a --benchmark brings its own masks")
    if opt.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if opt.limit < 0:  # paths[:-1] would drop the last image and still call the report complete
        p.error(f"--limit {opt.limit}: must be >= 0 (0 = all images)")
    if opt.band_px < 1:
        p.error(f"--band_px {opt.band_px}: must be >= 1")
    if opt.blend_px < 1:
        p.error(f"--blend_px {opt.blend_px}: must be >= 1")
    if opt.blur_px <= 0 or not math.isfinite(opt.blur_px):
        p.error(f"--blur_px {opt.blur_px}: must be a positive number of pixels")
    if opt.mode == "reconstruction":
        for size in [opt.size] + opt.extra_size:
            if size != 0 and (size < 8 or size % 8):
                p.error(f"--size/--extra_size {size}: must be 0 or a multiple of 8")
        if opt.size in opt.extra_size or len(set(opt.extra_size)) < len(opt.extra_size):
            p.error(f"--extra_size {opt.extra_size}: each must differ from --size {opt.size} and from the others")
        if any(f < 2 for f in opt.mask_coarsen) or len(set(opt.mask_coarsen)) < len(opt.mask_coarsen):
            p.error(f"--mask_coarsen {opt.mask_coarsen}: each factor must be >= 2 and given once")
    return opt


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opt = parse_args(argv)
    device = pick_device(opt.device)
    try:
        # the report's figures would become inputs of the next run (and with --indir files without a mask)
        inputs = [("--images", opt.images)] if opt.mode == "reconstruction" else [("--indir", opt.indir)]
        if opt.benchmark:
            inputs = [("--benchmark", opt.benchmark.partition("=")[2] or ".")]
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
    table = markdown_table(results, opt.band_px, opt.blur_px, opt.mode, opt.blend_px)
    figures: Dict[str, Optional[np.ndarray]] = {}
    if opt.n_examples > 0:
        figures["examples.png"] = example_figure(samples, examples)
        figures["boundary.png"] = boundary_figure(samples, examples)
    try:
        write_report(Path(opt.outdir), report, table, figures)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    written = ["metrics.md"] + [name for name in FIGURES if figures.get(name) is not None]
    print(f"wrote {Path(opt.outdir) / 'metrics.json'}, " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
