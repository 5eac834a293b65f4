"""The Qwen-Image latent space: our 2-D network against diffusers' causal 3-D ``AutoencoderKLQwenImage`` at T = 1
(random perturbed weights), its files (diffusers folder, Wan-2.1 single file) through the one loader, the export
back, and the condition branch."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_same_tensors
from tests.training.test_main import image_folder  # noqa: F401 - fixture, requested by name below

TINY_QWEN = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)


def perturbed_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initialisation (gains included), so that a swapped or dropped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
    return module.eval()


def diffusers_qwen(seed: int = 0, **config):
    import diffusers

    torch.manual_seed(seed)
    return perturbed_(diffusers.AutoencoderKLQwenImage(**{**TINY_QWEN, **config}), seed)


def ours_of(vae, condition: bool = False, seed: int = 0):
    """Our AutoencoderKL (architecture qwenimage) holding ``vae``'s weights (through the loader's conversion)."""
    from ldm.checkpoints.qwenimage import ddconfig_of_diffusers, diffusers_qwenimage_to_ours
    from ldm.latent_spaces import normalization_from_diffusers
    from ldm.models.autoencoder import AutoencoderKL

    sd, overrides = diffusers_qwenimage_to_ours(vae.state_dict(), dict(vae.config))
    torch.manual_seed(seed)
    model = AutoencoderKL(ddconfig=ddconfig_of_diffusers(vae.config), lossconfig={"target": "torch.nn.Identity"},
                          embed_dim=vae.config.z_dim, architecture="qwenimage",
                          decoder_overrides={**overrides, "condition": condition},
                          **normalization_from_diffusers(dict(vae.config)).to_params()).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("decoder.encoder.") for k in missing)
    return model


def image(seed: int = 1, size=(32, 48)) -> torch.Tensor:
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_each_causal_conv_at_one_frame_is_a_2d_conv_with_the_last_temporal_slice():
    """Hooks on every QwenImageCausalConv3d of the full-size AutoencoderKLQwenImage() (random perturbed weights)
    during its encode + decode of one image (its own cached path): each output equals conv2d(x[:, :, 0],
    w[:, :, -1]) within 2.3e-6 (float32); the decoder has 31 of them besides its 2 time_conv, which never run."""
    import diffusers
    import torch.nn.functional as F
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    torch.manual_seed(0)
    vae = perturbed_(diffusers.AutoencoderKLQwenImage(), 0)
    checked, temporal = [], []

    def hook(name):
        def check(module, args, output):
            if name.endswith("time_conv"):
                temporal.append(name)
                return
            x = args[0]
            assert x.shape[2] == 1 and output.shape[2] == 1, name
            pad = module.kernel_size[-1] // 2
            ref = F.conv2d(x[:, :, 0], module.weight[:, :, -1], module.bias, stride=module.stride[1:], padding=pad)
            torch.testing.assert_close(output[:, :, 0], ref, rtol=0, atol=2.3e-6)
            checked.append(name)
        return check

    convs = {n: m for n, m in vae.named_modules() if isinstance(m, QwenImageCausalConv3d)}
    for name, module in convs.items():
        module.register_forward_hook(hook(name))
    with torch.no_grad():
        z = vae.encode(image(size=(16, 32))[:, :, None]).latent_dist.mode()
        vae.decode(z)
    assert not temporal
    assert sum(n.startswith("decoder.") for n in checked) == 31
    assert sorted(set(checked)) == sorted(n for n in convs if not n.endswith("time_conv"))
    assert len(checked) == len(set(checked))  # each ran once


def test_encode_decode_and_normalisation_equal_diffusers_at_one_frame():
    """Posterior moments, decode (diffusers clamps its output to [-1, 1]) and the latent normalisation of the
    Qwen-Image pipelines, within 1e-4."""
    from ldm.latent_spaces import LATENT_SPACES, latent_space_of

    vae = diffusers_qwen()
    ours = ours_of(vae)
    assert latent_space_of(ours) is LATENT_SPACES["qwenimage"]
    x = image()
    with torch.no_grad():
        theirs = vae.encode(x[:, :, None]).latent_dist
        posterior = ours.encode(x)
        torch.testing.assert_close(posterior.mean, theirs.mean[:, :, 0], rtol=0, atol=1e-4)
        torch.testing.assert_close(posterior.logvar, theirs.logvar[:, :, 0], rtol=0, atol=1e-4)
        z = theirs.mode()
        torch.testing.assert_close(ours.decode(z[:, :, 0]).clamp(-1, 1), vae.decode(z).sample[:, :, 0],
                                   rtol=0, atol=1e-4)
    # QwenImagePipeline._encode_vae_image / __call__'s decode, with its 1 / latents_std
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(ours.scale_latents(z[:, :, 0]), ((z - mean) * inv_std)[:, :, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.unscale_latents(z[:, :, 0]), (z / inv_std + mean)[:, :, 0], rtol=0, atol=1e-5)


def test_our_keys_are_wan_21_names_as_diffusers_converter_reads_them():
    """diffusers' own Wan-2.1 converter (convert_wan_vae_to_diffusers, written for 2 blocks per level) maps the
    full-size vanilla model's keys, in the single file's names (top-level conv1 / conv2), exactly as ours does,
    onto the keys of AutoencoderKLQwenImage() (time_conv aside)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from ldm.checkpoints.qwenimage import ours_to_diffusers_keys
    from ldm.util import instantiate_from_config
    from tests.models.test_latent_spaces import load_params

    params = load_params("configs/autoencoder/qwenimage/vanilla.yaml")
    with torch.device("meta"):
        ours = instantiate_from_config({"target": "ldm.models.autoencoder.AutoencoderKL",
                                        "params": {**params, "ckpt_path": None}})
        theirs = diffusers.AutoencoderKLQwenImage()
    keys = list(ours.state_dict())
    wan = dict(zip(read_wan_keys(ours), keys))
    assert len(convert_wan_vae_to_diffusers({w: torch.zeros(1) for w in wan})) == len(wan)
    expected = {k: next(iter(convert_wan_vae_to_diffusers({w: torch.zeros(1)}))) for w, k in wan.items()}
    assert {k: ours_to_diffusers_keys(k, 2) for k in keys} == expected
    assert set(expected.values()) == {k for k in theirs.state_dict() if ".time_conv." not in k}


