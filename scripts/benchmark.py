"""Decoder speed and memory: latency and peak memory of decoding (untiled and tiled) and of one training step, for
our decoder and diffusers' ``AsymmetricAutoencoderKL`` on the same weights, in the same run (so results are ratios),
with the achieved FLOP rate next to a plain matrix-multiply rate on the same machine.

    python scripts/benchmark.py --out docs/benchmark_gpu                 # GPU: base/large/large2, 256-1024, tiled 2048/4096
    python scripts/benchmark.py --device cpu --variants base --sizes 256 --tiled_sizes --out docs/benchmark_cpu_full
    python scripts/benchmark.py --device cpu --variants narrow --sizes 512 1024 --tiled_sizes 512 1024 2048 4096 \\
        --no_diffusers --no_train --out docs/benchmark_cpu_tiling      # memory flatness of tiled decoding on CPU
    python scripts/benchmark.py --quick --out /tmp/bench                  # tiny config, seconds (what the tests run)

Weights are random (speed does not depend on them). Variants: ``base`` / ``large`` / ``large2`` are the paper's decoders
(configs/autoencoder/autoencoder_kl_32x32x4*.yaml), ``sdxl_*`` / ``sd3_*`` / ``flux_*`` the same in those latent
spaces (configs/autoencoder/{sdxl,sd3,flux}/), ``asuka`` ASUKA's FLUX.1 decoder (ours only: diffusers has no such
class); ``narrow`` is the base layout at ch 32 with one block per level (for CPU curves); ``tiny`` is configs/tiny.
"condition" rows decode with image + mask (the asymmetric path), "no condition" rows decode ``z`` alone (the
text-to-image path). Latency: median of ``--repeats`` timed calls after ``--warmup``, under ``torch.inference_mode``;
the training step is the decoder's forward + backward of an L1 loss only (no LPIPS, no discriminator, no optimizer
step), so it is a lower bound on a real training step.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call; on CPU each case runs
in a fresh subprocess and reports the rise of the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
over the resident set before the first call (model weights excluded). FLOPs: ``torch.utils.flop_counter`` on the meta
device (convolutions, matmuls, attention), achieved rate = FLOPs / median latency.
Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
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

REPO = Path(__file__).resolve().parents[1]

from ldm.inference import pick_device  # noqa: E402
from ldm.modules.diffusionmodules.tiling import tiled_decode  # noqa: E402
from ldm.util import instantiate_from_config, write_atomically  # noqa: E402

CONFIGS = {
    "base": "configs/autoencoder/autoencoder_kl_32x32x4.yaml",
    "large": "configs/autoencoder/autoencoder_kl_32x32x4_large.yaml",
    "large2": "configs/autoencoder/autoencoder_kl_32x32x4_large2.yaml",
    "narrow": "configs/autoencoder/autoencoder_kl_32x32x4.yaml",  # with NARROW below
    "tiny": "configs/tiny/autoencoder_kl_tiny.yaml",
    # the other latent spaces (16 latent channels for sd3 / flux) and ASUKA's FLUX.1 decoder (no diffusers class)
    **{f"{space}_{v}": f"configs/autoencoder/{space}/asymmetric_{v}.yaml"
       for space in ("sdxl", "sd3", "flux") for v in ("base", "large", "large2")},
    "asuka": "configs/autoencoder/flux/asuka.yaml",
}
NARROW = {"ch": 32, "num_res_blocks": 1, "condition": True}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ models and inputs
def build_model(variant: str, device: Any = "cpu"):
    """Our AutoencoderKL of ``variant`` with seeded random weights (the same in every process)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(REPO / CONFIGS[variant]), resolve=True)["model"]
    if variant == "narrow":
        config["params"]["ddconfig"]["ch"] = NARROW["ch"]
        config["params"]["decoder_overrides"] = dict(NARROW)
    config["params"].pop("ckpt_path", None)
    torch.manual_seed(0)
    with torch.device(device):
        model = instantiate_from_config(config)
    return model.eval()


def to_diffusers(model):
    """diffusers ``AsymmetricAutoencoderKL`` holding ``model``'s weights (converted by ldm.diffusers_interop)."""
    import diffusers

    from ldm.diffusers_interop import ldm_to_diffusers

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
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


class PeakMemory:
    """Peak memory of a block of code, in MiB above what was in use when it started (CUDA: allocator; CPU: RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.mib = (peak - self.start) / 2 ** 20


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Wall-clock milliseconds of ``repeats`` calls after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def precision(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def count_flops(variant: str, size: int, batch: int, condition: bool, tile: Optional[int], overlap: int,
                train: bool = False) -> int:
    """FLOPs of one decode (or forward + backward) on the meta device: exact operator counts, no computation."""
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
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device, dtype: str, repeats: int) -> Dict[str, Any]:
    """A plain square matmul's rate in the run's precision: the machine's practical peak for dense work."""
    n = 8192 if device.type == "cuda" else 2048
    dt = DTYPES[dtype] if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    times = time_calls(lambda: a @ b, device, warmup=2, repeats=max(3, repeats))
    return {"n": n, "dtype": str(dt).replace("torch.", ""), "tflops": 2 * n ** 3 / (statistics.median(times) / 1e3)
            / 1e12}


