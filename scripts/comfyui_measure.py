"""Measurements of the ComfyUI nodes (docs/comfyui.md quotes them).

``memory``: the peak of a decode's live tensors at 512^2 / 1024^2 / 2048^2, tiled (512-pixel tiles, overlap 64)
and not, against the node's estimate (``ComfyFirstStage.memory_used_decode``, the bytes ComfyUI reserves and
splits batches by). The decode runs on the meta device: the same operators and shapes as a real decode, no
arithmetic, so it takes seconds on any machine; every tensor an operator returns is counted from its creation to
its release (its storage's bytes, views not twice). Weights are counted apart; operator-internal scratch (e.g.
cuDNN workspaces) is not seen, nor allocator rounding; attention is counted as the fused kernel PyTorch's
``scaled_dot_product_attention`` runs on CUDA and CPU (its output; the unfused math path would add batch x N^2
floats, N = latent pixels: 16 GiB at 2048^2). ``--check-real SIZE`` also decodes once for real on the
CPU and reports the process's peak resident memory growth, as a cross-check of the count.

``time-decode`` (imports ComfyUI: its folder on ``PYTHONPATH``; run it on an idle machine): our decode node against
ComfyUI's own ``VAEDecode`` on the same latent with the same vanilla SD VAE weights (random, SD's full layout), side
by side in one process: each repeat runs both, alternating; the medians are printed with the largest pixel
difference between the two outputs (the same weights and no condition branch: float rounding). The wall time of
one workflow through ComfyUI's server is printed by tests/integrations/test_comfyui_server.py (``-s``;
``ASYMMETRIC_VAE_WORKFLOW_SIZE`` / ``_STEPS`` set the image side and sampling steps of its SD 1.5 run, default 64
and 1).

    python scripts/comfyui_measure.py memory --decoders base larger2
    PYTHONPATH=~/ComfyUI python scripts/comfyui_measure.py time-decode --size 512 --repeats 3
    ASYMMETRIC_VAE_WORKFLOW_SIZE=512 ASYMMETRIC_VAE_WORKFLOW_STEPS=20 COMFYUI_DIR=~/ComfyUI \
        python -m pytest -s -q tests/integrations/test_comfyui_server.py -k sd15_workflow
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

VANILLA = "configs/autoencoder/autoencoder_kl_woc_32x32x4.yaml"  # SD's KL-f8 VAE, no condition branch
CONFIGS = {"base": "configs/autoencoder/autoencoder_kl_32x32x4.yaml",
           "larger2": "configs/autoencoder/autoencoder_kl_32x32x4_large2.yaml"}
GIB = 2 ** 30


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the storages operators return while they are alive; ``peak`` is the largest total."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict = {}  # storage key -> [tensors alive that use it, bytes]

    def _release(self, key):
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.refs:
                    self.refs[key] = [0, t.untyped_storage().nbytes()]
                    self.live += self.refs[key][1]
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out


def build(name: str, device: str):
    from ldm.project import load_yaml
    from ldm.util import instantiate_from_config

    config = load_yaml(REPO / CONFIGS[name]).model
    with torch.device(device):
        return instantiate_from_config(config).eval()


def peak_of_decode(model, size: int, tile: int | None, device: str = "meta") -> int:
    from ldm.integrations import comfyui

    f = model.downsample_factor
    z = torch.zeros(1, model.embed_dim, size // f, size // f, device=device)
    pixels = torch.zeros(1, size, size, 3, device=device)
    mask = torch.zeros(1, size, size, device=device)
    counter = LiveTensorBytes()
    check_finite, sdpa = comfyui.check_finite, torch.nn.functional.scaled_dot_product_attention
    if device == "meta":  # attention as the fused kernel SDPA runs on CUDA and CPU: its output, no N x N matrix
        torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, **kw: q.new_empty(
            (*q.shape[:-1], v.shape[-1]))
    if device == "meta":  # meta tensors hold no values to check: the value checks are skipped (they allocate little)
        comfyui.check_finite = lambda t, what: t
        b = z.shape[0]
        model.check_decode_inputs = lambda z, image, mask: ((image.expand(b, -1, -1, -1), mask.expand(b, -1, -1, -1))
                                                            if model.decoder.has_condition else (None, None))
    try:
        with counter, torch.no_grad():
            comfyui.decode_with_prior(model, z, pixels, mask, tile_size=tile, overlap=64)
    except NotImplementedError as e:  # the decoded image's final copy to the CPU: nothing to copy from meta
        if device != "meta" or "meta tensor" not in str(e):
            raise
    finally:
        comfyui.check_finite, torch.nn.functional.scaled_dot_product_attention = check_finite, sdpa
        model.__dict__.pop("check_decode_inputs", None)
    return counter.peak


def memory(opt) -> None:
    from ldm.integrations.comfyui import ComfyFirstStage

    rows = []
    for name in opt.decoders:
        model = build(name, "meta")
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        stage = ComfyFirstStage(model)
        for size in opt.sizes:
            for tile in (None, 512):
                f = model.downsample_factor
                latent = (1, model.embed_dim, size // f, size // f)
                shape = latent if tile is None else (1, model.embed_dim, min(size, tile) // f, min(size, tile) // f)
                estimate = stage.memory_used_decode(shape, 4)
                peak = peak_of_decode(model, size, tile)
                rows.append(dict(decoder=name, size=size, tiled=tile is not None, peak_gib=peak / GIB,
                                 estimate_gib=estimate / GIB, weights_gib=weights / GIB))
                print(f"{name:8s} {size:5d}^2 {'tiled 512' if tile else 'untiled  '}  peak {peak / GIB:7.2f} GiB"
                      f"  estimate {estimate / GIB:7.2f} GiB  (weights {weights / GIB:.2f} GiB)", flush=True)
    if opt.check_real:
        import resource

        model = build(opt.decoders[0], "cpu")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_of_decode(model, opt.check_real, None, device="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        counted = peak_of_decode(build(opt.decoders[0], "meta"), opt.check_real, None)
        print(f"real CPU decode at {opt.check_real}^2: peak resident growth {(after - before) / GIB:.2f} GiB; "
              f"counted {counted / GIB:.2f} GiB")
    if opt.json:
        Path(opt.json).write_text(json.dumps(rows, indent=1))


def time_decode(opt) -> None:
    base = Path(tempfile.mkdtemp(prefix="comfyui_timing_"))
    sys.argv = ["main.py", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    if not getattr(opt, "gpu", False):
        sys.argv.insert(1, "--cpu")
    try:
        import comfy.options
    except ImportError:
        sys.exit("time-decode imports ComfyUI: put its folder on the path, e.g. PYTHONPATH=~/ComfyUI python ...")

    comfy.options.enable_args_parsing()
    import comfy.model_management
    import folder_paths
    import nodes
    import torch

    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(nodes.load_custom_node(str(REPO / "comfyui_nodes")))
    ours = sys.modules["asymmetric_vae_ldm"]  # the node pack's private copy of this project's ldm
    instantiate = importlib.import_module(ours.__name__ + ".util").instantiate_from_config
    load_yaml = importlib.import_module(ours.__name__ + ".project").load_yaml
    save = importlib.import_module(ours.__name__ + ".checkpoints.files").save_state_dict

    torch.manual_seed(0)
    model = instantiate(load_yaml(REPO / VANILLA).model).eval()
    vae_dir = Path(folder_paths.get_folder_paths("vae")[0])
    vae_dir.mkdir(parents=True, exist_ok=True)
    save(model.state_dict(), vae_dir / "vanilla_sd_vae.safetensors")
    theirs = nodes.VAELoader().load_vae("vanilla_sd_vae.safetensors")[0]
    mine = nodes.NODE_CLASS_MAPPINGS["AsymmetricVAELoader"]().load_vae("vanilla_sd_vae.safetensors")[0]
    f = 8
    z = torch.randn(1, 4, opt.size // f, opt.size // f, generator=torch.Generator().manual_seed(1))
    pixels = torch.rand(1, opt.size, opt.size, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, opt.size, opt.size)
    decode_theirs = lambda: nodes.VAEDecode().decode(theirs, {"samples": z})[0]  # noqa: E731
    decode_mine = lambda: nodes.NODE_CLASS_MAPPINGS["AsymmetricVAEDecode"]().decode(  # noqa: E731
        {"samples": z}, mine, pixels, mask)[0]

    def timed(fn):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    timed(decode_theirs), timed(decode_mine)  # warm-up: weights to the device, kernels chosen
    times = {"ComfyUI VAEDecode": [], "AsymmetricVAEDecode": []}
    for _ in range(opt.repeats):
        t, a = timed(decode_theirs)
        times["ComfyUI VAEDecode"].append(t)
        t, b = timed(decode_mine)
        times["AsymmetricVAEDecode"].append(t)
    device = comfy.model_management.get_torch_device()
    print(f"{opt.size}x{opt.size}, vanilla SD VAE weights, device {device}, dtypes {theirs.vae_dtype} / "
          f"{mine.vae_dtype}, {opt.repeats} repeats (median, all):")
    for name, ts in times.items():
        print(f"  {name:22s} {statistics.median(ts):8.3f} s   {' '.join(f'{t:.3f}' for t in ts)}")
    print(f"  largest pixel difference between the two outputs: {float((a - b).detach().abs().max()):.2e}")
    loop.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("memory", help="peak live-tensor memory of a decode against the node's estimate")
    m.add_argument("--decoders", nargs="+", default=["base"], choices=sorted(CONFIGS))
    m.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    m.add_argument("--check-real", type=int, default=None, metavar="SIZE",
                   help="also decode once for real on the CPU at SIZE^2 and report the peak resident growth")
    m.add_argument("--json", default=None, help="write the rows here")
    t = sub.add_parser("time-decode", help="our decode node against ComfyUI's VAEDecode, same latent and weights")
    t.add_argument("--size", type=int, default=512, help="image side in pixels")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--gpu", action="store_true", help="let ComfyUI use its GPU (default: --cpu)")
    opt = parser.parse_args(argv)
    if opt.command == "memory":
        memory(opt)
    else:
        time_decode(opt)


if __name__ == "__main__":
    main()
