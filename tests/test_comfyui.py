"""The ComfyUI nodes without ComfyUI: the node classes' contracts, ComfyUI's conventions (IMAGE (B,H,W,C) in [0,1],
MASK (B,H,W), 1 = inpaint) against our ``AutoencoderKL.decode`` on the same tensors, the resize and batch rules,
loading every format from the tensors alone, and the errors. tests/test_comfyui_integration.py runs the nodes in
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
from tests.conftest import REPO, make_autoencoder


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
    assert loader["required"]["latent_space"][0] == ["auto", "sd", "sdxl", "sd3", "flux", "flux2"]
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


def test_latent_of_another_space_names_both():
    model = make_autoencoder()
    _, pixels, mask = comfy_inputs()
    with pytest.raises(ValueError, match=r"16 channels \(SD 3.x or FLUX.1\).*SD 1.x / 2.x's latent space \(4"):
        integration.decode_with_prior(model, torch.zeros(1, 16, 8, 12), pixels, mask)
    with pytest.raises(ValueError, match="video latents"):
        integration.decode_with_prior(model, torch.zeros(1, 4, 2, 8, 12), pixels, mask)


# ---------------------------------------------------------------------- every format, config from the tensors
def test_every_format_loads_from_its_tensors_alone(tmp_path):
    from tests.test_asuka import asuka_layout_checkpoint

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