# ------------------------------------------------------------------------------------------------ one case
_MODELS: Dict[tuple, Any] = {}


def cached_model(variant: str, impl: str, device: torch.device, opt_dict: Dict[str, Any]):
    """(model, downsample factor, latent channels), built once per (variant, impl) in this process; other variants
    are freed."""
    key = (variant, impl)
    if key not in _MODELS:
        for k in [k for k in _MODELS if k[0] != variant]:
            del _MODELS[k]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # weights are initialised on the device (fast on GPU); diffusers gets ours converted, so both are equal
        ours = _MODELS.get((variant, "ours"), (None,))[0] or build_model(variant, device)
        f, channels = ours.downsample_factor, ours.embed_dim
        model = ours if impl == "ours" else to_diffusers(ours).to(device)
        if opt_dict["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        if opt_dict["compile"]:
            # in place (state_dict keys unchanged); static shapes: one graph per size, as a deployment would use
            model.decoder.compile(dynamic=False)
        _MODELS[key] = (model, f, channels)
    return _MODELS[key]


def run_case(case: Dict[str, Any], opt_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one (variant, impl, condition, size, tiled, kind) case in this process."""
    device = torch.device(opt_dict["device"])
    if opt_dict["threads"]:
        torch.set_num_threads(opt_dict["threads"])
    out = dict(case)
    try:
        model, f, channels = cached_model(case["variant"], case["impl"], device, opt_dict)
        model.eval()
        z, image, mask = make_inputs(case["size"], f, opt_dict["batch"], device, channels=channels)
        if opt_dict["channels_last"]:
            image = image.contiguous(memory_format=torch.channels_last)
        tile = opt_dict["tile"] if case["tiled"] else None
        fn = decode_fn(case["impl"], model, case["condition"], tile, opt_dict["tile_overlap"])
        if case["kind"] == "train_step":
            model.train()
            model.requires_grad_(True)
            z.requires_grad_(False)

            def step():
                with precision(device, opt_dict["dtype"]):
                    loss = fn(z, image, mask).float().abs().mean()
                loss.backward()
                model.zero_grad(set_to_none=True)
            call, grad = step, contextlib.nullcontext
        else:
            def call():
                with precision(device, opt_dict["dtype"]):
                    return fn(z, image, mask)
            grad = torch.inference_mode
        with grad():
            with PeakMemory(device) as mem:
                times = time_calls(call, device, opt_dict["warmup"], opt_dict["repeats"])
        out.update(latency_ms=statistics.median(times), times_ms=[round(t, 3) for t in times], peak_mib=mem.mib)
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
    for variant in opt.variants:
        for condition in conditions:
            for size in opt.sizes:
                for impl in impls:
                    cases.append(dict(variant=variant, impl=impl, condition=condition, size=size, tiled=False,
                                      kind="decode"))
            for size in opt.tiled_sizes:  # diffusers' asymmetric VAE has no tiled decode
                cases.append(dict(variant=variant, impl="ours", condition=condition, size=size, tiled=True,
                                  kind="decode"))
        if opt.train_size:
            for impl in impls:
                cases.append(dict(variant=variant, impl=impl, condition=True, size=opt.train_size, tiled=False,
                                  kind="train_step"))
    return cases


def machine_info(device: torch.device) -> Dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        info["cpu"] = platform.processor()
    info["cpu_count"] = os.cpu_count()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


TRAIN_STEP_NOTE = ("train_step rows: the decoder's forward + backward of an L1 loss only (no LPIPS, no "
                   "discriminator, no optimizer step).")


def markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['threads']} threads)"
    s = report["settings"]
    lines = [f"Measured on {where}, torch {m['torch']}, diffusers {m['diffusers']}, {s['dtype']}, batch {s['batch']}"
             f"{', channels_last' if s['channels_last'] else ''}{', torch.compile' if s['compile'] else ''}; "
             f"tiles {s['tile']} px, overlap {s['tile_overlap']} px; plain matmul {report['matmul']['n']}^3 "
             f"{report['matmul']['dtype']}: {report['matmul']['tflops']:.2f} TFLOP/s.", "",
             *([TRAIN_STEP_NOTE, ""] if any(r["kind"] == "train_step" for r in report["results"]) else []),
             "| variant | kind | condition | size | tiled | ours ms | diffusers ms | ours / diffusers | ours peak MiB | "
             "diffusers peak MiB | GFLOP | ours TFLOP/s | % of matmul |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows: Dict[tuple, Dict[str, Dict]] = {}
    for r in report["results"]:
        key = (r["variant"], r["kind"], r["condition"], r["size"], r["tiled"])
        rows.setdefault(key, {})[r["impl"]] = r

    def cell(r, k, fmt):
        if r is None:
            return "-"
        if "error" in r:
            return "error"
        return format(r[k], fmt) if r.get(k) is not None else "-"

    for (variant, kind, cond, size, tiled), by in rows.items():
        ours, theirs = by.get("ours"), by.get("diffusers")
        ratio = "-"
        if ours and theirs and "error" not in ours and "error" not in theirs:
            ratio = f"{ours['latency_ms'] / theirs['latency_ms']:.2f}"
        rate = pct = "-"
        if ours and "error" not in ours and ours.get("gflop"):
            tf = ours["gflop"] / ours["latency_ms"]  # GFLOP / ms = TFLOP/s
            rate, pct = f"{tf:.3f}", f"{100 * tf / report['matmul']['tflops']:.0f}"
        gflop = f"{ours['gflop']:.1f}" if ours and ours.get("gflop") else "-"
        lines.append(f"| {variant} | {kind} | {'yes' if cond else 'no'} | {size} | {'yes' if tiled else 'no'} | "
                     f"{cell(ours, 'latency_ms', '.1f')} | {cell(theirs, 'latency_ms', '.1f')} | {ratio} | "
                     f"{cell(ours, 'peak_mib', '.0f')} | {cell(theirs, 'peak_mib', '.0f')} | {gflop} | {rate} | {pct} |")
    errors = [r for r in report["results"] if "error" in r]
    for r in errors:
        lines.append(f"\n- error in {r['variant']} {r['impl']} {r['kind']} {r['size']}"
                     f"{' tiled' if r['tiled'] else ''}: {r['error']}")
    return "\n".join(lines) + "\n"


def report_paths(out: str) -> Tuple[Path, Path]:
    """``--out OUT`` -> (OUT.json, OUT.md). A trailing .json / .md is taken off; any other dot is part of the name
    (``bench_v1.5`` -> ``bench_v1.5.json``, where ``Path.with_suffix`` would give ``bench_v1.json``)."""
    path = Path(out)
    if path.suffix.lower() in (".json", ".md"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".md")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=False, default="benchmark",
                   help="writes OUT.json and OUT.md (a trailing .json or .md in OUT is dropped)")
    p.add_argument("--variants", nargs="+", default=["base", "large", "large2"], choices=sorted(CONFIGS))
    p.add_argument("--sizes", nargs="*", type=int, default=[256, 512, 1024], help="untiled decode sizes (pixels)")
    p.add_argument("--tiled_sizes", nargs="*", type=int, default=[2048, 4096], help="tiled decode sizes")
    p.add_argument("--tile", type=int, default=512, help="tile size in pixels (model.enable_tiling)")
    p.add_argument("--tile_overlap", type=int, default=128, help="tile overlap in pixels")
    p.add_argument("--condition", choices=("both", "on", "off"), default="both")
    p.add_argument("--train_size", type=int, default=256,
                   help="training-step image size (0 = no training step); the step is the decoder's forward + "
                        "backward of an L1 loss only (no LPIPS, discriminator or optimizer)")
    p.add_argument("--no_train", action="store_true", help="same as --train_size 0")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="autocast dtype (fp32 = none); random weights: with real SDXL weights fp16 overflows")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (both implementations)")
    p.add_argument("--no_diffusers", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--case_timeout", type=float, default=None, help="seconds per CPU case (subprocess)")
    p.add_argument("--in_process", action="store_true", help="CPU: no subprocess per case (peak memory less exact)")
    p.add_argument("--quick", action="store_true",
                   help="tiny config, sizes 32/64, tiled 128, 1 thread, 1 repeat: checks every path in seconds")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    opt = p.parse_args(argv)
    if opt.quick:
        opt.variants, opt.sizes, opt.tiled_sizes, opt.tile, opt.tile_overlap = ["tiny"], [32, 64], [128], 64, 16
        opt.train_size, opt.warmup, opt.repeats = 32, 1, 1
        # one thread: on a shared machine, OpenMP threads waiting for each other make tiny ops 30x slower
        opt.threads = opt.threads or 1
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
                                             "tile", "tile_overlap", "threads")}
    opt_dict["device"] = str(device)
    report = {"machine": machine_info(device), "settings": dict(opt_dict),
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
        key = (case["variant"], case["size"], case["condition"], case["tiled"], case["kind"])
        if case["impl"] == "ours":
            if key not in flops_cache:
                flops_cache[key] = count_flops(case["variant"], case["size"], opt.batch, case["condition"],
                                               opt.tile if case["tiled"] else None, opt.tile_overlap,
                                               train=case["kind"] == "train_step")
            result["gflop"] = flops_cache[key] / 1e9
        report["results"].append(result)
        status = result.get("error") or f"{result['latency_ms']:.1f} ms, peak {result['peak_mib']:.0f} MiB"
        print(f"[{i + 1}/{len(cases)}] {case['variant']} {case['impl']} {case['kind']} cond={case['condition']} "
              f"{case['size']}{' tiled' if case['tiled'] else ''}: {status}", flush=True)
    json_path, md_path = report_paths(opt.out)
    text = json.dumps(report, indent=2) + "\n"
    table = markdown(report)
    write_atomically(json_path, lambda tmp: Path(tmp).write_text(text))
    write_atomically(md_path, lambda tmp: Path(tmp).write_text(table))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
