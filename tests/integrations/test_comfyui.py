"""The ComfyUI nodes without ComfyUI: the node classes' contracts, ComfyUI's conventions (IMAGE (B,H,W,C) in [0,1],
MASK (B,H,W), 1 = inpaint) against our ``AutoencoderKL.decode`` on the same tensors, the resize and batch rules,
loading every format from the tensors alone, and the errors. tests/integrations/test_comfyui_integration.py runs the
nodes in
the real ComfyUI."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from ldm.checkpoints.architecture import autoencoder_config
from ldm.checkpoints.diffusers import write_diffusers_folder
from ldm.checkpoints.files import CheckpointError, save_state_dict
from ldm.integrations import comfyui as integration
from ldm.loading import load_autoencoder
from ldm.project import load_yaml
from ldm.util import instantiate_from_config
from tests.conftest import REPO, make_autoencoder, user_env


def tiny(config: str, seed: int = 0):
    torch.manual_seed(seed)
    model = instantiate_from_config(load_yaml(REPO / "configs" / "tiny" / config).model).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))  # norms and biases too, so that the branch matters
    return model


def comfy_inputs(batch=1, h=16, w=24, seed=0, latent_channels=4, f=2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, latent_channels, h // f, w // f, generator=g)
    pixels = torch.rand(batch, h, w, 3, generator=g)
    mask = torch.zeros(batch, h, w)
    mask[:, h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1
    return z, pixels, mask


def ours_reference(model, z, pixels, mask):
    """Our decode on ComfyUI's tensors converted by hand, back in ComfyUI's IMAGE convention."""
    with torch.no_grad():
        out = model.decode(z, pixels.permute(0, 3, 1, 2) * 2 - 1, mask[:, None])
    return ((out + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


# ---------------------------------------------------------------------- node contracts
@pytest.fixture
def folder_paths(monkeypatch, tmp_path):
    """ComfyUI's ``folder_paths`` API as the loader calls it, over a temporary models/vae folder."""
    vae = tmp_path / "vae"
    (vae / "asym-x-1-5").mkdir(parents=True)
    (vae / "base.ckpt").write_bytes(b"")
    (vae / "asym-x-1-5" / "config.json").write_text("{}")
    (vae / "asym-x-1-5" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    module = types.ModuleType("folder_paths")
    module.get_folder_paths = lambda name: [str(vae)]
    module.get_filename_list = lambda name: ["asym-x-1-5/diffusion_pytorch_model.safetensors", "base.ckpt"]
    monkeypatch.setitem(sys.modules, "folder_paths", module)
    return vae


def test_node_contracts(folder_paths):
    import comfyui_nodes
    from comfyui_nodes import nodes_asymmetric as nodes

    assert set(comfyui_nodes.NODE_CLASS_MAPPINGS) == {"AsymmetricVAELoader", "AsymmetricVAEDecode",
                                                      "AsymmetricVAEDecodeTiled"}
    assert set(comfyui_nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(comfyui_nodes.NODE_CLASS_MAPPINGS)
    for cls in comfyui_nodes.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY == "latent/asymmetric vae"
    loader = nodes.AsymmetricVAELoader.INPUT_TYPES()
    assert loader["required"]["vae_name"][0] == ["asym-x-1-5/", "base.ckpt"]  # a diffusers folder by its name
    assert loader["required"]["latent_space"][0] == ["auto", "sd", "sdxl", "sd3", "flux", "flux2", "qwenimage"]
    assert loader["optional"]["config"][0] == "STRING"
    assert nodes.AsymmetricVAELoader.RETURN_TYPES == ("VAE",)
    decode = nodes.AsymmetricVAEDecode.INPUT_TYPES()["required"]
    assert {k: v[0] for k, v in decode.items()} == {"samples": "LATENT", "vae": "VAE", "pixels": "IMAGE",
                                                    "mask": "MASK"}
    tiled = nodes.AsymmetricVAEDecodeTiled.INPUT_TYPES()["required"]
    assert tiled["tile_size"][0] == tiled["overlap"][0] == "INT"
    assert nodes.AsymmetricVAEDecode.RETURN_TYPES == nodes.AsymmetricVAEDecodeTiled.RETURN_TYPES == ("IMAGE",)
    assert integration.resolve_choice("asym-x-1-5/", [folder_paths]).is_dir()
    with pytest.raises(FileNotFoundError, match="models|vae folders"):
        integration.resolve_choice("absent.ckpt", [folder_paths])
    with pytest.raises(ValueError, match="AsymmetricVAELoader"):
        nodes.AsymmetricVAEDecode().decode({"samples": torch.zeros(1, 4, 2, 2)}, object(), torch.zeros(1, 4, 4, 3),
                                           torch.zeros(1, 4, 4))


# ---------------------------------------------------------------------- ComfyUI's conventions = our decode
@pytest.mark.parametrize("config", ["autoencoder_kl_tiny.yaml", "autoencoder_kl_flux_tiny.yaml"])
def test_decode_in_comfyui_conventions_equals_our_decode(config):
    model = tiny(config)
    z, pixels, mask = comfy_inputs(batch=2, latent_channels=model.embed_dim)
    got = integration.decode_with_prior(model, z, pixels, mask)
    assert got.shape == (2, 16, 24, 3)
    torch.testing.assert_close(got, ours_reference(model, z, pixels, mask), rtol=0, atol=1e-6)
    # the first stage ComfyUI's VAE calls: raw latents (the posterior's mode) and the prior through to the decoder
    stage = integration.ComfyFirstStage(model)
    x = pixels.permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(stage.encode(x), model.encode(x).mode(), rtol=0, atol=0)
        torch.testing.assert_close(stage.decode(z, x, mask[:, None]), model.decode(z, x, mask[:, None]))
    # batches split by memory give the same images; tiles are our tiled decode with the prior cropped per tile
    torch.testing.assert_close(integration.decode_with_prior(model, z, pixels, mask, batch_size=1), got)
    tiled = integration.decode_with_prior(model, z, pixels, mask, tile_size=16, overlap=8)
    model.enable_tiling(16, 8)
    torch.testing.assert_close(tiled, ours_reference(model, z, pixels, mask), rtol=0, atol=1e-6)
    assert model._tiling == (16, 8)  # the node's tiling leaves the model as it was
    model.disable_tiling()
    assert not torch.allclose(tiled, got)


def test_batches_pair_as_comfyui_repeats_them():
    model = make_autoencoder()
    z, pixels, mask = comfy_inputs(batch=4)
    # a mask (and image) of batch 1 serves every latent
    got = integration.decode_with_prior(model, z, pixels[:1], mask[:1])
    ref = ours_reference(model, z, pixels[:1].expand(4, -1, -1, -1), mask[:1].expand(4, -1, -1))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # a batch dividing the latent batch repeats in order (comfy.utils.repeat_to_batch_size)
    got = integration.decode_with_prior(model, z, pixels[:2], mask[:2])
    ref = ours_reference(model, z, pixels[:2].repeat(2, 1, 1, 1), mask[:2].repeat(2, 1, 1))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="mask batch 3 does not pair with the latent batch 4"):
        integration.decode_with_prior(model, z, pixels[:1], mask[:3])
    with pytest.raises(ValueError, match="pixels batch 3"):
        integration.decode_with_prior(model, z, pixels[:3], mask[:1])


def test_prior_of_another_size_is_cropped_or_resized_as_comfyui_does(caplog):
    model = make_autoencoder()
    z, pixels, mask = comfy_inputs()
    ref = ours_reference(model, z, pixels, mask)
    caplog.set_level(logging.INFO, logger="ldm.integrations.comfyui")
    # an image one pixel off the factor on each side was centre-cropped by VAEEncode: the same crop is used
    big = torch.nn.functional.pad(pixels.permute(0, 3, 1, 2), (0, 1, 0, 1)).permute(0, 2, 3, 1)
    big_mask = torch.nn.functional.pad(mask, (0, 1, 0, 1))
    torch.testing.assert_close(integration.decode_with_prior(model, z, big, big_mask), ref, rtol=0, atol=1e-6)
    assert "centre-cropped" in caplog.text
    # LoadImage's mask of an image without alpha is 64 x 64 zeros: resized to the image, it keeps everything
    got = integration.decode_with_prior(model, z, pixels, torch.zeros(1, 64, 64))
    torch.testing.assert_close(got, ours_reference(model, z, pixels, torch.zeros(1, 16, 24)), rtol=0, atol=1e-6)
    assert "resized (bilinear) to the image" in caplog.text
    # an image of another size is resized to the latent's; a soft mask is rounded (as ComfyUI masks pixels)
    half = torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2), size=(8, 12)).permute(0, 2, 3, 1)
    image, ours = integration.prepare_prior(z, half, mask * 0.6, model)
    assert image.shape == (1, 3, 16, 24) and set(ours.unique().tolist()) == {0.0, 1.0}
    assert "the size the latent decodes to" in caplog.text


