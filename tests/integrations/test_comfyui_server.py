"""The nodes in the real ComfyUI server, as a user meets them (skipped without ``COMFYUI_DIR``).

A copy of the ComfyUI checkout gets ``custom_nodes/asymmetric_vae`` linked to ``comfyui_nodes/`` (docs/comfyui.md's
install); its ``main.py`` runs on 127.0.0.1 and a free port in this interpreter, with the project installed into it
(``pip install -e .``, what ``make venv`` does) and no ``PYTHONPATH``. Another custom node that ships a package named
``ldm`` of its own (``ldm/util.py`` as SD-derived node packs have) is loaded before ours (from an
``extra_model_paths.yaml`` custom-nodes folder marked default); tests/integrations/test_comfyui_integration.py loads
the nodes with
only ComfyUI's ``comfy/ldm`` in the way.

Then: ``/object_info`` lists our nodes; each shipped workflow is POSTed to ``/prompt``. The SD 1.5 one runs on
random weights of the full layout it names (SD 1.5 inpainting's 1.07 B parameters in ``models/checkpoints``, the
paper's base decoder in ``models/vae``), shrunk to a 64 x 64 image and one sampling step, with a ``SaveLatent`` added;
the PNG it saves must equal our own decode of the saved latent with the same image and mask. The FLUX.1 one names a
12 B model that cannot be made here: its files are 0-byte placeholders, so the server validates the graph
(``/prompt`` accepts it) and its execution stops at a loader. The server is stopped by its PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import user_env
from tests.integrations.test_comfyui_integration import comfyui_dir

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "comfyui_nodes" / "workflows"
# a real ComfyUI server each: minutes, not seconds
pytestmark = pytest.mark.slow
OUR_NODES = ["AsymmetricVAEDecode", "AsymmetricVAEDecodeTiled", "AsymmetricVAELoader"]
FLUX_FILES = [("diffusion_models", "flux1-fill-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
              ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "asuka_decoder.ckpt")]
START_TIMEOUT_S, PROMPT_TIMEOUT_S = 300, 420
# the test's copy of the SD 1.5 workflow: image side and sampling steps (a timing run sets them larger; see
# scripts/comfyui_measure.py)
SIZE = int(os.environ.get("ASYMMETRIC_VAE_WORKFLOW_SIZE", 64))
POOL = 1_000_003  # the random values the SD 1.5 checkpoint's tensors are cut from (seeded, at random offsets)
STEPS = int(os.environ.get("ASYMMETRIC_VAE_WORKFLOW_STEPS", 1))

OTHER_NODE = '''
import importlib.util, os, sys
# this node's own package, made the top-level ldm (as node packs that vendor SD's code do)
here = os.path.join(os.path.dirname(__file__), "ldm")
spec = importlib.util.spec_from_file_location("ldm", os.path.join(here, "__init__.py"),
                                              submodule_search_locations=[here])
sys.modules["ldm"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["ldm"])
import ldm.util


class OtherLdmProbe:
    """Which ldm this node sees when the server lists nodes (after every custom node has loaded)."""
    @classmethod
    def INPUT_TYPES(cls):
        import ldm.util as now
        return {"required": {"who": ("STRING", {"default": getattr(now, "WHO", repr(now))})}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    CATEGORY = "testing"

NODE_CLASS_MAPPINGS = {"OtherLdmProbe": OtherLdmProbe}
'''


# ---------------------------------------------------------------------- the files the workflows name
def sd15_inpainting_checkpoint(path: Path) -> None:
    """Random weights of SD 1.5 inpainting's full layout (UNet of 9 input channels, CLIP ViT-L/14 text tower, the KL
    VAE, the schedule buffers), from the project's runwayml config, in float16 as the released .ckpt holds them;
    the values are cut at random offsets from a seeded pool of normal draws (std 0.02)."""
    from ldm.project import load_yaml
    from ldm.util import instantiate_from_config

    config = load_yaml(REPO / "configs" / "autoencoder" / "v1-inpainting-inference.yaml").model
    with torch.device("meta"):
        model = instantiate_from_config(config)
    model.register_schedule(linear_start=config.params.linear_start, linear_end=config.params.linear_end)
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(POOL, generator=g) * 0.02).half()  # drawing 1.07 B values would take longer than the rest
    state = {}
    for key, value in model.state_dict().items():
        if value.is_meta:
            start = int(torch.randint(POOL, (), generator=g))
            value = pool.repeat(value.numel() // POOL + 2)[start:start + value.numel()].view(value.shape).clone()
        state[key] = value
    torch.save({"state_dict": state}, path)


def paper_base_decoder(path: Path):
    """The paper's base decoder (configs/autoencoder/autoencoder_kl_32x32x4.yaml), random, its norms and biases
    perturbed so that the condition branch matters; saved as the release's .ckpt."""
    from ldm.checkpoints.files import save_state_dict
    from ldm.project import load_yaml
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    model = instantiate_from_config(load_yaml(REPO / "configs" / "autoencoder" / "autoencoder_kl_32x32x4.yaml")
                                    .model).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    save_state_dict(model.state_dict(), path)
    return model


