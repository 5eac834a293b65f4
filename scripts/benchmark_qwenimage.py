"""Qwen-Image's decoder: ours (2-D, one image) against diffusers' ``AutoencoderKLQwenImage.decode`` (causal 3-D) in one
run, on the same random weights and latents; and the peak memory of one training step of an asymmetric variant.

    python scripts/benchmark_qwenimage.py --size 1024 --threads 16           # full size, CPU decode timing
    python scripts/benchmark_qwenimage.py --train_step asymmetric_base --size 256

Both decoders get diffusers' default (Qwen-Image) architecture with its parameters perturbed from their
initialisation (no weights are downloaded: the timing does not depend on their values); ours is converted from
diffusers' by the project's loader (``ldm.checkpoints.qwenimage``). Prints seconds per decode (the median of
``--repeats`` after one warm-up) and the largest difference of the two outputs (diffusers clamps to [-1, 1]).
``--train_step CONFIG`` instead runs one
training step (forward through the frozen encoder and the decoder, generator loss without LPIPS, backward, Adam
step) of ``configs/autoencoder/qwenimage/CONFIG.yaml`` at batch 1 and prints its peak memory above the model's
weights (CPU: RSS; CUDA: the allocator's; run it in a process of its own). ``--base_dim`` shrinks
the network (a smoke test).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, Optional, Sequence

import torch

from ldm.checkpoints.qwenimage import ddconfig_of_diffusers, diffusers_qwenimage_to_ours
from ldm.latent_spaces import normalization_from_diffusers
from ldm.measure import PeakMemory, sync
from ldm.models.autoencoder import AutoencoderKL
from ldm.project import REPO_ROOT


def perturbed_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
    return module.eval()


def build_pair(base_dim: Optional[int], device: torch.device):
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLQwenImage(**({} if base_dim is None else {"base_dim": base_dim}))
    vae = perturbed_(vae, 0)
    sd, overrides = diffusers_qwenimage_to_ours(vae.state_dict(), dict(vae.config))
    ours = AutoencoderKL(ddconfig=ddconfig_of_diffusers(vae.config), lossconfig={"target": "torch.nn.Identity"},
                         embed_dim=vae.config.z_dim, architecture="qwenimage", decoder_overrides=overrides,
                         **normalization_from_diffusers(dict(vae.config)).to_params())
    ours.load_state_dict(sd)
    return vae.to(device), ours.eval().to(device)


def timed(fn, repeats: int, device: torch.device) -> List[float]:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times[1:]


def decode_timing(opt: argparse.Namespace, device: torch.device) -> None:
    vae, ours = build_pair(opt.base_dim, device)
    z = torch.randn(1, 16, opt.size // 8, opt.size // 8, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        diff = (vae.decode(z[:, :, None]).sample[:, :, 0] - ours.decode(z).clamp(-1, 1)).abs().max().item()
        t_theirs = timed(lambda: vae.decode(z[:, :, None]), opt.repeats, device)
        t_ours = timed(lambda: ours.decode(z), opt.repeats, device)
    print(f"decode {opt.size}x{opt.size} on {device} ({torch.get_num_threads()} threads), median of {opt.repeats}:")
    print(f"  diffusers AutoencoderKLQwenImage.decode: {statistics.median(t_theirs):.3f} s")
    print(f"  ours (2-D QwenImageDecoder):            {statistics.median(t_ours):.3f} s")
    print(f"  max |difference|: {diff:.2e}")


def train_step_memory(opt: argparse.Namespace, device: torch.device) -> None:
    from ldm.project import load_yaml
    from ldm.util import instantiate_from_config

    config = load_yaml(REPO_ROOT / "configs/autoencoder/qwenimage" / f"{opt.train_step}.yaml")
    params = config.model.params
    params.lossconfig = {"target": "torch.nn.Identity"}
    params.pop("ckpt_path", None)
    if opt.base_dim is not None:
        params.ddconfig.ch = opt.base_dim
        params.decoder_overrides.pop("ch", None)
    model = instantiate_from_config(config.model).to(device).train()
    x = torch.rand(1, 3, opt.size, opt.size, device=device) * 2 - 1
    mask = torch.zeros(1, 1, opt.size, opt.size, device=device)
    mask[..., opt.size // 4:3 * opt.size // 4, opt.size // 4:3 * opt.size // 4] = 1
    groups = [{"params": g["params"]} for g in model.trainable_groups()]
    optimizer = torch.optim.Adam(groups, lr=1e-5, betas=(0.5, 0.9))
    trainable = sum(p.numel() for g in groups for p in g["params"])
    with PeakMemory(device) as mem:
        rec, posterior = model.shared_forward(x, mask)
        loss = (rec - x).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
    print(f"one training step of {opt.train_step} at {opt.size}x{opt.size}, batch 1, float32 on {device}: peak "
          f"{mem.mib:.0f} MiB above the model's weights ({trainable / 1e6:.2f}M trainable parameters; L1 + KL, no "
          "LPIPS or discriminator)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base_dim", type=int, default=None, help="a narrower network (smoke tests)")
    parser.add_argument("--train_step", default=None, metavar="CONFIG",
                        help="measure one training step of configs/autoencoder/qwenimage/CONFIG.yaml instead")
    opt = parser.parse_args(argv)
    if opt.size % 16:
        parser.error(f"--size {opt.size}: must be a multiple of 16")
    if opt.threads:
        torch.set_num_threads(opt.threads)
    device = torch.device(opt.device)
    if opt.train_step:
        train_step_memory(opt, device)
    else:
        decode_timing(opt, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