@pytest.mark.parametrize("where", ["pixels under the mask", "pixels kept", "mask", "samples"])
def test_non_finite_inputs_are_refused_naming_them(where):
    """A NaN pixel under the mask still reaches the branch as 0 * NaN, and one NaN makes the whole image NaN: refused,
    one line naming the node's input."""
    model = make_autoencoder()
    z, pixels, mask = comfy_inputs()
    if where == "pixels under the mask":
        assert mask[0, 8, 10] == 1
        pixels[0, 8, 10, 1] = float("nan")
    elif where == "pixels kept":
        pixels[0, 0, 0, 0] = float("inf")
    elif where == "mask":
        mask[0, 1, 1] = float("nan")
    else:
        z[0, 0, 0, 0] = -float("inf")
    name = where.split()[0]
    with pytest.raises(ValueError, match=rf"^{name}: 1 of \d+ values are NaN or infinite") as error:
        integration.decode_with_prior(model, z, pixels, mask)
    assert "\n" not in str(error.value)


def test_latent_of_another_space_names_both():
    model = make_autoencoder()
    _, pixels, mask = comfy_inputs()
    with pytest.raises(ValueError, match=r"16 channels \(SD 3.x or FLUX.1\).*SD 1.x / 2.x's latent space \(4"):
        integration.decode_with_prior(model, torch.zeros(1, 16, 8, 12), pixels, mask)
    with pytest.raises(ValueError, match="video latents"):
        integration.decode_with_prior(model, torch.zeros(1, 4, 2, 8, 12), pixels, mask)


