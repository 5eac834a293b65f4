"""The nodes in the real ComfyUI (a checkout named by ``COMFYUI_DIR``; skipped without one): ComfyUI's custom-node
loader loads ``comfyui_nodes/``, its prompt validation accepts the example workflows, and its executor runs
LoadImage -> VAEEncode -> AsymmetricVAEDecode -> SaveImage on tiny random-weight checkpoints.

Importing ComfyUI rewrites process state (``sys.argv``, ``sys.path``, modules, logging), so everything runs in one
subprocess (this file run as a script, as this interpreter with no ``PYTHONPATH``), which prints a JSON report that
the tests read. Nothing imports ``ldm`` before ComfyUI does: ``ldm`` is ComfyUI's ``comfy/ldm`` there, and the node
pack loads ours under its private name, which the subprocess then uses too. tests/integrations/test_comfyui_server.py
runs
ComfyUI's server.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# a real ComfyUI each (its server, or its executor in a child process): minutes, not seconds
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "comfyui_nodes" / "workflows"
# files the example workflows name, substituted by tiny stand-ins: (ComfyUI model folder, file name)
NAMED_FILES = [("checkpoints", "sd-v1-5-inpainting.ckpt"), ("diffusion_models", "flux1-fill-dev.safetensors"),
               ("text_encoders", "clip_l.safetensors"), ("text_encoders", "t5xxl_fp16.safetensors")]
REPORT = "COMFYUI_REPORT "


def comfyui_dir():
    path = os.environ.get("COMFYUI_DIR")
    if not path:
        return None, "COMFYUI_DIR is not set (point it to a ComfyUI checkout to run these tests; .ci/run does)"
    if not (Path(path) / "nodes.py").is_file():
        return None, f"COMFYUI_DIR={path} is not a ComfyUI checkout (no nodes.py)"
    return Path(path), ""


# ---------------------------------------------------------------------- the subprocess
def _png(path: Path, rgb, alpha) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA").save(path)


def _run_in_comfyui(comfy_dir: Path, base: Path) -> dict:
    import asyncio
    import importlib
    import importlib.util
    import logging

    import numpy as np
    import torch

    # ComfyUI reads its flags from sys.argv; its folder is this process's working folder, first on sys.path (the
    # fixture runs this file with -c there), as main.py's folder is for ComfyUI
    sys.argv = ["main.py", "--cpu", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management
    import execution
    import folder_paths
    import nodes

    report: dict = {}
    logging.getLogger().setLevel(logging.WARNING)
    loop = asyncio.new_event_loop()

    # ComfyUI's own loader: our package, and the two extras files the FLUX.1 workflow names
    report["loaded"] = loop.run_until_complete(nodes.load_custom_node(str(REPO / "comfyui_nodes")))
    # `import ldm` still finds ComfyUI's (the clash the node pack avoids), and ours is not sys.modules["ldm"]; ours
    # is the node pack's private package, where a config's ldm.* target resolves
    spec = importlib.util.find_spec("ldm")
    report["ldm_is_comfyuis"] = ([str(Path(p).resolve()) for p in spec.submodule_search_locations]
                                 == [str((comfy_dir / "comfy" / "ldm").resolve())] and "ldm" not in sys.modules)
    ours = sys.modules["asymmetric_vae_ldm"]
    report["private_package"] = str(Path(ours.__file__).resolve().parent)
    save_state_dict = importlib.import_module(ours.__name__ + ".checkpoints.files").save_state_dict
    decode_with_prior = importlib.import_module(ours.__name__ + ".integrations.comfyui").decode_with_prior
    instantiate_from_config = importlib.import_module(ours.__name__ + ".util").instantiate_from_config
    load_yaml = importlib.import_module(ours.__name__ + ".project").load_yaml
    for extra in ("nodes_flux.py", "nodes_differential_diffusion.py"):
        loop.run_until_complete(nodes.load_custom_node(str(comfy_dir / "comfy_extras" / extra),
                                                       module_parent="comfy_extras"))
    report["registered"] = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("Asymmetric"))
    # the node pack's pyproject.toml as ComfyUI's own parser (comfy_config) reads it
    from comfy_config import config_parser

    meta = config_parser.extract_node_configuration(str(REPO / "comfyui_nodes"))
    report["pyproject"] = [meta.project.name, meta.project.version, meta.tool_comfy.display_name,
                           meta.project.supported_comfyui_version, len(meta.project.dependencies)]
    report["display"] = {k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in report["registered"]}

    # tiny random-weight decoders under the released names, in a vae folder registered the way users add one
    vae_dir = base / "extra_vae"
    vae_dir.mkdir()
    folder_paths.add_model_folder_path("vae", str(vae_dir))
    torch.manual_seed(0)
    models = {}
    tiny = {"base.ckpt": "autoencoder_kl_tiny.yaml", "asuka_decoder.ckpt": "autoencoder_kl_flux_tiny.yaml"}
    for name, config in tiny.items():
        model = instantiate_from_config(load_yaml(REPO / "configs" / "tiny" / config).model).eval()
        with torch.no_grad():  # random norms and biases too, so the condition branch matters
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.2 * torch.randn_like(p))
        save_state_dict(model.state_dict(), vae_dir / name)
        models[name] = model
    torch.save({"state_dict": {"something.else": torch.zeros(2)}}, vae_dir / "unknown_layout.ckpt")
    for folder, name in NAMED_FILES:
        path = Path(folder_paths.get_folder_paths(folder)[0]) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # validation checks names only; nothing loads them

    # input images: A (encoded) and the priors example (A), b_out, b_kept (alpha 0 = inpaint), 96 x 48 pixels
    rng = np.random.default_rng(0)
    inp = Path(folder_paths.get_input_directory())
    inp.mkdir(parents=True, exist_ok=True)
    a = rng.integers(0, 256, (48, 96, 3))
    alpha = np.full((48, 96), 255)
    alpha[12:36, 24:72] = 0
    hole = alpha == 0
    _png(inp / "example.png", a, alpha)
    b_out = a.copy()
    b_out[hole] = rng.integers(0, 256, (hole.sum(), 3))
    _png(inp / "b_out.png", b_out, alpha)
    b_kept = a.copy()
    b_kept[~hole] = rng.integers(0, 256, ((~hole).sum(), 3))
    _png(inp / "b_kept.png", b_kept, alpha)
    _png(inp / "a_opaque.png", a, np.full((48, 96), 255))

    # the example workflows pass ComfyUI's validation
    report["valid"] = {}
    for path in sorted(WORKFLOWS.glob("*_api.json")):
        ok, error, outputs, node_errors = loop.run_until_complete(
            execution.validate_prompt("v", json.loads(path.read_text()), None))
        report["valid"][path.name] = [ok, error, node_errors]

    class Server:  # what PromptExecutor reports to: nothing listens
        client_id = None
        last_node_id = None

        def send_sync(self, *args, **kwargs):
            pass

    executor = execution.PromptExecutor(Server())

    def run(prompt: dict, prefix: str) -> np.ndarray:
        prompt["6"]["inputs"]["filename_prefix"] = prefix
        ok, error, outputs, _ = loop.run_until_complete(execution.validate_prompt(prefix, prompt, None))
        assert ok, error
        executor.execute(prompt, prefix, {}, outputs)
        errors = [m for e, m in executor.status_messages if e == "execution_error"]
        if errors:
            raise RuntimeError(errors[0]["exception_message"])
        from PIL import Image

        files = sorted(Path(folder_paths.get_output_directory()).glob(f"{prefix}_*.png"))
        return np.asarray(Image.open(files[-1]).convert("RGB"))

    def workflow(vae_name: str, prior: str, decode: str = "AsymmetricVAEDecode", extra=None) -> dict:
        dec_inputs = {"samples": ["3", 0], "vae": ["1", 0], "pixels": ["4", 0], "mask": ["4", 1], **(extra or {})}
        if decode == "VAEDecode":
            dec_inputs = {"samples": ["3", 0], "vae": ["1", 0]}
        return {"1": {"class_type": "AsymmetricVAELoader",
                      "inputs": {"vae_name": vae_name, "latent_space": "auto", "config": ""}},
                "2": {"class_type": "LoadImage", "inputs": {"image": "a_opaque.png"}},
                "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
                "4": {"class_type": "LoadImage", "inputs": {"image": prior}},
                "5": {"class_type": decode, "inputs": dec_inputs},
                "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "out"}}}

    outs = {}
    for name in ("base.ckpt", "asuka_decoder.ckpt"):
        for prior in ("example.png", "b_out.png", "b_kept.png"):
            outs[(name, prior)] = run(workflow(name, prior), f"{name[:4]}_{prior[:-4]}")
        outs[(name, "tiled")] = run(workflow(name, "example.png", "AsymmetricVAEDecodeTiled",
                                             {"tile_size": 64, "overlap": 32}), f"{name[:4]}_tiled")
        outs[(name, "plain")] = run(workflow(name, "example.png", "VAEDecode"), f"{name[:4]}_plain")

        # the same tensors through our code: LoadImage's conversions, the posterior mode, decode_with_prior
        model = models[name]
        img = torch.from_numpy(a.astype(np.float32) / 255)[None]
        mask = torch.from_numpy(hole.astype(np.float32))[None]
        with torch.no_grad():
            z = model.encode(img.movedim(-1, 1) * 2 - 1).mode()
            ref = decode_with_prior(model, z, img, mask)
            ref_tiled = decode_with_prior(model, z, img, mask, tile_size=64, overlap=16)  # the node caps overlap
            plain = model.decode(z)
        ref8, tiled8 = ((r[0].numpy() * 255).round().astype(int) for r in (ref, ref_tiled))  # SaveImage's rule
        plain8 = (torch.clamp((plain[0] + 1) / 2, 0, 1).movedim(0, -1).numpy() * 255).round().astype(np.uint8)
        got, got_plain = outs[(name, "example.png")].astype(int), outs[(name, "plain")].astype(int)
        region = lambda x, m: np.abs(x - outs[(name, "example.png")].astype(int))[m].mean()  # noqa: E731
        report[name] = {
            "max_diff_vs_ours": int(np.abs(got - ref8).max()),
            "max_diff_plain_vs_ours": int(np.abs(got_plain - plain8).max()),
            "prior_changes_output": int(np.abs(got - got_plain).max()),
            "out_of_kept_change_all": int(np.abs(outs[(name, "b_out.png")].astype(int) - got).max()),
            "kept_change_in_kept": float(region(outs[(name, "b_kept.png")].astype(int), ~hole)),
            "tiled_max_diff_vs_ours": int(np.abs(outs[(name, "tiled")].astype(int) - tiled8).max()),
            "tiled_differs_from_untiled": int(np.abs(outs[(name, "tiled")].astype(int) - got).max()),
            "shape": list(got.shape),
        }

    # ComfyUI's own inpainting node takes our VAE; its latent is our encoder's
    vae = nodes.NODE_CLASS_MAPPINGS["AsymmetricVAELoader"]().load_vae("base.ckpt")[0]
    img = torch.from_numpy(a.astype(np.float32) / 255)[None]
    _, _, latent = nodes.InpaintModelConditioning().encode([], [], img, vae, torch.from_numpy(hole * 1.0)[None])
    with torch.no_grad():
        ours = models["base.ckpt"].encode(img.movedim(-1, 1) * 2 - 1).mode()
    report["inpaint_conditioning_latent_diff"] = float((latent["samples"] - ours).abs().max())

    # the attributes our VAE sets are the ones ComfyUI's own VAE sets for an SD VAE (vae.py's list, one place)
    import comfy.sd

    vanilla = instantiate_from_config(load_yaml(REPO / "configs" / "autoencoder" /
                                                "autoencoder_kl_woc_32x32x4.yaml").model)
    theirs = comfy.sd.VAE(sd=vanilla.state_dict())
    vae_module = sys.modules[[k for k in sys.modules if k.endswith("comfyui_nodes.vae")][0]]
    report["vae_attributes"] = [sorted(set(vars(theirs)) - set(vae_module.VAE_ATTRIBUTES)),
                                sorted(set(vae_module.VAE_ATTRIBUTES) - set(vars(theirs))),
                                sorted(set(vae_module.VAE_ATTRIBUTES) - set(vars(vae))),
                                vae_module.CHECKED_AGAINST == importlib.import_module("comfyui_version").__version__]
    report["model_management"] = all(hasattr(comfy.model_management, n) for n in vae_module.MODEL_MANAGEMENT)

    # what ComfyUI's VAESave writes (vae.get_sd()) loads back
    import comfy.utils

    comfy.utils.save_torch_file(vae.get_sd(), str(vae_dir / "saved_by_comfyui.safetensors"))
    again = nodes.NODE_CLASS_MAPPINGS["AsymmetricVAELoader"]().load_vae("saved_by_comfyui.safetensors")[0]
    report["saved_equal"] = all(torch.equal(a, b) for a, b in zip(again.get_sd().values(), vae.get_sd().values()))

    # ComfyUI's bfloat16 VAE (its default on GPUs; --bf16-vae here): the patcher holds bfloat16 weights
    comfy.model_management.args.bf16_vae = True
    vae16 = nodes.NODE_CLASS_MAPPINGS["AsymmetricVAELoader"]().load_vae("base.ckpt")[0]
    comfy.model_management.args.bf16_vae = False
    mask = torch.from_numpy(hole * 1.0)[None].float()
    decode = nodes.NODE_CLASS_MAPPINGS["AsymmetricVAEDecode"]().decode
    out16 = decode({"samples": ours}, vae16, img, mask)[0]
    out32 = decode({"samples": ours}, vae, img, mask)[0]
    report["bf16"] = [str(vae16.vae_dtype), str(out16.dtype), float((out16 - out32).abs().mean())]

    # errors, as ComfyUI shows them (the exception's message)
    def error(fn) -> str:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            return f"{type(e).__name__}: {e}"
        return ""

    loader = nodes.NODE_CLASS_MAPPINGS["AsymmetricVAELoader"]()
    decoder = nodes.NODE_CLASS_MAPPINGS["AsymmetricVAEDecode"]()
    img_nan = img.clone()
    img_nan[0, 20, 40] = float("nan")  # under the mask (the hole is rows 12:36, columns 24:72)
    flux = loader.load_vae("asuka_decoder.ckpt")[0]
    report["errors"] = {
        "unknown_layout": error(lambda: loader.load_vae("unknown_layout.ckpt")),
        "other_space": error(lambda: decoder.decode({"samples": torch.zeros(1, 16, 24, 48)}, vae, img,
                                                    torch.zeros(1, 48, 96))),
        "mask_batch": error(lambda: decoder.decode({"samples": torch.zeros(3, 4, 24, 48)}, vae, img,
                                                   torch.zeros(2, 48, 96))),
        "comfy_vae": error(lambda: decoder.decode({"samples": torch.zeros(1, 4, 24, 48)}, object(), img,
                                                  torch.zeros(1, 48, 96))),
        "nan_pixel_under_mask": error(lambda: decoder.decode({"samples": ours}, vae, img_nan, mask)),
        "inf_latent": error(lambda: decoder.decode({"samples": ours * torch.inf}, vae, img, mask)),
    }
    report["flux_latent_channels"] = flux.latent_channels
    loop.close()
    return report


# ---------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path, reason = comfyui_dir()
    if path is None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("comfyui_base")
    from tests.conftest import user_env  # here, not at the top: this file also runs as a script inside ComfyUI

    env = user_env()  # as users run ComfyUI
    run = f"import runpy, sys; sys.argv = [{__file__!r}, {str(path)!r}, {str(base)!r}]; " \
          f"runpy.run_path({__file__!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, env=env, cwd=path,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(REPORT)]
    assert proc.returncode == 0 and lines, f"ComfyUI run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len(REPORT):])


def test_comfyui_loader_registers_the_nodes(report):
    assert report["loaded"] is True
    assert report["ldm_is_comfyuis"] is True
    assert report["private_package"] == str(REPO / "ldm")
    assert report["registered"] == ["AsymmetricVAEDecode", "AsymmetricVAEDecodeTiled", "AsymmetricVAELoader"]
    assert all(report["display"].values())
    assert report["pyproject"] == ["asymmetric-vae", "0.1.0", "Asymmetric VAE (image + mask decoder)", ">=0.3.64",
                                   13]


def test_comfyui_validation_accepts_the_example_workflows(report):
    assert set(report["valid"]) == {"flux_fill_asuka_api.json", "sd15_inpaint_base_api.json"}
    for name, (ok, error, node_errors) in report["valid"].items():
        assert ok, f"{name}: {error} {node_errors}"


@pytest.mark.parametrize("name", ["base.ckpt", "asuka_decoder.ckpt"])
def test_comfyui_executor_decodes_with_the_prior_and_the_kept_region_follows_it(report, name):
    r = report[name]
    assert r["shape"] == [48, 96, 3]
    # what SaveImage wrote is our decode of the same tensors (8-bit rounding apart)
    assert r["max_diff_vs_ours"] <= 1
    assert r["max_diff_plain_vs_ours"] <= 1
    # the prior matters; pixels under the mask are not read (masked_image = (1 - mask) * image) ...
    assert r["prior_changes_output"] > 10
    assert r["out_of_kept_change_all"] == 0
    # ... and the kept pixels are: changing them changes the output there
    assert r["kept_change_in_kept"] > 1
    # the tiled node (64-pixel tiles across the 96-pixel width) is our tiled decode with the prior cropped per tile
    # (tests/models/test_tiling.py: it keeps the condition); with random weights the per-tile GroupNorm shows
    assert r["tiled_max_diff_vs_ours"] <= 1
    assert r["tiled_differs_from_untiled"] > 0


def test_comfyui_inpaint_conditioning_takes_our_vae_and_vae_save_round_trips(report):
    assert report["inpaint_conditioning_latent_diff"] < 1e-5
    assert report["saved_equal"] is True
    assert report["flux_latent_channels"] == 16


def test_comfyui_internals_we_set_are_the_ones_its_vae_sets(report):
    theirs_only, ours_only, unset, version = report["vae_attributes"]
    assert theirs_only == [] and ours_only == [] and unset == [], report["vae_attributes"]
    assert version is True and report["model_management"] is True


def test_comfyui_bfloat16_vae_decodes_close_to_float32(report):
    dtype, out_dtype, mean_diff = report["bf16"]
    assert (dtype, out_dtype) == ("torch.bfloat16", "torch.float32")
    assert 0 < mean_diff < 0.01  # bfloat16 rounding (8 bits of mantissa) in [0, 1] images


def test_comfyui_errors_are_one_line_and_name_the_problem(report):
    e = report["errors"]
    assert all(msg and "\n" not in msg for msg in e.values()), e
    assert "unknown_layout.ckpt" in e["unknown_layout"] and "not an autoencoder" in e["unknown_layout"]
    assert "16 channels" in e["other_space"] and "SD 1.x" in e["other_space"] and "FLUX.1" in e["other_space"]
    assert "mask batch 2" in e["mask_batch"] and "latent batch 3" in e["mask_batch"]
    assert "AsymmetricVAELoader" in e["comfy_vae"]
    assert e["nan_pixel_under_mask"].startswith("NonFiniteError: pixels: 3 of ")
    assert e["inf_latent"].startswith("NonFiniteError: samples: ")


if __name__ == "__main__":
    result = _run_in_comfyui(Path(sys.argv[1]), Path(sys.argv[2]))
    print(REPORT + json.dumps(result), flush=True)
