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

``time-decode`` (needs ``--comfyui DIR``, a ComfyUI checkout; run it on an idle machine): our decode node
against ComfyUI's own ``VAEDecode`` on the same latent with the same vanilla SD weights, side by side in one process
(scripts/comfyui_timing.py). The wall time of one workflow through ComfyUI's server is printed by
tests/test_comfyui_server.py (``-s``; ``ASYMMETRIC_VAE_WORKFLOW_SIZE`` / ``_STEPS`` set the image side and the
sampling steps of its SD 1.5 run, default 64 and 1).

    python scripts/comfyui_measure.py memory
    python scripts/comfyui_measure.py time-decode --comfyui ~/ComfyUI --size 512 --repeats 3
    ASYMMETRIC_VAE_WORKFLOW_SIZE=512 ASYMMETRIC_VAE_WORKFLOW_STEPS=20 COMFYUI_DIR=~/ComfyUI \
        python -m pytest -s -q tests/test_comfyui_server.py -k sd15_workflow
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout, installed or not
    sys.path.insert(0, str(REPO))

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
    t.add_argument("--comfyui", required=True, type=Path, help="a ComfyUI checkout (v0.3.64 tested)")
    t.add_argument("--size", type=int, default=512, help="image side in pixels")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--gpu", action="store_true", help="let ComfyUI use its GPU (default: --cpu)")
    opt = parser.parse_args(argv)
    if opt.command == "memory":
        memory(opt)
    else:
        from scripts.comfyui_timing import time_decode

        time_decode(opt)


if __name__ == "__main__":
    main()