# ---------------------------------------------------------------------- every format, config from the tensors
def test_every_format_loads_from_its_tensors_alone(tmp_path):
    from tests.models.test_asuka import asuka_layout_checkpoint

    sd_model = tiny("autoencoder_kl_tiny.yaml")
    torch.save({"state_dict": {**sd_model.state_dict(), "decoder.up_layers.0.deconv.bias": torch.zeros(2)}},
               tmp_path / "base.ckpt")  # the original release's layout, with its unused keys
    save_state_dict(sd_model.state_dict(), tmp_path / "base.safetensors")
    write_diffusers_folder(sd_model.state_dict(), None, None, tmp_path / "asym")
    asuka = asuka_layout_checkpoint(gate_conv=True)
    torch.save({"state_dict": asuka}, tmp_path / "asuka_decoder.ckpt")

    z, pixels, mask = comfy_inputs()
    ref = integration.decode_with_prior(sd_model, z, pixels, mask)
    for name in ("base.ckpt", "base.safetensors", "asym"):
        model = load_autoencoder(tmp_path / name)
        assert (model.scaling_factor, model.decoder.has_condition) == (0.18215, True)
        torch.testing.assert_close(integration.decode_with_prior(model, z, pixels, mask), ref, rtol=0, atol=1e-5)
    model = load_autoencoder(tmp_path / "asuka_decoder.ckpt")
    params = autoencoder_config(asuka)["params"]
    assert (model.scaling_factor, model.shift_factor) == (0.3611, 0.1159)  # ASUKA's branch -> FLUX.1
    assert params["decoder_overrides"] == {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "condition": True,
                                           "concat_mask": True, "mask_resize": "area", "gate_conv": True}
    # an explicit config is used as given (and checked against the file)
    model = load_autoencoder(tmp_path / "base.ckpt", config=REPO / "configs/tiny/autoencoder_kl_tiny.yaml")
    torch.testing.assert_close(integration.decode_with_prior(model, z, pixels, mask), ref, rtol=0, atol=1e-5)
    # FLUX.2 (32 channels, BatchNorm latent statistics in bn.*): the statistics load with the file
    flux2 = tiny("autoencoder_kl_flux2_tiny.yaml")
    with torch.no_grad():
        flux2.bn.running_mean.normal_()
        flux2.bn.running_var.uniform_(0.5, 2.0)
    save_state_dict(flux2.state_dict(), tmp_path / "flux2.safetensors")
    model = load_autoencoder(tmp_path / "flux2.safetensors")
    torch.testing.assert_close(model.bn.running_var, flux2.bn.running_var, rtol=0, atol=0)
    z2 = torch.randn(1, 32, 8, 12)
    torch.testing.assert_close(model.unscale_latents(z2), flux2.unscale_latents(z2), rtol=0, atol=0)