def example_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An RGBA PNG whose transparent pixels are the region to inpaint; returns (RGB, hole)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (SIZE, SIZE, 3))
    alpha = np.full((SIZE, SIZE), 255)
    alpha[SIZE // 4: 3 * SIZE // 4, SIZE // 3: 2 * SIZE // 3] = 0
    Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA").save(path)
    return rgb, alpha == 0


# ---------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _writable_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".git"), copy_function=shutil.copyfile)
    for root, dirs, _ in os.walk(dst):  # the source may have no write bits (CI): the server writes under its folder
        for d in dirs:
            os.chmod(Path(root) / d, stat.S_IRWXU)
    os.chmod(dst, stat.S_IRWXU)


class Server:
    def __init__(self, root: Path, port: int, proc: subprocess.Popen, log: Path):
        self.root, self.url, self.proc, self.log = root, f"http://127.0.0.1:{port}", proc, log

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def post(self, route: str, body: dict):
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_for_history(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            assert self.proc.poll() is None, f"the server exited:\n{self.log_tail()}"
            time.sleep(1)
        raise AssertionError(f"prompt {prompt_id}: no result in {PROMPT_TIMEOUT_S} s\n{self.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkout, reason = comfyui_dir()
    if checkout is None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("comfyui_server")
    root = tmp / "ComfyUI"
    _writable_copy(checkout, root)
    (root / "custom_nodes" / "asymmetric_vae").symlink_to(REPO / "comfyui_nodes", target_is_directory=True)
    other = tmp / "first_nodes" / "other_ldm_node"
    (other / "ldm").mkdir(parents=True)
    (other / "__init__.py").write_text(OTHER_NODE)
    (other / "ldm" / "__init__.py").write_text("")
    (other / "ldm" / "util.py").write_text('WHO = "the other node\'s ldm"\n\ndef instantiate_from_config(config):\n'
                                           '    raise NotImplementedError\n')
    (root / "extra_model_paths.yaml").write_text(f"first:\n  is_default: true\n  custom_nodes: {other.parent}\n")

    port = _free_port()
    env = user_env()  # as users run it: the install, nothing else
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--database-url", "sqlite:///:memory:"], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    srv = Server(root, port, proc, log)
    try:
        # the files, while the server starts (ComfyUI lists a model folder when a node asks)
        models = root / "models"
        sd15_inpainting_checkpoint(models / "checkpoints" / "sd-v1-5-inpainting.ckpt")
        srv.decoder = paper_base_decoder(models / "vae" / "base.ckpt")
        for folder, name in FLUX_FILES:
            (models / folder / name).write_bytes(b"")
        srv.rgb, srv.hole = example_image(root / "input" / "example.png")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{srv.log_tail()}"
            assert time.monotonic() < deadline, f"the server did not answer in {START_TIMEOUT_S} s\n{srv.log_tail()}"
            try:
                srv.get("/object_info/SaveImage")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)  # by its PID
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_server_lists_our_nodes_beside_another_nodes_ldm(server):
    info = {name: server.get(f"/object_info/{name}") for name in OUR_NODES}
    failed = [ln for ln in server.log_tail(100_000).splitlines() if "IMPORT FAILED" in ln or "Error" in ln]
    assert all(info[name] for name in OUR_NODES), f"our nodes are not listed: {failed}\n{server.log_tail()}"
    assert info["AsymmetricVAELoader"]["AsymmetricVAELoader"]["input"]["required"]["vae_name"][0] == [
        "asuka_decoder.ckpt", "base.ckpt"]
    # the other node loaded and still sees its own ldm after ours loaded
    probe = server.get("/object_info/OtherLdmProbe")["OtherLdmProbe"]
    assert probe["input"]["required"]["who"][1]["default"] == "the other node's ldm"


def test_server_runs_the_sd15_workflow_and_saves_our_decode(server):
    from PIL import Image
    from safetensors.torch import load_file

    from ldm.integrations.comfyui import decode_with_prior

    graph = json.loads((WORKFLOWS / "sd15_inpaint_base_api.json").read_text())
    graph["7"]["inputs"]["steps"] = STEPS  # the test's copy: fewer steps (the workflow's sampler, scheduler, CFG)
    graph["9"]["inputs"]["filename_prefix"] = "sd15_test"
    graph["90"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/sd15"}}
    start = time.perf_counter()
    status, answer = server.post("/prompt", {"prompt": graph, "client_id": "pytest"})
    assert status == 200 and not answer.get("node_errors"), answer
    entry = server.wait_for_history(answer["prompt_id"])
    wall = time.perf_counter() - start
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    print(f"\nSD 1.5 workflow through the server: {wall:.1f} s wall, POST to history ({SIZE}x{SIZE}, {STEPS} steps, "
          "first run: models loaded from disk)")
    outputs = entry["outputs"]
    image = outputs["9"]["images"][0]
    png = server.root / "output" / image["subfolder"] / image["filename"]
    latent = outputs["90"]["latents"][0]
    z = load_file(str(server.root / "output" / latent["subfolder"] / latent["filename"]))["latent_tensor"]
    assert z.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(z).all()

    # our decode of that latent with LoadImage's IMAGE and MASK (RGB / 255; 1 - alpha / 255)
    pixels = torch.from_numpy(server.rgb.astype(np.float32) / 255)[None]
    mask = torch.from_numpy(server.hole.astype(np.float32))[None]
    with torch.no_grad():
        ours = decode_with_prior(server.decoder, z.float(), pixels, mask)
    ours8 = (ours[0].numpy() * 255).round().astype(int)  # SaveImage's rounding (clip(255 * x))
    saved = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert saved.shape == (SIZE, SIZE, 3)
    assert np.abs(saved - ours8).max() <= 1


def test_server_validates_the_flux_workflow(server):
    """FLUX.1 Fill (12 B) cannot be made here: the graph passes the server's validation against its placeholders,
    and execution stops at a loader reading a 0-byte file."""
    graph = json.loads((WORKFLOWS / "flux_fill_asuka_api.json").read_text())
    status, answer = server.post("/prompt", {"prompt": graph, "client_id": "pytest"})
    assert status == 200 and not answer.get("node_errors"), answer
    entry = server.wait_for_history(answer["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] in {"UNETLoader", "DualCLIPLoader", "AsymmetricVAELoader"}, errors


# ---------------------------------------------------------------------- the UI-format workflows
UI_ONLY = {"Note", "MarkdownNote"}  # front-end nodes: not in the prompt
# the loaders' file inputs and where ComfyUI looks for them
FILE_INPUTS = {"ckpt_name": "models/checkpoints", "vae_name": "models/vae", "unet_name": "models/diffusion_models",
               "clip_name1": "models/text_encoders", "clip_name2": "models/text_encoders", "image": "input"}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """A UI-format workflow (what the canvas saves) -> the API graph, as the front end builds the prompt: links by
    their ids; widget values in the node's input order (object_info's ``input_order``), an input fed by a link
    taking no value, and the extra value the front end stores after a seed (``control_after_generate``) or an
    upload button (``image_upload``) skipped."""
    links = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    graph = {}
    for node in ui["nodes"]:
        if node["type"] in UI_ONLY or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: list(links[i["link"]]) for i in node.get("inputs", []) if i.get("link") is not None}
        values = iter(node.get("widgets_values", []))
        inputs = {}
        for group in ("required", "optional"):
            for name in info["input_order"].get(group, []):
                spec = info["input"][group][name]
                if name in linked:
                    inputs[name] = linked[name]
                elif isinstance(spec[0], list) or spec[0] in {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}:
                    inputs[name] = next(values)
                    options = spec[1] if len(spec) > 1 else {}
                    if options.get("control_after_generate") or options.get("image_upload"):
                        next(values)
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            graph[str(node["id"])]["_meta"] = {"title": node["title"]}
    return graph


def _valid_value(spec: list, value) -> bool:
    if isinstance(spec[0], list):
        return value in spec[0]
    options = spec[1] if len(spec) > 1 else {}
    if spec[0] in ("INT", "FLOAT"):
        return options.get("min", -float("inf")) <= value <= options.get("max", float("inf"))
    return isinstance(value, {"STRING": str, "BOOLEAN": bool}.get(spec[0], object))


@pytest.mark.parametrize("name", ["sd15_inpaint_base", "flux_fill_asuka"])
def test_ui_workflow_converts_to_the_api_graph_and_names_its_files(server, name):
    """Each UI file (what users drag onto the canvas) is the API file plus a PreviewImage of the decode and a note;
    its values are valid for the server's nodes, and the note names every file the graph loads and its folder."""
    object_info = server.get("/object_info")
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    graph = ui_to_api(ui, object_info)
    previews = {k: v for k, v in graph.items() if v["class_type"] == "PreviewImage"}
    decode = next(k for k, v in api.items() if v["class_type"] == "AsymmetricVAEDecode")
    assert [v["inputs"] for v in previews.values()] == [{"images": [decode, 0]}]
    assert {k: v for k, v in graph.items() if k not in previews} == api
    for node in graph.values():
        info = object_info[node["class_type"]]["input"]
        for key, value in node["inputs"].items():
            spec = {**info.get("required", {}), **info.get("optional", {})}[key]
            assert isinstance(value, list) or _valid_value(spec, value), (node["class_type"], key, value)
    (note,) = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    files = [f"ComfyUI/{FILE_INPUTS[k]}/{v}" for node in api.values() for k, v in node["inputs"].items()
             if k in FILE_INPUTS]
    assert files and all(f in note for f in files), (files, note)
    # the canvas's bookkeeping holds together: every link is listed on both of its ends
    ends = {(n["id"], o["slot_index"], link) for n in ui["nodes"] for o in n["outputs"] for link in o["links"] or []}
    assert ends == {(link[1], link[2], link[0]) for link in ui["links"]}
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