def test_diffusers_folder_and_wan_single_file_load_through_the_one_loader(tmp_path):
    """An AutoencoderKLQwenImage folder (save_pretrained) and the same weights in the Wan-2.1 single-file layout
    (3-D tensors, named as diffusers' converter reads them) load into the vanilla
    config by ckpt_path / init_from_ckpt, giving the tensors of the conversion; a KL config is refused naming
    the architecture."""
    from ldm.checkpoints.files import CheckpointError
    from ldm.checkpoints.keys import read_state_dict
    from ldm.checkpoints.qwenimage import ddconfig_of_diffusers
    from ldm.models.autoencoder import AutoencoderKL
    from tests.models.test_latent_spaces import make_16ch

    vae = diffusers_qwen(num_res_blocks=2)
    ours = ours_of(vae)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    assert_same_tensors(read_state_dict(tmp_path / "pipe" / "vae"), ours.state_dict())

    wan = wan_file(vae, tmp_path / "qwen_image_vae.safetensors")
    assert sum(".time_conv." in k for k in wan) == 8 and wan["decoder.conv1.weight"].ndim == 5
    fresh = AutoencoderKL(ddconfig=ddconfig_of_diffusers(vae.config), embed_dim=16, architecture="qwenimage",
                          lossconfig={"target": "torch.nn.Identity"}, **ours.latent_norm.to_params())
    for source in (tmp_path / "qwen_image_vae.safetensors", tmp_path / "pipe"):
        fresh.init_from_ckpt(source, fresh_condition=False)
        assert_same_tensors(fresh.state_dict(), ours.state_dict())
    with pytest.raises(CheckpointError, match="qwenimage"):
        make_16ch(condition=False).init_from_ckpt(tmp_path / "qwen_image_vae.safetensors")


def read_wan_keys(model) -> list:
    """Our keys in the single file's names (top-level conv1 / conv2) plus the time_conv keys diffusers has."""
    from ldm.checkpoints.qwenimage import WAN_QUANT_CONVS

    renames = {new: old for old, new in WAN_QUANT_CONVS}
    return [next((renames[p] + k[len(p):] for p in renames if k.startswith(p)), k) for k in model.state_dict()]