def test_latent_space_and_layout_errors(tmp_path):
    # a 16-channel decoder of ours without ASUKA's mask input: SD 3.x or FLUX.1, the tensors do not tell
    sd = dict(tiny("autoencoder_kl_flux_tiny.yaml").state_dict())
    sd["decoder.encoder.layers.0.weight"] = sd["decoder.encoder.layers.0.weight"][:, :3]
    with pytest.raises(CheckpointError, match="say which latent space it is.*sd3 or flux"):
        autoencoder_config(sd, source="ours16.safetensors")
    assert autoencoder_config(sd, latent_space="sd3")["params"]["scaling_factor"] == 1.5305
    with pytest.raises(CheckpointError, match="latent space sd .*4 latent channels with quant convs.*16 latent"):
        autoencoder_config(sd, latent_space="sd", source="ours16.safetensors")
    save_state_dict({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: not an autoencoder checkpoint"):
        load_autoencoder(tmp_path / "other.safetensors")


def test_bfloat16_weights_as_comfyui_loads_them_on_gpus():
    """ComfyUI casts the VAE to its working dtype (bfloat16 on GPUs); IMAGE and MASK stay float32 and are cast."""
    model = make_autoencoder()
    z, pixels, mask = comfy_inputs()
    ref = integration.decode_with_prior(model, z, pixels, mask)
    got = integration.decode_with_prior(model.to(torch.bfloat16), z, pixels, mask)
    assert got.dtype == torch.float32
    assert 0 < (got - ref).abs().mean() < 0.01  # bfloat16 rounding (8 bits of mantissa) in [0, 1] images


# ---------------------------------------------------------------------- finding our ldm (comfyui_nodes/_project.py)
FIND_SCRIPT = """
import importlib.util, json, sys
nodes = sys.argv[1]
spec = importlib.util.spec_from_file_location("copied_nodes", nodes + "/__init__.py",
                                              submodule_search_locations=[nodes])
module = importlib.util.module_from_spec(spec); sys.modules["copied_nodes"] = module; spec.loader.exec_module(module)
ours = sys.modules["copied_nodes._project"].LDM
model_cls = ours.util.get_obj_from_str("ldm.models.autoencoder.AutoencoderKL")
print(json.dumps({"name": ours.__name__, "file": ours.__file__, "ldm_imported": "ldm" in sys.modules,
                  "target_module": model_cls.__module__, "nodes": sorted(module.NODE_CLASS_MAPPINGS)}))
"""


def test_a_copied_node_folder_finds_the_installed_project_and_skips_an_ldm_that_is_not_ours(tmp_path):
    """docs/comfyui.md's "or copy the folder": no checkout beside it, so the installed distribution names it; an
    ``ldm`` beside the copy without the marker file (another project's) is passed over. Runs as this interpreter with
    no PYTHONPATH, so it needs the project installed from this checkout (make venv)."""
    import importlib.metadata
    import json
    import shutil
    import subprocess

    from comfyui_nodes import _project

    installed = [p.resolve() for p in _project._installed_folders()]
    if (REPO / "ldm") not in installed:
        pytest.skip(f"this interpreter's {_project.DISTRIBUTION} is not installed from {REPO} (make venv does)")
    assert importlib.metadata.distribution(_project.DISTRIBUTION)
    shutil.copytree(REPO / "comfyui_nodes", tmp_path / "comfyui_nodes", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "ldm").mkdir()
    (tmp_path / "ldm" / "__init__.py").write_text("raise ImportError('not this one')\n")
    env = user_env()
    proc = subprocess.run([sys.executable, "-c", FIND_SCRIPT, str(tmp_path / "comfyui_nodes")], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["name"] == "asymmetric_vae_ldm" and got["file"] == str(REPO / "ldm" / "__init__.py")
    assert got["ldm_imported"] is False  # sys.modules["ldm"] is left to whoever owns the name
    assert got["target_module"] == "asymmetric_vae_ldm.models.autoencoder"  # a config's ldm.* target
    assert got["nodes"] == ["AsymmetricVAEDecode", "AsymmetricVAEDecodeTiled", "AsymmetricVAELoader"]


def test_no_project_ldm_is_an_error_saying_how_to_install(monkeypatch, tmp_path):
    from comfyui_nodes import _project

    (tmp_path / "ldm").mkdir()
    (tmp_path / "ldm" / "__init__.py").write_text("")
    monkeypatch.setattr(_project, "candidate_folders", lambda: iter([tmp_path / "ldm"]))
    with pytest.raises(ImportError, match=r"not found \(tried .*ldm\); install the project .*pip install -e"):
        _project.find_ldm_folder()
    assert _project.LDM is sys.modules["ldm"]  # in a process that imported ours as ldm, the nodes use it


# ---------------------------------------------------------------------- the node pack's metadata
def test_node_pack_requirements_are_ranges_that_hold_the_projects_pins():
    """comfyui_nodes/pyproject.toml: the registry's required fields, and ranges (not pins) within which every pin
    of requirements.txt lies, so the tested versions satisfy what ComfyUI's tools install."""
    import tomllib

    from packaging.requirements import Requirement

    meta = tomllib.loads((REPO / "comfyui_nodes" / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "asymmetric-vae" and meta["project"]["version"].count(".") == 2
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            pins[pin.name.lower()] = next(iter(pin.specifier)).version
    ranges = [Requirement(d) for d in meta["project"]["dependencies"]]
    assert ranges and all(not any(s.operator == "==" for s in r.specifier) for r in ranges)
    for r in ranges:
        assert r.name.lower() in pins, f"{r.name} is not one of the project's requirements"
        assert r.specifier.contains(pins[r.name.lower()]), f"{r}: the tested pin {pins[r.name.lower()]} is outside"
