"""Decoder speed and memory: decoding (untiled and tiled), one attention call, and the whole training step, for our
decoder and diffusers' ``AsymmetricAutoencoderKL`` on the same weights, in the same run (so results are ratios), with
the achieved FLOP rate next to a plain matrix-multiply rate on the same machine.

    python scripts/benchmark.py --suite cpu --threads 2   # the CPU report, docs/reports/benchmark_cpu (27 min, 2 cores)
    python scripts/benchmark.py --suite gpu               # the GPU report, docs/reports/benchmark_gpu
    python scripts/benchmark.py --quick --out /tmp/bench  # every path on the tiny config, in one process (as the test)

Weights are random (speed does not depend on them). Variants: ``base`` / ``large`` / ``large2`` are the paper's decoders
(configs/autoencoder/autoencoder_kl_32x32x4*.yaml), ``sdxl_*`` / ``sd3_*`` / ``flux_*`` the same in those latent
spaces (configs/autoencoder/{sdxl,sd3,flux}/), ``flux2_*`` in FLUX.2's (configs/autoencoder/flux2/; ours only: a
FLUX.2 decoder with condition branch has no diffusers class), ``asuka`` ASUKA's FLUX.1 decoder (ours only: diffusers
has no such class); ``narrow`` is the base layout at ch 32 with one block per level (for CPU curves); ``tiny`` is
configs/tiny.
"condition" rows decode with image + mask (the asymmetric path), "no condition"
rows decode ``z`` alone (the text-to-image path).

Paths (``--paths``): ``eager`` = the settings of ``--dtype`` / ``--channels_last`` / ``--compile`` (default: float32,
the exact path); ``fast`` = ``ldm.fast.fast_settings`` of the device (what the scripts' ``--fast`` gives: bf16 on CPUs
with native bf16 and on GPUs, channels_last, regional compile on GPUs); ``fast_fp32`` = the fast path kept in float32
(what a CPU without bf16 gets). diffusers runs each path the same way (same dtype and memory format; on GPUs its
decoder compiled whole). Fast rows of ours report the PSNR of their 8-bit output against our float32 output.

Training step (``--train_size``): the whole step as ``AutoencoderKL.training_step`` runs it under ``main.py``: frozen
encoder (no graph), decoder forward, generator loss (L1 + LPIPS + KL + GAN term with the adaptive weight), backward,
Adam step, discriminator loss on the detached reconstruction, backward, Adam step, with the discriminator active from
the first step; ``original`` = the step as the paper's PyTorch Lightning 1.4 code ran it: a second encoder + decoder
forward for the discriminator update, and LDM's adaptive weight (``autograd.grad`` through LPIPS and the
discriminator down to the last layer, then the full backward through both again: :func:`ldm_generator_loss`).
LPIPS uses the real VGG16 file when present, else VGG16-shaped random weights (the report says which). Reported in
images/s with a per-phase breakdown.

Latency: median of ``--repeats`` timed calls after ``--warmup``, decodes under ``torch.inference_mode``. Peak memory: on
CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call; on CPU each case runs in a fresh
subprocess and reports the rise of the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over the
resident set before the first call (model weights excluded). FLOPs: ``torch.utils.flop_counter`` on the meta device
(convolutions, matmuls, attention), achieved rate = FLOPs / median latency. Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ldm.cli.common import pick_device
from ldm.fast import FastDecode, FastSettings, apply_settings, cpu_has_native_bf16, fast_settings, fast_training
from ldm.measure import PeakMemory, psnr_8bit, sync
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.diffusionmodules.tiling import tiled_decode
from ldm.modules.losses.reference import ldm_generator_loss
from ldm.project import REPO_ROOT as REPO
from ldm.project import load_yaml
from ldm.training.recipe import FUSED_ADAM_DEVICES
from ldm.util import instantiate_from_config, write_atomically

CONFIGS = {
    "base": "configs/autoencoder/autoencoder_kl_32x32x4.yaml",
    "large": "configs/autoencoder/autoencoder_kl_32x32x4_large.yaml",
    "large2": "configs/autoencoder/autoencoder_kl_32x32x4_large2.yaml",
    "narrow": "configs/autoencoder/autoencoder_kl_32x32x4.yaml",  # with NARROW below
    "tiny": "configs/tiny/autoencoder_kl_tiny.yaml",
    # the other latent spaces (16 latent channels for sd3 / flux) and ASUKA's FLUX.1 decoder (no diffusers class)
    **{f"{space}_{v}": f"configs/autoencoder/{space}/asymmetric_{v}.yaml"
       for space in ("sdxl", "sd3", "flux", "flux2") for v in ("base", "large", "large2")},
    "asuka": "configs/autoencoder/flux/asuka.yaml",
}
# variants without a diffusers class to compare with (ldm.checkpoints.diffusers refuses their export)
OURS_ONLY = {"asuka", "flux2_base", "flux2_large", "flux2_large2"}
NARROW = {"ch": 32, "num_res_blocks": 1, "condition": True}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ models and inputs
def build_model(variant: str, device: Any = "cpu"):
    """Our AutoencoderKL of ``variant`` with seeded random weights (the same in every process)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(load_yaml(REPO / CONFIGS[variant]), resolve=True)["model"]
    if variant == "narrow":
        config["params"]["ddconfig"]["ch"] = NARROW["ch"]
        config["params"]["decoder_overrides"] = dict(NARROW)
    config["params"].pop("ckpt_path", None)
    torch.manual_seed(0)
    with torch.device(device):
        model = instantiate_from_config(config)
    return model.eval()


def to_diffusers(model):
    """diffusers ``AsymmetricAutoencoderKL`` holding ``model``'s weights (converted by ldm.checkpoints.diffusers)."""
    import diffusers

    from ldm.checkpoints.diffusers import ldm_to_diffusers

    state_dict, config = ldm_to_diffusers(model.state_dict(), scaling_factor=model.scaling_factor,
                                          shift_factor=model.shift_factor)
    cls = getattr(diffusers, config.pop("_class_name"))
    vae = cls.from_config(config)
    vae.load_state_dict(state_dict)
    return vae.eval()