def test_vanilla_export_round_trips_through_an_autoencoderklqwenimage_folder(tmp_path):
    """Ours -> AutoencoderKLQwenImage folder -> from_pretrained decodes as ours at T = 1 -> back: the same
    tensors; a decoder with condition branch is refused naming why."""
    import diffusers

    from ldm.checkpoints.diffusers import write_diffusers_folder
    from ldm.checkpoints.files import CheckpointError
    from ldm.checkpoints.keys import read_state_dict
    from ldm.checkpoints.qwenimage import ddconfig_of_diffusers

    vae = diffusers_qwen(seed=3)
    ours, ddconfig = ours_of(vae), ddconfig_of_diffusers(vae.config)
    folder = write_diffusers_folder(ours.state_dict(), ddconfig, None,
                                    tmp_path / "vae", normalization=ours.latent_norm, architecture="qwenimage")
    theirs = diffusers.AutoencoderKLQwenImage.from_pretrained(folder).eval()
    assert list(theirs.config.latents_mean) == list(ours.latent_norm.mean)
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z[:, :, None]).sample[:, :, 0], ours.decode(z).clamp(-1, 1),
                                   rtol=0, atol=1e-4)
    assert_same_tensors(read_state_dict(folder), ours.state_dict())
    conditioned = ours_of(vae, condition=True)
    with pytest.raises(CheckpointError, match="no condition branch"):
        write_diffusers_folder(conditioned.state_dict(), ddconfig, {"condition": True},
                               tmp_path / "asym", architecture="qwenimage")


def test_condition_branch_keeps_the_known_region_and_reads_the_widths_at_each_blend():
    """With the branch, a binary mask's kept pixels come from the masked image's features blended before the head
    (the decoder's features replaced where mask = 0; the head's 3x3 conv reads one pixel across the edge); an
    all-ones mask is the plain decoder; widths are the decoder's at each blend (the upsamplers halve the width)."""
    import torch.nn.functional as F

    from ldm.modules.diffusionmodules.qwenimage import qwenimage_condition_widths

    assert qwenimage_condition_widths(96, (1, 2, 4, 4)) == [96, 96, 192, 192, 384]
    vae = diffusers_qwen()
    plain, ours = ours_of(vae), ours_of(vae, condition=True)
    assert [layer.out_channels for layer in ours.decoder.encoder.layers] == qwenimage_condition_widths(8, [1, 2, 4, 4])
    z = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    x = image(size=(32, 48))
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., 8:24, 16:40] = 1
    with torch.no_grad():
        assert torch.equal(ours.decode(z, x, torch.ones_like(mask)), plain.decode(z))
        out = ours.decode(z, x, mask)
        assert not torch.allclose(out, plain.decode(z))
        # the kept region (one pixel in from its edge) does not depend on z: every feature there is the branch's
        far = 1 - F.max_pool2d(mask, 3, stride=1, padding=1)
        assert far.sum() > 0
        torch.testing.assert_close(out[0] * far[0], out[1] * far[0], rtol=0, atol=1e-5)
        assert not torch.allclose(out[0] * mask[0], out[1] * mask[0])


def wan_file(vae, path) -> dict:
    """``vae``'s tensors (3-D, time_conv included) saved in the Wan-2.1 single-file layout: each key's Wan name is
    the one diffusers' own converter (convert_wan_vae_to_diffusers) maps onto it; returns them."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import save_file

    from ldm.checkpoints.qwenimage import WAN_QUANT_CONVS, diffusers_to_ours_keys

    renames = {ours: wan for wan, ours in WAN_QUANT_CONVS}
    out = {}
    for key, tensor in vae.state_dict().items():
        ours = diffusers_to_ours_keys(key, vae.config.num_res_blocks)
        wan = next((renames[p] + ours[len(p):] for p in renames if ours.startswith(p)), ours)
        assert list(convert_wan_vae_to_diffusers({wan: torch.zeros(1)})) == [key], (key, wan)
        out[wan] = tensor.clone().contiguous()
    save_file(out, str(path))
    return out


def test_main_trains_a_tiny_qwenimage_asymmetric_decoder_on_the_frozen_encoder(tmp_path, request, monkeypatch):
    """main.py end to end in Qwen-Image's latent space: starts from a Wan-2.1-layout single file, encoder and quant
    convs frozen (as loaded), the decoder and a fresh condition branch trained, a few steps."""

    from ldm.checkpoints.keys import read_state_dict
    from ldm.checkpoints.tensors import autoencoder_state_dict
    from tests.models.test_latent_spaces import tiny_training_config, train_with_main

    images = request.getfixturevalue("image_folder")
    wan_file(diffusers_qwen(seed=4, num_res_blocks=2), tmp_path / "qwen_image_vae.safetensors")
    loaded = autoencoder_state_dict(read_state_dict(tmp_path / "qwen_image_vae.safetensors"))
    config = tiny_training_config("configs/tiny/autoencoder_kl_qwenimage_tiny.yaml",
                                  tmp_path / "qwen_image_vae.safetensors", images)
    sd = train_with_main(tmp_path, monkeypatch, config, "qwenimage", steps=2)
    frozen = [k for k in loaded if k.startswith(("encoder.", "quant_conv.", "post_quant_conv."))]
    assert frozen and all(torch.equal(sd[k], loaded[k]) for k in frozen)
    assert not torch.equal(sd["decoder.head.2.weight"], loaded["decoder.head.2.weight"])
    assert "decoder.encoder.layers.0.weight" in sd


def test_full_size_configs_have_diffusers_parameter_counts():
    """The vanilla config's encoder, quant convs and decoder have AutoencoderKLQwenImage()'s parameters with each
    causal kernel at one temporal tap and no time_conv (meta device); the variants' decoders grow as stated."""
    import diffusers

    from tests.models.test_latent_spaces import build_meta

    with torch.device("meta"):
        vae = diffusers.AutoencoderKLQwenImage()
    one_frame = {}
    for part in ("encoder", "decoder"):
        one_frame[part] = sum(p.numel() // (p.shape[2] if p.ndim == 5 else 1)
                              for n, p in getattr(vae, part).named_parameters() if ".time_conv." not in n)

    def numel(module):
        return sum(p.numel() for p in module.parameters())

    counts = {}
    for name in ("vanilla", "asymmetric_base", "asymmetric_large", "asymmetric_large2"):
        model = build_meta(f"configs/autoencoder/qwenimage/{name}.yaml")
        branch = numel(model.decoder.encoder) if model.decoder.has_condition else 0
        counts[name] = (numel(model.decoder) - branch, branch)
        assert numel(model.encoder) == one_frame["encoder"] == 19_306_592
        assert numel(model.quant_conv) + numel(model.post_quant_conv) == 1_328
    assert counts["vanilla"] == (one_frame["decoder"], 0) == (25_291_683, 0)
    assert counts == {"vanilla": (25_291_683, 0), "asymmetric_base": (25_291_683, 2_150_880),
                      "asymmetric_large": (70_665_267, 4_836_816), "asymmetric_large2": (174_692_931, 8_596_416)}


