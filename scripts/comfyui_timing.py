"""``python scripts/comfyui_measure.py time-decode --comfyui DIR``: our decode node against ComfyUI's own
``VAEDecode`` on the same latent, with the same vanilla SD VAE weights (random, SD's full layout), side by side in
one process: each repeat runs both, alternating, and the medians are printed with the largest pixel difference
between the two outputs (the same weights and no condition branch: they should agree to float rounding).

ComfyUI is imported in this process (its flags from ``sys.argv``, a temporary ``--base-directory``); run it on an
idle machine, and state the device (``--cpu`` unless ``--gpu``).
"""
from __future__ import annotations

import asyncio
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VANILLA = "configs/autoencoder/autoencoder_kl_woc_32x32x4.yaml"  # SD's KL-f8 VAE, no condition branch


def time_decode(opt) -> None:
    base = Path(tempfile.mkdtemp(prefix="comfyui_timing_"))
    sys.argv = ["main.py", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    if not getattr(opt, "gpu", False):
        sys.argv.insert(1, "--cpu")
    sys.path.insert(0, str(opt.comfyui))
    import comfy.options

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