def make_inputs(size: int, factor: int, batch: int, device, dtype=torch.float32, channels: int = 4):
    """Latent (B,channels,size/f,size/f), image (B,3,size,size) in [-1,1], mask (B,1,size,size) with a box to
    generate."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, channels, size // factor, size // factor, generator=g)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return z.to(device, dtype), image.to(device, dtype), mask.to(device, dtype)


def decode_fn(impl: str, model, condition: bool, tile: Optional[int], overlap: int) -> Callable:
    """``f(z, image, mask) -> image`` for our model or the diffusers one, tiled (ours only) or not."""
    if impl == "ours":
        if tile:
            model.enable_tiling(tile, overlap)
        else:
            model.disable_tiling()
        return lambda z, image, mask: model.decode(z, image, mask) if condition else model.decode(z)
    if condition:
        return lambda z, image, mask: model.decode(z, image=image, mask=mask).sample
    return lambda z, image, mask: model.decode(z).sample


# ------------------------------------------------------------------------------------------------ measurement
def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Wall-clock milliseconds of ``repeats`` calls after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def precision(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def count_flops(variant: str, size: int, batch: int, condition: bool, tile: Optional[int], overlap: int,
                train: bool = False) -> Tuple[int, int]:
    """FLOPs of one decode (or forward + backward) on the meta device: exact operator counts, no computation.
    Returns (all FLOPs, the FLOPs inside the decoder's attention blocks)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(variant, device="meta")
    f = model.downsample_factor
    z, image, mask = (t.to("meta") for t in make_inputs(size, f, batch, "cpu", channels=model.embed_dim))
    if not condition:
        image = mask = None

    decode = model.decode_untiled  # the model's decode minus input validation (which reads values)

    with FlopCounterMode(display=False) as counter:
        if tile:
            out = tiled_decode(decode, z, image, mask, tile=tile // f, overlap=overlap // f, scale=f)
        elif train:
            out = decode(z, image, mask)
            out.abs().mean().backward()
        else:
            with torch.no_grad():
                out = decode(z, image, mask)
    by_module = counter.get_flop_counts()  # keyed by the module path under the called root, the decoder
    root = type(model.decoder).__name__
    attention = sum(sum(by_module.get(f"{root}.{name}", {}).values()) for name in attention_blocks(model.decoder))
    return int(counter.get_total_flops()), int(attention)


def attention_blocks(decoder: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The decoder's self-attention blocks by module path."""
    return {name: m for name, m in decoder.named_modules() if isinstance(m, AttnBlock)}


class AttentionClock:
    """Wall-clock time spent inside ``decoder``'s attention blocks while active (device synchronised at each block
    boundary): separates the attention, whose share of the work tiling changes, from the convolutions."""

    def __init__(self, decoder: torch.nn.Module, device: torch.device):
        self.device, self.ms, self.active, self._t0 = device, 0.0, False, 0.0
        for block in attention_blocks(decoder).values():
            block.register_forward_pre_hook(self._start)
            block.register_forward_hook(self._stop)

    def _start(self, *_) -> None:
        if self.active:
            sync(self.device)
            self._t0 = time.perf_counter()

    def _stop(self, *_) -> None:
        if self.active:
            sync(self.device)
            self.ms += (time.perf_counter() - self._t0) * 1e3


def matmul_tflops(device: torch.device, dtype: str, repeats: int) -> Dict[str, Any]:
    """A plain square matmul's rate in the run's precision: the machine's practical peak for dense work."""
    n = 8192 if device.type == "cuda" else 2048
    dt = DTYPES[dtype] if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    times = time_calls(lambda: a @ b, device, warmup=2, repeats=max(3, repeats))
    return {"n": n, "dtype": str(dt).replace("torch.", ""), "tflops": 2 * n ** 3 / (statistics.median(times) / 1e3)
            / 1e12}


# ------------------------------------------------------------------------------------------------ paths
def path_settings(path: str, device: torch.device, opt_dict: Dict[str, Any]) -> FastSettings:
    """The dtype / memory format / compile of a path (see the module docstring). ``eager`` keeps float32 weights
    (its ``--dtype`` is applied as autocast around the call, the way the H100 tables were measured)."""
    if path == "eager":
        return FastSettings(torch.float32, bool(opt_dict["channels_last"]), bool(opt_dict["compile"]))
    fast = fast_settings(device)
    if path == "fast_fp32":
        return dataclasses.replace(fast, dtype=torch.float32)
    return fast


def prepare_decoder(impl: str, model, settings: FastSettings, device: torch.device) -> Optional[FastDecode]:
    """Put the decoder side of ``model`` on ``settings``, in place: ours through ``ldm.fast.FastDecode`` (returned:
    what the scripts' ``--fast`` runs), diffusers' the same way by hand (its decoder compiled whole, as users of
    diffusers compile it)."""
    if impl == "ours":
        return FastDecode(model, device, settings=settings)
    for part in (model.post_quant_conv, model.decoder):
        apply_settings(part, settings)
    if settings.compile:
        model.decoder.compile(dynamic=False)
    return None


# ------------------------------------------------------------------------------------------------ training step
def build_training_loss(device: torch.device) -> Tuple[torch.nn.Module, str]:
    """The training configs' ``LPIPSWithDiscriminator`` (kl_weight 1e-6, disc_weight 0.8), with the discriminator on
    from step 0. LPIPS reads the real VGG16 file when it is there; otherwise VGG16-shaped random weights (same cost)."""
    import lpips

    from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator, default_vgg16_path

    torch.manual_seed(0)
    if default_vgg16_path().is_file():
        loss, lpips_note = LPIPSWithDiscriminator(disc_start=0, kl_weight=1e-6, disc_weight=0.8), "VGG16 weights"
    else:
        loss = LPIPSWithDiscriminator(disc_start=0, kl_weight=1e-6, disc_weight=0.8, perceptual_weight=0.0)
        loss.perceptual_weight = 1.0
        loss.perceptual_loss = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()
        loss.perceptual_loss.requires_grad_(False)
        lpips_note = f"random VGG16-shaped weights ({default_vgg16_path()} absent)"
    return loss.to(device), lpips_note


class PhaseTimer:
    """Wall-clock milliseconds per named phase of one call, device synchronised at each boundary."""

    def __init__(self, device: torch.device):
        self.device, self.ms = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


def make_train_step(model, impl: str, settings: FastSettings, device: torch.device, x, mask):
    """One training step of ``model`` (its ``loss`` attached) as ``AutoencoderKL.training_step`` does it, phase by
    phase; ``impl == "original"`` adds the second forward and LDM's adaptive weight of the paper's code.
    ``settings``: bf16 autocast, the memory format of weights and inputs, compiled decoder blocks; fused Adam as
    ``configure_optimizers`` gives it (not in the original)."""
    fast_training(model, device, settings)  # what main.py --fast does (nothing on the exact settings)
    x = x.contiguous(memory_format=model.input_memory_format)
    fused = impl != "original" and device.type in FUSED_ADAM_DEVICES  # as configure_optimizers; LDM's plain Adam
    groups = [{"params": g["params"], "lr": 1e-5 * g["lr_factor"]} for g in model.trainable_groups()]
    opt_g = torch.optim.Adam(groups, betas=(0.5, 0.9), fused=fused or None)
    opt_d = torch.optim.Adam(model.loss.discriminator.parameters(), lr=1e-5, betas=(0.5, 0.9), fused=fused or None)
    disc = model.loss.discriminator
    autocast = (torch.autocast(device.type, dtype=settings.dtype) if settings.dtype != torch.float32
                else contextlib.nullcontext())

    def forward(timer, name):
        with timer(name), autocast:
            with torch.no_grad():  # frozen encoder
                posterior = model.encode(x)
                z = posterior.sample()
            return model.decode(z, x, mask), posterior

    def step(timer: PhaseTimer) -> None:
        rec, posterior = forward(timer, "decoder forward")
        disc.requires_grad_(False)  # Lightning's toggled_optimizer: no discriminator gradients in the generator step
        with timer("generator loss"), autocast:
            if impl == "original":
                g_loss = ldm_generator_loss(model.loss, x, rec, posterior, model.get_last_layer())
            else:
                g_loss, _ = model.loss.generator_loss(x, rec, posterior, 0, last_layer=model.get_last_layer())
        with timer("generator backward"):
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
        with timer("generator Adam"):
            opt_g.step()
        disc.requires_grad_(True)
        if impl == "original":  # PL 1.4 called training_step again for the discriminator's optimizer
            rec, _ = forward(timer, "second forward")
        with timer("discriminator loss"), autocast:
            d_loss, _ = model.loss.discriminator_loss(x, rec, 0)
        with timer("discriminator backward"):
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
        with timer("discriminator Adam"):
            opt_d.step()
    return step


# ------------------------------------------------------------------------------------------------ one case
_MODELS: Dict[tuple, Any] = {}


def cached_model(variant: str, impl: str, path: str, device: torch.device, opt_dict: Dict[str, Any]):
    """(model, downsample factor, latent channels) on ``path``'s settings, built once per (variant, impl, path) in
    this process; other variants are freed. ``impl``: ours or diffusers; ``path`` "exact" is our untouched float32
    model (the PSNR reference); any other impl (the training steps) gets a model of its own."""
    key = (variant, impl, path)
    if key not in _MODELS:
        for k in [k for k in _MODELS if k[0] != variant]:
            del _MODELS[k]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # weights are initialised on the device (fast on GPU); diffusers gets ours converted, so both are equal
        ours = build_model(variant, device)
        f, channels = ours.downsample_factor, ours.embed_dim
        model = to_diffusers(ours).to(device) if impl == "diffusers" else ours  # equal weights (seeded)
        _MODELS[key] = (model, f, channels)
    return _MODELS[key]


def run_decode(case: Dict[str, Any], opt_dict: Dict[str, Any], device: torch.device, out: Dict[str, Any]) -> None:
    model, f, channels = cached_model(case["variant"], case["impl"], case["path"], device, opt_dict)
    settings = path_settings(case["path"], device, opt_dict)
    z, image, mask = make_inputs(case["size"], f, opt_dict["batch"], device, channels=channels)
    tile = opt_dict["tile"] if case["tiled"] else None
    fn = decode_fn(case["impl"], model, case["condition"], tile, opt_dict["tile_overlap"])
    reference = None
    if case["path"] != "eager" and case["impl"] == "ours" and opt_dict["psnr"]:
        exact = cached_model(case["variant"], "ours", "exact", device, opt_dict)[0]
        exact_fn = decode_fn("ours", exact, case["condition"], tile, opt_dict["tile_overlap"])
        with torch.inference_mode():
            reference = exact_fn(z, image, mask)  # our float32 output on the same weights
    if not hasattr(model, "_benchmark_fast"):  # outside inference mode: the weights stay normal tensors
        model._benchmark_fast = prepare_decoder(case["impl"], model, settings, device)
    if model._benchmark_fast is not None and case["path"] != "eager":
        fast = model._benchmark_fast
        fn = (lambda z, image, mask: fast.decode(z, image, mask)) if case["condition"] else \
            (lambda z, image, mask: fast.decode(z))
    fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
    z, mask = z.to(settings.dtype), mask.to(settings.dtype)
    image = image.to(settings.dtype).contiguous(memory_format=fmt)
    autocast = precision(device, opt_dict["dtype"]) if case["path"] == "eager" else contextlib.nullcontext()

    def call():
        with autocast:
            return fn(z, image, mask)

    clock = AttentionClock(model.decoder, device) if case.get("attention_time") else None
    with torch.inference_mode():
        with PeakMemory(device) as mem:
            warmup = case.get("warmup", opt_dict["warmup"])
            if clock is not None:
                for _ in range(warmup):
                    call()
                warmup, clock.active = 0, True
            times = time_calls(call, device, warmup, opt_dict["repeats"])
            if clock is not None:
                clock.active = False
                out["attention_ms"] = clock.ms / len(times)
        if reference is not None:
            out["psnr_db"] = psnr_8bit(call(), reference)
            out["max_abs_diff"] = float((call().float() - reference).abs().max())
    out.update(latency_ms=statistics.median(times), times_ms=[round(t, 3) for t in times], peak_mib=mem.mib,
               settings=settings.describe())


def run_attention(case: Dict[str, Any], opt_dict: Dict[str, Any], device: torch.device,
                  out: Dict[str, Any]) -> None:
    """One call of the decoder's mid-level AttnBlock on the latent of a ``size`` image: peak memory and the SDPA
    kernel that ran (from the profiler's op names)."""
    model, f, _ = cached_model(case["variant"], "ours", "eager", device, opt_dict)
    block = model.decoder.mid.attn_1
    side = case["size"] // f
    x = torch.randn(opt_dict["batch"], block.in_channels, side, side, device=device)
    with torch.inference_mode():
        with torch.profiler.profile() as prof:
            block(x[..., :8, :8])  # the kernel choice depends on layout and dtype, not on the size
        kernels = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")})
        with PeakMemory(device) as mem:
            times = time_calls(lambda: block(x), device, 0, 1)
    tokens = side * side
    out.update(latency_ms=statistics.median(times), times_ms=[round(t, 3) for t in times], peak_mib=mem.mib,
               kernel=", ".join(k.replace("aten::", "") for k in kernels),
               attention_matrix_mib=opt_dict["batch"] * tokens * tokens * 4 / 2 ** 20, tokens=tokens)


def run_train(case: Dict[str, Any], opt_dict: Dict[str, Any], device: torch.device, out: Dict[str, Any]) -> None:
    # a model of its own: the steps change its weights
    model, f, channels = cached_model(case["variant"], f"train {case['impl']}", case["path"], device, opt_dict)
    settings = path_settings(case["path"], device, opt_dict)
    model.loss, out["lpips"] = build_training_loss(device)
    model.train()
    model.decoder.gradient_checkpointing = bool(case.get("checkpointing", False))
    batch = case.get("batch", opt_dict["batch"])
    _, x, mask = make_inputs(case["size"], f, batch, device, channels=channels)
    step = make_train_step(model, case["impl"], settings, device, x, mask)
    for _ in range(opt_dict["warmup"]):
        step(PhaseTimer(device))
    timers = []
    with PeakMemory(device) as mem:
        for _ in range(opt_dict["repeats"]):
            timers.append(PhaseTimer(device))
            step(timers[-1])
    totals = [sum(t.ms.values()) for t in timers]
    i = totals.index(sorted(totals)[len(totals) // 2])  # the median step, with its own phases
    out.update(latency_ms=totals[i], times_ms=[round(t, 3) for t in totals], phases_ms=timers[i].ms,
               images_per_s=batch / (totals[i] / 1e3), peak_mib=mem.mib,
               settings=settings.describe() + (", fused Adam" if case["impl"] != "original" else ""))


def run_train_memory(case: Dict[str, Any], opt_dict: Dict[str, Any], device: torch.device,
                     out: Dict[str, Any]) -> None:
    """The training step's peak at ``case["batch"]``, with or without the decoder's gradient checkpointing, and the
    memory held between steps (weights, buffers, Adam's two moments), for the batch estimates."""
    run_train(dict(case, impl="ours", path="eager"), dict(opt_dict, warmup=1, repeats=1), device, out)
    model = _MODELS[(case["variant"], "train ours", "eager")][0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    out["static_mib"] = (held + 2 * 4 * trainable) / 2 ** 20  # float32 Adam moments


def run_loader(case: Dict[str, Any], opt_dict: Dict[str, Any], device: torch.device, out: Dict[str, Any]) -> None:
    """images/s of one loader process (decode + crop + resize + mask) over the same JPEGs, from an image folder
    (``ImageFolderInpainting``), from webdataset shards of 16 images (``WebDatasetInpainting``) or from a
    ``save_to_disk`` folder of Hugging Face ``datasets`` (``HFDatasetInpainting``)."""
    import tempfile

    import numpy as np
    import webdataset as wds
    from PIL import Image
    from torch.utils.data import DataLoader

    from ldm.data.hf_datasets import HFDatasetInpainting
    from ldm.data.inpainting import ImageFolderInpainting
    from ldm.data.shards import StreamLoader, WebDatasetInpainting

    n, side = case["images"], case["image_size"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        folder.mkdir()
        shards.mkdir()
        for i in range(n):
            small = Image.fromarray(rng.integers(0, 256, (side // 16, side * 3 // 64, 3), dtype=np.uint8))
            small.resize((side * 3 // 4, side), Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
        for start in range(0, n, 16):
            with wds.TarWriter(str(shards / f"{start // 16:05d}.tar")) as sink:
                for i in range(start, min(start + 16, n)):
                    sink.write({"__key__": f"{i:06d}", "jpg": (folder / f"{i:06d}.jpg").read_bytes()})
        if case["impl"] == "folder":
            loader = DataLoader(ImageFolderInpainting(root=folder, size=case["size"]), batch_size=8, shuffle=True)
        elif case["impl"] == "hf":
            import datasets

            files = sorted(folder.glob("*.jpg"))
            table = datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files]},
                                               features=datasets.Features({"image": datasets.Image()}))
            table.save_to_disk(str(Path(tmp) / "hf"))
            loader = DataLoader(HFDatasetInpainting(path=Path(tmp) / "hf", size=case["size"]), batch_size=8,
                                shuffle=True)
        else:
            urls = str(shards / f"{{00000..{(n - 1) // 16:05d}}}.tar")
            loader = StreamLoader(WebDatasetInpainting(urls, epoch_size=n, size=case["size"], shuffle_buffer=64),
                                  batch_size=8)
        times = []
        for _ in range(opt_dict["warmup"] + opt_dict["repeats"]):
            t0 = time.perf_counter()
            count = sum(len(batch["path"]) for batch in loader)
            times.append(time.perf_counter() - t0)
    best = sorted(times[opt_dict["warmup"]:])[len(times[opt_dict["warmup"]:]) // 2]
    out.update(latency_ms=best * 1e3, times_ms=[round(t * 1e3, 3) for t in times], images_per_s=count / best,
               peak_mib=0.0, images=count)


def batch_estimates(rows: List[Dict[str, Any]], gib: float) -> Optional[int]:
    """Largest batch whose training step fits ``gib`` GiB, from two measured batches b1 < b2 of one variant and
    setting: need(b) = static + peak(b1) + (b - b1) * (peak(b2) - peak(b1)) / (b2 - b1)."""
    rows = sorted((r for r in rows if "error" not in r), key=lambda r: r["batch"])
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    per_sample = (b["peak_mib"] - a["peak_mib"]) / (b["batch"] - a["batch"])
    room = gib * 1024 - a["static_mib"] - a["peak_mib"]
    if per_sample <= 0 or room < 0:
        return None if per_sample <= 0 else 0
    return a["batch"] + int(room // per_sample)


SCALE_NOTE = ("Training memory: peak of the whole training step (as in the training-step table, LPIPS and the "
              "discriminator included) above the memory held between steps; held = weights, buffers and Adam's two "
              "float32 moments. Batches that fit: a straight line through the two measured batches plus the held "
              "memory. On a CPU run the peak is the process's resident memory: the GPU batches are then estimated "
              "from CPU numbers (no CUDA allocator caching, no cuDNN workspaces); a GPU run measures them.")


def scale_markdown(report: Dict[str, Any]) -> str:
    """The sections of the memory and loader rows (``--memory`` / ``--loader``)."""
    results = [r for r in report["results"] if "error" not in r]
    on_gpu = "gpu" in report["machine"]
    lines = []
    memory = [r for r in results if r["kind"] == "train_memory"]
    if memory:
        lines += ["### Training memory and the batch that fits", "", SCALE_NOTE, "",
                  "| variant | size | gradient checkpointing | batch | peak MiB | held MiB | ms | batch in 24 GB | "
                  "batch in 80 GB |", "|---|---|---|---|---|---|---|---|---|"]
        groups: Dict[tuple, List[Dict[str, Any]]] = {}
        for r in memory:
            groups.setdefault((r["variant"], r["size"], r["checkpointing"]), []).append(r)
        how = "measured" if on_gpu else "estimated from the CPU peak"
        for (variant, size, ckpt), rows in groups.items():
            fits = [batch_estimates(rows, gib) for gib in (24, 80)]
            for r in rows:
                lines.append(f"| {variant} | {size} | {'on' if ckpt else 'off'} | {r['batch']} | {r['peak_mib']:.0f} | "
                             f"{r['static_mib']:.0f} | {r['latency_ms']:.0f} | {_fmt(fits[0], 'd')} ({how}) | "
                             f"{_fmt(fits[1], 'd')} ({how}) |")
        lines.append("")
    loaders = [r for r in results if r["kind"] == "loader"]
    if loaders:
        steps: Dict[str, Dict[str, Any]] = {}
        for r in results:  # the fastest of our training-step rows of each variant
            if r["kind"] == "train_step" and r["impl"] == "ours" and \
                    r["images_per_s"] > steps.get(r["variant"], {}).get("images_per_s", 0):
                steps[r["variant"]] = r
        lines += ["### Data loader", "", "images/s of one loader process (decode + crop + resize + mask) over the same "
                  "JPEGs; workers per device = the training step's images/s (ours, fastest path in this run) / the "
                  "shard loader's.", "", "| source | images | image px | size | images/s | workers per device: "
                  + ", ".join(steps) + " |", "|---|---|---|---|---|---|"]
        shard_rate = next((r["images_per_s"] for r in loaders if r["impl"] == "shards"), None)
        need = ", ".join(f"{math.ceil(s['images_per_s'] / shard_rate)}" for s in steps.values()) if shard_rate else "-"
        for r in loaders:
            lines.append(f"| {r['impl']} | {r['images']} | {r['image_size']} | {r['size']} | {r['images_per_s']:.0f} | "
                         f"{need if r['impl'] == 'shards' else '-'} |")
        lines.append("")
    return "\n".join(lines) + ("\n" if lines else "")


def run_case(case: Dict[str, Any], opt_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one (variant, impl, path, condition, size, tiled, kind) case in this process."""
    device = torch.device(opt_dict["device"])
    if opt_dict["threads"]:
        torch.set_num_threads(opt_dict["threads"])
    out = dict(case)
    try:
        {"decode": run_decode, "attention": run_attention, "train_step": run_train, "train_memory": run_train_memory,
         "loader": run_loader}[case["kind"]](
            case, opt_dict, device, out)
    except torch.cuda.OutOfMemoryError as err:
        out["error"] = f"out of memory: {str(err).splitlines()[0]}"
    except Exception as err:  # noqa: BLE001 - one failed case must not lose the others; the row says why
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def run_case_subprocess(case: Dict[str, Any], opt_dict: Dict[str, Any], timeout: Optional[float]) -> Dict[str, Any]:
    """CPU: a fresh process per case, so the resident-set peak belongs to this case alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps({"case": case, "opt": opt_dict})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**case, "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------ plan and report
def plan(opt: argparse.Namespace) -> List[Dict[str, Any]]:
    impls = ["ours"] + ([] if opt.no_diffusers else ["diffusers"])
    conditions = {"both": [True, False], "on": [True], "off": [False]}[opt.condition]
    cases = []

    def add(**case):
        cases.append(dict(dict(impl="ours", path="eager", condition=True, tiled=False, kind="decode"), **case))

    for variant in opt.variants:
        for condition in conditions:
            for size in opt.sizes:
                for path in opt.paths:
                    for impl in impls if variant not in OURS_ONLY else ["ours"]:
                        add(variant=variant, impl=impl, path=path, condition=condition, size=size)
    for variant in opt.tiled_variants or opt.variants:
        for condition in conditions:
            for size in opt.tiled_sizes:  # diffusers' asymmetric VAE has no tiled decode; untiled at the same size
                for tiled in (False, True):
                    add(variant=variant, condition=condition, size=size, tiled=tiled, warmup=opt.tiled_warmup,
                        attention_time=True)
    for size in opt.attention_sizes:
        add(variant=opt.variants[0], size=size, kind="attention")
    for variant in opt.train_variants or opt.variants:
        if opt.train_size:
            for impl, path in (("ours", "eager"), ("original", "eager"), ("ours", "fast")):
                add(variant=variant, impl=impl, path=path, size=opt.train_size, kind="train_step")
    for variant in opt.memory_variants if opt.memory else []:
        for checkpointing in (False, True):
            for batch in opt.memory_batches:
                add(variant=variant, size=opt.train_size or 256, kind="train_memory", checkpointing=checkpointing,
                    batch=batch)
    if opt.loader:
        for source in ("folder", "shards", "hf"):
            add(variant="-", impl=source, size=opt.loader_size, kind="loader", images=opt.loader_images,
                image_size=opt.loader_image_size)
    unique = []  # an untiled size listed in both --sizes and --tiled_sizes is measured once
    for case in cases:
        if case not in unique:
            unique.append(case)
    return unique


def machine_info(device: torch.device) -> Dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        info["cpu"] = platform.processor()
    info["cpu_count"] = os.cpu_count()
    info["cpu_native_bf16"] = cpu_has_native_bf16()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


TRAIN_STEP_NOTE = ("Training step: the whole step of AutoencoderKL.training_step (frozen encoder, decoder forward, "
                   "L1 + LPIPS + KL + adaptive GAN term, backward, Adam; discriminator loss, backward, Adam), the "
                   "discriminator active; ours differentiates LPIPS and the discriminator once per step (the "
                   "'generator loss' phase holds that backward, 'generator backward' the decoder's); original = the "
                   "step as the paper's code ran it: a second encoder + decoder forward for the discriminator, and "
                   "LDM's adaptive weight, which differentiates LPIPS and the discriminator twice.")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['threads']} threads)"
    s = report["settings"]
    results = [r for r in report["results"] if "error" not in r]
    lines = [f"Measured on {where}, torch {m['torch']}, diffusers {m['diffusers']}, batch {s['batch']}; "
             f"{'native' if m.get('cpu_native_bf16') else 'no native'} CPU bf16; eager path: {s['dtype']}"
             f"{', channels_last' if s['channels_last'] else ''}{', torch.compile' if s['compile'] else ''}; "
             f"fast path: {report['fast_path']}; tiles {s['tile']} px, overlap {s['tile_overlap']} px; plain matmul "
             f"{report['matmul']['n']}^3 {report['matmul']['dtype']}: {report['matmul']['tflops']:.2f} TFLOP/s; "
             f"warm-up {s['warmup']}, timed {s['repeats']}.", ""]
    if "gpu" not in m:
        lines += ["No GPU in this run: every number below is a CPU number; the GPU comparisons are "
                  "`python scripts/benchmark.py --suite gpu` on a machine with one.", ""]
    by_key: Dict[tuple, Dict[str, Dict]] = {}
    for r in results:
        by_key.setdefault((r["kind"], r["variant"], r["condition"], r["size"], r["tiled"], r["path"]),
                          {})[r["impl"]] = r

    decodes = [(k, v) for k, v in by_key.items() if k[0] == "decode" and not k[4]]
    if decodes:
        lines += ["### Decode", "",
                  "ours / diffusers compares the two run the same way; vs diffusers fp32 compares with diffusers' "
                  "eager path. PSNR: 8-bit output of the row against our float32 (eager) output.", "",
                  "| variant | condition | size | path | ours ms | diffusers ms | ours / diffusers | "
                  "ours / diffusers eager | PSNR dB | ours peak MiB | diffusers peak MiB | GFLOP | ours TFLOP/s | "
                  "% of matmul |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (kind, variant, cond, size, tiled, path), by in decodes:
            ours, theirs = by.get("ours"), by.get("diffusers")
            eager = by_key.get((kind, variant, cond, size, tiled, "eager"), {}).get("diffusers")
            ratio = ours["latency_ms"] / theirs["latency_ms"] if ours and theirs else None
            vs_eager = ours["latency_ms"] / eager["latency_ms"] if ours and eager else None
            gflop = ours.get("gflop") if ours else None
            rate = gflop / ours["latency_ms"] if gflop else None  # GFLOP / ms = TFLOP/s
            lines.append(
                f"| {variant} | {'yes' if cond else 'no'} | {size} | {path} | "
                f"{_fmt(ours and ours['latency_ms'], '.1f')} | {_fmt(theirs and theirs['latency_ms'], '.1f')} | "
                f"{_fmt(ratio, '.2f')} | {_fmt(vs_eager, '.2f')} | {_fmt(ours and ours.get('psnr_db'), '.1f')} | "
                f"{_fmt(ours and ours['peak_mib'], '.0f')} | {_fmt(theirs and theirs['peak_mib'], '.0f')} | "
                f"{_fmt(gflop, '.1f')} | {_fmt(rate, '.3f')} | "
                f"{_fmt(rate and 100 * rate / report['matmul']['tflops'], '.0f')} |")
        lines.append("")

    tiled = [(k, v["ours"]) for k, v in by_key.items() if k[0] == "decode" and k[4] and "ours" in v]
    if tiled:
        lines += ["### Tiled decoding", "",
                  "time ratio = tiled / untiled latency at the same size; FLOP ratio likewise; overhead = time ratio / "
                  "FLOP ratio (1.00 = tiling costs exactly its extra FLOPs). Tiles attend within themselves, so "
                  "tiling removes most of the attention FLOPs, and attention and convolutions run at different rates: "
                  "attention share = the untiled decode's time and FLOPs inside the attention blocks; overhead "
                  "outside attention = the same ratio of ratios with the attention blocks' measured time and "
                  "counted FLOPs taken out of both decodes.", "",
                  "| variant | condition | size | untiled ms | tiled ms | time ratio | FLOP ratio | overhead | "
                  "attention share (time / FLOPs) | overhead outside attention | untiled peak MiB | tiled peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (kind, variant, cond, size, _, path), t in tiled:
            u = by_key.get((kind, variant, cond, size, False, path), {}).get("ours")
            overhead, share, outside = tiling_overhead(u, t) if u else (None, None, None)
            lines.append(f"| {variant} | {'yes' if cond else 'no'} | {size} | {_fmt(u and u['latency_ms'], '.0f')} | "
                         f"{t['latency_ms']:.0f} | {_fmt(overhead and overhead[0], '.2f')} | "
                         f"{_fmt(overhead and overhead[1], '.2f')} | {_fmt(overhead and overhead[2], '.2f')} | "
                         f"{share or '-'} | {_fmt(outside, '.2f')} | "
                         f"{_fmt(u and u['peak_mib'], '.0f')} | {t['peak_mib']:.0f} |")
        lines.append("")

    attention = [r for r in results if r["kind"] == "attention"]
    if attention:
        lines += ["### One attention call (decoder mid block)", "",
                  "| variant | image size | tokens | SDPA kernel | peak MiB | HW x HW matrix MiB | ms |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['size']} | {r['tokens']} | {r['kernel']} | {r['peak_mib']:.0f} | "
                  f"{r['attention_matrix_mib']:.0f} | {r['latency_ms']:.0f} |" for r in attention]
        lines.append("")

    train = [r for r in results if r["kind"] == "train_step"]
    if train:
        phases = list(dict.fromkeys(p for r in train for p in r["phases_ms"]))
        lines += ["### Training step", "", TRAIN_STEP_NOTE + f" LPIPS: {train[0]['lpips']}.", "",
                  "| variant | size | step | settings | images/s | vs original | ms | " + " | ".join(phases)
                  + " | peak MiB |", "|---" * (8 + len(phases)) + "|"]
        for r in train:
            original = by_key.get(("train_step", r["variant"], True, r["size"], False, "eager"), {}).get("original")
            speedup = r["images_per_s"] / original["images_per_s"] if original else None
            lines.append(f"| {r['variant']} | {r['size']} | {r['impl']} {r['path']} | {r['settings']} | "
                         f"{r['images_per_s']:.3g} | {_fmt(speedup, '.2f')}x | {r['latency_ms']:.0f} | "
                         + " | ".join(_fmt(r["phases_ms"].get(p), ".0f") for p in phases)
                         + f" | {r['peak_mib']:.0f} |")
        lines.append("")

    for r in report["results"]:
        if "error" in r:
            lines.append(f"- error in {r['variant']} {r['impl']} {r['path']} {r['kind']} {r['size']}"
                         f"{' tiled' if r['tiled'] else ''}: {r['error']}")
    return "\n".join(lines) + "\n"


def tiling_overhead(untiled: Dict[str, Any], tiled: Dict[str, Any]):
    """((time ratio, FLOP ratio, overhead), "attention share of the untiled decode", overhead outside attention)
    of a tiled row against its untiled row; parts that were not measured are None."""
    if not untiled.get("gflop"):
        return None, None, None
    time_ratio, flop_ratio = tiled["latency_ms"] / untiled["latency_ms"], tiled["gflop"] / untiled["gflop"]
    if "attention_ms" not in untiled or "attention_ms" not in tiled:
        return (time_ratio, flop_ratio, time_ratio / flop_ratio), None, None
    share = (f"{100 * untiled['attention_ms'] / untiled['latency_ms']:.0f} % / "
             f"{100 * untiled['attention_gflop'] / untiled['gflop']:.0f} %")
    rest_time = (tiled["latency_ms"] - tiled["attention_ms"]) / (untiled["latency_ms"] - untiled["attention_ms"])
    rest_flops = (tiled["gflop"] - tiled["attention_gflop"]) / (untiled["gflop"] - untiled["attention_gflop"])
    return (time_ratio, flop_ratio, time_ratio / flop_ratio), share, rest_time / rest_flops


def report_paths(out: str) -> Tuple[Path, Path]:
    """``--out OUT`` -> (OUT.json, OUT.md). A trailing .json / .md is taken off; any other dot is part of the name
    (``bench_v1.5`` -> ``bench_v1.5.json``, where ``Path.with_suffix`` would give ``bench_v1.json``)."""
    path = Path(out)
    if path.suffix.lower() in (".json", ".md"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".md")


SUITES = {
    # the CPU report: base at 512 on every path against diffusers; tiling at 1024 and 2048 with the narrow decoder
    # (the full-size one takes about 6 minutes untiled at 2048 on 2 cores); the attention call; the training step
    # at 256 px (large2: over a minute per step on 2 cores)
    "cpu": dict(variants=["base"], condition="on", sizes=[512], paths=["eager", "fast", "fast_fp32"],
                tiled_variants=["narrow"], tiled_sizes=[1024, 2048], tile=512, tile_overlap=128,
                attention_sizes=[512, 1024], train_variants=["base", "large", "large2"], train_size=256,
                warmup=1, repeats=1, tiled_warmup=0),
    # the GPU report: the issue's comparisons (eager bf16 autocast vs the fast path, both implementations)
    "gpu": dict(variants=["base", "large2"], condition="on", sizes=[512, 1024], paths=["eager", "fast"],
                dtype="bf16", tiled_variants=["large2"], tiled_sizes=[2048], tile=512, tile_overlap=128,
                attention_sizes=[1024, 2048], train_variants=["base", "large", "large2"], train_size=256,
                warmup=3, repeats=10, tiled_warmup=1),
    # training memory with and without gradient checkpointing, batch estimates, loader throughput (train steps for
    # the workers-per-device estimate); on a GPU machine add --device cuda
    "scale": dict(variants=["base"], sizes=[], paths=["eager"], tiled_sizes=[], attention_sizes=[],
                  train_variants=["base", "large", "large2"], train_size=256, memory=True,
                  memory_variants=["base", "large", "large2"], memory_batches=[1, 2], loader=True, loader_images=256,
                  loader_image_size=512, loader_size=256, warmup=1, repeats=2),
    # the same on the tiny config in seconds (what the tests run)
    "scale_quick": dict(variants=["tiny"], sizes=[], paths=["eager"], tiled_sizes=[], attention_sizes=[],
                        train_variants=["tiny"], train_size=32, memory=True, memory_variants=["tiny"],
                        memory_batches=[1, 2], loader=True, loader_images=32, loader_image_size=64, loader_size=32,
                        warmup=0, repeats=1, no_diffusers=True),
    # every path on the tiny config (what the tests run), in one process: a fresh subprocess per case (for exact
    # CPU peak memory) would spend most of the run importing torch and diffusers again
    "quick": dict(variants=["tiny"], condition="both", sizes=[32, 64], paths=["eager", "fast"], tiled_variants=None,
                  tiled_sizes=[128], tile=64, tile_overlap=16, attention_sizes=[64], train_variants=None,
                  train_size=32, warmup=1, repeats=1, tiled_warmup=1, in_process=True),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=None,
                   help="writes OUT.json and OUT.md (a trailing .json or .md in OUT is dropped); default "
                        "docs/reports/benchmark_SUITE (benchmark_custom without --suite)")
    p.add_argument("--suite", choices=sorted(SUITES), help="a preset of the options below (given options are "
                   "overridden): cpu / gpu = the reports in docs/benchmark.md, quick = every path on the tiny config, "
                   "in one process")
    p.add_argument("--quick", action="store_true", help="same as --suite quick, on one thread")
    p.add_argument("--variants", nargs="+", default=["base", "large", "large2"], choices=sorted(CONFIGS))
    p.add_argument("--sizes", nargs="*", type=int, default=[256, 512, 1024], help="untiled decode sizes (pixels)")
    p.add_argument("--paths", nargs="+", choices=("eager", "fast", "fast_fp32"), default=["eager", "fast"],
                   help="decode paths: eager (--dtype/--channels_last/--compile), fast (ldm.fast for the device), "
                        "fast_fp32 (the fast path in float32)")
    p.add_argument("--tiled_sizes", nargs="*", type=int, default=[2048, 4096],
                   help="tiled decode sizes, each also decoded untiled for the FLOP and time ratios")
    p.add_argument("--tiled_variants", nargs="*", choices=sorted(CONFIGS), help="variants of the tiled rows "
                   "(default --variants)")
    p.add_argument("--tiled_warmup", type=int, help="warm-up calls of the tiled comparison (default --warmup)")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels (model.enable_tiling)")
    p.add_argument("--tile_overlap", type=int, default=128, help="tile overlap in pixels")
    p.add_argument("--condition", choices=("both", "on", "off"), default="both")
    p.add_argument("--attention_sizes", nargs="*", type=int, default=[1024],
                   help="image sizes of the one-attention-call memory check (first variant's mid block)")
    p.add_argument("--train_size", type=int, default=256,
                   help="training-step image size (0 = no training step); the whole step as main.py runs it")
    p.add_argument("--train_variants", nargs="*", choices=sorted(CONFIGS), help="default --variants")
    p.add_argument("--no_train", action="store_true", help="same as --train_size 0")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--memory", action="store_true", help="training memory with and without gradient checkpointing "
                   "at --memory_batches, and the batch that fits 24 / 80 GB")
    p.add_argument("--memory_variants", nargs="*", choices=sorted(CONFIGS), default=["base", "large", "large2"])
    p.add_argument("--memory_batches", nargs=2, type=int, default=[1, 2], help="the two batches measured")
    p.add_argument("--loader", action="store_true", help="images/s of the shard and datasets loaders against the "
                   "folder loader")
    p.add_argument("--loader_images", type=int, default=256, help="JPEGs written for the loader rows")
    p.add_argument("--loader_image_size", type=int, default=512, help="their long side in pixels")
    p.add_argument("--loader_size", type=int, default=256, help="the crop side the loaders produce")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="autocast dtype of the eager path; random weights: with real SDXL weights fp16 overflows")
    p.add_argument("--channels_last", action="store_true", help="channels_last on the eager path")
    p.add_argument("--compile", action="store_true", help="torch.compile on the eager path (both implementations)")
    p.add_argument("--no_psnr", dest="psnr", action="store_false",
                   help="skip the float32 reference decode that the fast rows' PSNR needs")
    p.add_argument("--no_diffusers", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--case_timeout", type=float, default=None, help="seconds per CPU case (subprocess)")
    p.add_argument("--in_process", action="store_true", help="CPU: no subprocess per case (peak memory less exact)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    opt = p.parse_args(argv)
    if opt.quick:
        opt.suite = "quick"
        # one thread: on a shared machine, OpenMP threads waiting for each other make tiny ops 30x slower
        opt.threads = opt.threads or 1
    if opt.suite:
        for k, v in SUITES[opt.suite].items():
            setattr(opt, k, v)
    if opt.out is None:
        opt.out = str(REPO / "docs" / "reports" / f"benchmark_{opt.suite or 'custom'}")
    if opt.tiled_warmup is None:
        opt.tiled_warmup = opt.warmup
    if opt.no_train:
        opt.train_size = 0
    return opt


def main(argv: Optional[Sequence[str]] = None) -> int:
    opt = parse_args(argv)
    if opt._child:
        job = json.loads(opt._child)
        print(json.dumps(run_case(job["case"], job["opt"])))
        return 0
    device = pick_device(opt.device)
    if device.type == "cpu" and opt.dtype == "fp16":
        raise SystemExit("--dtype fp16: autocast to float16 is for CUDA; use fp32 or bf16 on CPU")
    if not opt.no_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed: running without the diffusers comparison", file=sys.stderr)
            opt.no_diffusers = True
    threads_before = torch.get_num_threads()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    try:
        return _benchmark(opt, device)
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests) keep their setting


def _benchmark(opt: argparse.Namespace, device: torch.device) -> int:
    opt_dict = {k: getattr(opt, k) for k in ("batch", "dtype", "channels_last", "compile", "warmup", "repeats",
                                             "tile", "tile_overlap", "threads", "psnr")}
    opt_dict["device"] = str(device)
    report = {"machine": machine_info(device), "settings": dict(opt_dict),
              "fast_path": fast_settings(device).describe(),
              "matmul": matmul_tflops(device, opt.dtype, opt.repeats), "results": []}
    cases = plan(opt)
    flops_cache: Dict[tuple, int] = {}
    for i, case in enumerate(cases):
        if device.type == "cpu" and not opt.in_process:
            result = run_case_subprocess(case, opt_dict, opt.case_timeout)
        else:
            result = run_case(case, opt_dict)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        key = (case["variant"], case["size"], case["condition"], case["tiled"])
        if case["kind"] == "decode":
            if key not in flops_cache:
                flops_cache[key] = count_flops(case["variant"], case["size"], opt.batch, case["condition"],
                                               opt.tile if case["tiled"] else None, opt.tile_overlap)
            result["gflop"], result["attention_gflop"] = (n / 1e9 for n in flops_cache[key])
        report["results"].append(result)
        status = result.get("error") or f"{result['latency_ms']:.1f} ms, peak {result['peak_mib']:.0f} MiB"
        print(f"[{i + 1}/{len(cases)}] {case['variant']} {case['impl']} {case['path']} {case['kind']} "
              f"cond={case['condition']} {case['size']}{' tiled' if case['tiled'] else ''}: {status}", flush=True)
    json_path, md_path = report_paths(opt.out)
    text = json.dumps(report, indent=2) + "\n"
    table = markdown(report) + scale_markdown(report)
    write_atomically(json_path, lambda tmp: Path(tmp).write_text(text))
    write_atomically(md_path, lambda tmp: Path(tmp).write_text(table))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