def test_a_qwenimage_file_tells_its_config_to_the_loader_without_one(tmp_path):
    """load_autoencoder (the ComfyUI loader's and convert_checkpoint's path) reads a Qwen-Image file's config off
    its tensors: the released VAE (Wan-2.1 single file, 3-D) and an asymmetric decoder of ours with its own width,
    depth and condition branch, each in the Qwen-Image latent space; another latent space is refused."""
    from safetensors.torch import save_file

    from ldm.checkpoints.architecture import autoencoder_config
    from ldm.checkpoints.files import CheckpointError
    from ldm.checkpoints.keys import read_state_dict
    from ldm.checkpoints.qwenimage import ddconfig_of_diffusers
    from ldm.latent_spaces import LATENT_SPACES, latent_space_of
    from ldm.loading import load_autoencoder
    from ldm.models.autoencoder import AutoencoderKL

    vae = diffusers_qwen(seed=5, num_res_blocks=2)
    wan_file(vae, tmp_path / "qwen_image_vae.safetensors")
    model = load_autoencoder(tmp_path / "qwen_image_vae.safetensors")
    assert latent_space_of(model) is LATENT_SPACES["qwenimage"] and not model.decoder.has_condition
    assert_same_tensors(model.state_dict(), ours_of(vae).state_dict())

    torch.manual_seed(0)
    wide = AutoencoderKL(ddconfig=ddconfig_of_diffusers(vae.config), embed_dim=16, architecture="qwenimage",
                         lossconfig={"target": "torch.nn.Identity"},
                         decoder_overrides={"ch": 12, "num_res_blocks": 3, "condition": True},
                         **LATENT_SPACES["qwenimage"].normalization.to_params())
    save_file(wide.state_dict(), str(tmp_path / "large.safetensors"))
    params = autoencoder_config(read_state_dict(tmp_path / "large.safetensors"))["params"]
    assert params["decoder_overrides"] == {"ch": 12, "num_res_blocks": 3, "condition": True}
    assert_same_tensors(load_autoencoder(tmp_path / "large.safetensors").state_dict(), wide.state_dict())
    with pytest.raises(CheckpointError, match="not latent space flux"):
        load_autoencoder(tmp_path / "large.safetensors", latent_space="flux")


def test_comfyui_first_stage_reads_and_writes_qwen_image_latents_as_one_frame(tmp_path):
    """ComfyUI hands a Qwen-Image (Wan) VAE one frame per image: (B, 3, 1, H, W) in, (B, 16, 1, h, w) latents out,
    as diffusers' encode of one frame; decoding such a latent (plain, or with the prior through the decode node's
    path) equals the 4-D decode; a video latent is refused."""
    from ldm.integrations import comfyui as integration
    from ldm.loading import load_autoencoder

    vae = diffusers_qwen(seed=6, num_res_blocks=2)
    wan_file(vae, tmp_path / "qwen_image_vae.safetensors")
    model = load_autoencoder(tmp_path / "qwen_image_vae.safetensors")
    stage = integration.ComfyFirstStage(model)
    x = image(size=(32, 48))
    with torch.no_grad():
        z = stage.encode(x[:, :, None])
        assert z.shape == (1, 16, 1, 4, 6)
        torch.testing.assert_close(z, vae.encode(x[:, :, None]).latent_dist.mode(), rtol=0, atol=1e-4)
        out = stage.decode(z)
        assert out.shape == (1, 3, 1, 32, 48)
        assert torch.equal(out[:, :, 0], model.decode(z[:, :, 0]))
    pixels = (x.permute(0, 2, 3, 1) + 1) / 2
    mask = torch.zeros(1, 32, 48)
    torch.testing.assert_close(integration.decode_with_prior(model, z, pixels, mask),
                               integration.decode_with_prior(model, z[:, :, 0], pixels, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="video latents are not supported"):
        stage.decode(z.expand(-1, -1, 2, -1, -1))


def test_benchmark_script_decodes_both_and_measures_a_training_step(capsys):
    """scripts/benchmark_qwenimage.py (the lead's full-size CPU timing) on a narrow network: both decoders agree;
    the training-step measurement runs on a config of the family. No timing is checked."""
    import re

    from scripts import benchmark_qwenimage

    assert benchmark_qwenimage.main(["--size", "32", "--base_dim", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"max \|difference\|: (\S+)", out).group(1)) < 1e-4
    assert benchmark_qwenimage.main(["--train_step", "asymmetric_base", "--size", "32", "--base_dim", "8"]) == 0
    assert "one training step of asymmetric_base at 32x32" in capsys.readouterr().out


def test_modular_inpaint_decode_block_replaces_the_pipelines_decoder_step():
    """AsymmetricQwenImageDecoderStep on the modular pipeline's state: with the VAE's own decoder it gives what
    QwenImageDecoderStep gives (diffusers clamps to [-1, 1]); with the branch it decodes with the processed image
    and mask (the kept region follows the image); it sits at the inpaint branch's decoder path of
    QwenImageAutoBlocks; another latent space is refused naming both."""
    from types import SimpleNamespace

    from diffusers import QwenImageAutoBlocks
    from diffusers.modular_pipelines.modular_pipeline import PipelineState
    from diffusers.modular_pipelines.qwenimage.decoders import QwenImageDecoderStep

    from ldm.integrations.diffusers_modular import AsymmetricQwenImageDecoderStep
    from ldm.integrations.diffusers_pipelines import PipelineError
    from tests.models.test_latent_spaces import make_16ch

    vae = diffusers_qwen(seed=7)
    components = SimpleNamespace(vae=vae)
    latents = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(0))
    x = image(size=(32, 48))
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., :, :24] = 1

    def decode(step, picture=x):
        state = PipelineState()
        for key, value in (("latents", latents), ("processed_image", picture), ("processed_mask_image", mask)):
            state.set(key, value)
        return step(components, state)[1].get("images")

    theirs = decode(QwenImageDecoderStep())
    vanilla = AsymmetricQwenImageDecoderStep(ours_of(vae))
    torch.testing.assert_close(decode(vanilla).clamp(-1, 1), theirs, rtol=0, atol=1e-4)
    asymmetric = AsymmetricQwenImageDecoderStep(ours_of(vae, condition=True))
    other = x.clone()
    other[..., 40:] = -other[..., 40:]  # inside the kept half
    assert torch.equal(decode(vanilla, other), decode(vanilla))  # the pipeline's own path never reads the image
    changed = (decode(asymmetric, other) - decode(asymmetric)).abs().amax(1)[0]
    assert changed[:, 42:].max() > 0.1  # the kept region follows the image given

    blocks = QwenImageAutoBlocks()
    blocks.sub_blocks["decode"].sub_blocks["inpaint_decode"].sub_blocks["decode"] = asymmetric
    assert blocks.sub_blocks["decode"].sub_blocks["inpaint_decode"].sub_blocks["decode"] is asymmetric
    with pytest.raises(PipelineError, match="the decoder: 16 channels, scaling_factor 0.3611"):
        decode(AsymmetricQwenImageDecoderStep(make_16ch()))
