"""FLUX.2's latent space (32 channels, quant convs, latents normalised by BatchNorm statistics over 2x2 patches)
and the per-channel normalisation, against diffusers' AutoencoderKLFlux2 and the formulas its pipelines apply."""
from __future__ import annotations

import pytest
import torch

from ldm.latent_spaces import PatchBatchNorm, PerChannel
from tests.checkpoints.test_interop import randomize_
from tests.conftest import TINY_DDCONFIG, assert_same_tensors
from tests.training.test_main import image_folder  # noqa: F401 - fixture, requested by name below

TINY32 = dict(TINY_DDCONFIG, z_channels=32)
BN = {"patch_size": 2, "batch_norm_eps": 1e-4}


def set_statistics_(model, seed: int = 0):
    """Random BatchNorm running statistics (the released VAE's are far from 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    n = model.bn.num_features
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(n, generator=g))
        model.bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
        model.bn.num_batches_tracked.fill_(1234)
    return model


def make_flux2(condition: bool = False, seed: int = 0, decoder_ch: int = 32, **kwargs):
    from ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(ddconfig=TINY32, lossconfig={"target": "torch.nn.Identity"}, embed_dim=32,
                          decoder_overrides={"condition": condition, "ch": decoder_ch}, latent_batch_norm=BN,
                          **kwargs)
    return set_statistics_(randomize_(model, seed), seed)


def diffusers_flux2(decoder_widths=None):
    import diffusers

    return diffusers.AutoencoderKLFlux2(
        block_out_channels=[32, 64], decoder_block_out_channels=decoder_widths, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=32,
        norm_num_groups=32, batch_norm_eps=1e-4).eval()


def pipeline():
    from diffusers import Flux2KleinInpaintPipeline

    return Flux2KleinInpaintPipeline


# ------------------------------------------------------------------------------------------ normalisation
def test_batch_norm_normalisation_equals_the_flux2_pipelines():
    """scale_latents keeps the VAE layout; patchified, it is bit for bit what Flux2KleinInpaintPipeline computes
    from the same raw latents (_patchify_latents, then the bn statistics), and unscale_latents is its decode-side
    inverse (denormalise, _unpatchify_latents)."""
    from ldm.latent_spaces import patchify_latents, unpatchify_latents

    pipe = pipeline()
    model = make_flux2()
    vae = diffusers_flux2()
    vae.bn.load_state_dict(model.bn.state_dict())
    z = torch.randn(2, 32, 6, 8) * 2 + 0.5
    ours = model.scale_latents(z)
    assert ours.shape == z.shape
    x = pipe._patchify_latents(z)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    theirs = (x - mean) / std
    assert torch.equal(patchify_latents(ours), theirs)
    assert torch.equal(patchify_latents(z), x) and torch.equal(unpatchify_latents(x), z)
    assert torch.equal(model.unscale_latents(ours), pipe._unpatchify_latents(theirs * std + mean))
    torch.testing.assert_close(model.unscale_latents(ours), z)
    # BatchNorm2d itself (eval mode) agrees: the statistics are the bn module's own
    torch.testing.assert_close(unpatchify_latents(model.bn.eval()(x)), ours)
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        model.scale_latents(torch.randn(1, 32, 5, 4))
    with pytest.raises(ValueError, match="unpatchify_latents first"):
        model.unscale_latents(theirs)


def test_per_channel_normalisation_is_the_formula_of_diffusers_sdxl_pipelines():
    """Playground v2.5-style VAE configs (latents_mean / latents_std): diffusers' SDXL pipelines encode with
    (z - mean) * scaling_factor / std and decode with latents * std / scaling_factor + mean."""
    from ldm.models.autoencoder import AutoencoderKL

    mean, std, scale = [0.5, -1.25, 0.125, 2.0], [3.0, 0.75, 1.5, 0.25], 0.5
    model = AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4,
                          scaling_factor=scale, latents_mean=mean, latents_std=std)
    assert model.latent_normalization == "per_channel"
    z = torch.randn(2, 4, 4, 4)
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    assert torch.equal(model.scale_latents(z), (z - m) * scale / s)
    assert torch.equal(model.unscale_latents(z), z * s / scale + m)
    torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)


@pytest.mark.parametrize("kwargs, match", [
    ({"latents_mean": [0.0] * 4}, "come together"),
    ({"latents_mean": [0.0] * 3, "latents_std": [1.0] * 3}, "one value per latent channel"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0, 1.0, 0.0, 1.0]}, "must be > 0"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4, "shift_factor": 0.1}, "no shift_factor"),
    ({"latent_batch_norm": BN, "scaling_factor": 0.3611}, "scaling_factor must be 1"),
    ({"latent_batch_norm": {"eps": 1e-4}}, "unknown entries"),
])
def test_inconsistent_normalisation_arguments_are_refused(kwargs, match):
    from ldm.models.autoencoder import AutoencoderKL

    with pytest.raises(ValueError, match=match):
        AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4, **kwargs)


# ------------------------------------------------------------------------------------------- diffusers
def test_encode_and_decode_equal_diffusers_autoencoderklflux2(tmp_path):
    """Our vanilla FLUX.2 VAE exported to an AutoencoderKLFlux2 folder computes what diffusers computes from it,
    and the folder reads back tensor-identical, statistics included. The decoder has other widths than the encoder
    (decoder_block_out_channels, as in BFL's small decoder); the same-width case is the starting-weights test."""
    decoder_ch = 64
    import diffusers

    from ldm.checkpoints.diffusers import write_diffusers_folder
    from ldm.checkpoints.keys import read_state_dict
    from tests.models.test_latent_spaces import assert_same_vae

    ours = make_flux2(decoder_ch=decoder_ch).eval()
    folder = write_diffusers_folder(ours.state_dict(), TINY32, {"condition": False, "ch": decoder_ch},
                                    tmp_path / "vae", normalization=PatchBatchNorm(1e-4, 2))
    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(folder).eval()
    assert theirs.config.batch_norm_eps == 1e-4 and list(theirs.config.patch_size) == [2, 2]
    assert list(theirs.config.decoder_block_out_channels) == [64, 128]
    assert torch.equal(theirs.bn.running_var, ours.bn.running_var)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert_same_vae(ours, theirs, image)

    back = read_state_dict(folder)
    original = ours.state_dict()
    assert_same_tensors(back, original)


def test_diffusers_flux2_folder_loads_as_starting_weights_of_the_asymmetric_decoder(tmp_path):
    """A pipeline folder (vae/ of AutoencoderKLFlux2, saved by diffusers itself) starts training: encoder, quant
    convs, statistics and decoder come from it, the condition branch starts fresh."""
    vae = randomize_(diffusers_flux2(), 3)
    with torch.no_grad():
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    model = make_flux2(condition=True, seed=7)
    model.init_from_ckpt(tmp_path / "pipe")
    theirs = vae.state_dict()
    assert torch.equal(model.bn.running_mean, theirs["bn.running_mean"])
    assert torch.equal(model.quant_conv.weight, theirs["quant_conv.weight"])
    assert torch.equal(model.decoder.conv_out.weight, theirs["decoder.conv_out.weight"])
    z = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        assert (model.decode(z) - vae.decode(z).sample).abs().max() < 1e-4


def test_asymmetric_flux2_decoder_export_is_refused_naming_why():
    from ldm.checkpoints.diffusers import ldm_to_diffusers
    from ldm.checkpoints.files import CheckpointError

    with pytest.raises(CheckpointError, match="AsymmetricAutoencoderKL has no BatchNorm"):
        ldm_to_diffusers(make_flux2(condition=True).state_dict())


# ------------------------------------------------------------------------------------------- BFL files
def test_bfl_flux2_ae_safetensors_layout_loads(tmp_path):
    """BFL's FLUX.2 AutoEncoder keeps the quant convs inside encoder / decoder (encoder.quant_conv,
    decoder.post_quant_conv) and the statistics as bn.*; the file loads into the training config, and the same
    tensors in a config without latent_batch_norm (or the FLUX.1 one) are refused naming why."""
    from safetensors.torch import save_file

    from ldm.checkpoints.files import CheckpointError
    from ldm.checkpoints.tensors import to_bfl_flux2_layout
    from ldm.models.autoencoder import AutoencoderKL

    released = make_flux2(seed=11)
    bfl = to_bfl_flux2_layout(released.state_dict())
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.bias", "bn.running_var",
            "bn.num_batches_tracked"} <= bfl.keys()
    assert not any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in bfl)
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(path))
    model = make_flux2(condition=True, seed=12)
    model.init_from_ckpt(path)
    for k, v in released.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    z = torch.randn(1, 32, 4, 4)
    assert torch.equal(model.scale_latents(z), released.scale_latents(z))

    no_bn = AutoencoderKL(ddconfig=TINY32, lossconfig={"target": "torch.nn.Identity"}, embed_dim=32,
                          scaling_factor=1.0)
    with pytest.raises(CheckpointError, match=r"latent BatchNorm statistics.*configs/autoencoder/flux2/"):
        no_bn.init_from_ckpt(path)
    flux1 = AutoencoderKL(ddconfig=dict(TINY_DDCONFIG, z_channels=16), lossconfig={"target": "torch.nn.Identity"},
                          embed_dim=16, use_quant_conv=False)
    with pytest.raises(CheckpointError, match=r"32 latent channels with quant convs.*FLUX\.2"):
        flux1.init_from_ckpt(path)
    # an SD-like file without statistics cannot start a FLUX.2 model
    no_stats = tmp_path / "no_stats.safetensors"
    save_file({k: v for k, v in released.state_dict().items() if not k.startswith("bn.")}, str(no_stats))
    with pytest.raises(CheckpointError, match="no latent BatchNorm statistics"):
        make_flux2().init_from_ckpt(no_stats)


# ------------------------------------------------------------------------------------------- configs
FLUX2_CONFIGS = ["vanilla", "small_decoder", "asymmetric_base", "asymmetric_large", "asymmetric_large2"]


def test_flux2_configs_are_the_latent_space_row_and_the_paper_variants():
    from ldm.latent_spaces import LATENT_SPACES, latent_space_of
    from tests.models.test_latent_spaces import build_meta, load_params

    row = LATENT_SPACES["flux2"]
    assert (row.channels, row.quant_conv, row.normalization, row.config_dir) == (
        32, True, PatchBatchNorm(eps=1e-4, patch_size=2), "configs/autoencoder/flux2/")
    sd1 = load_params("configs/autoencoder/autoencoder_kl_32x32x4.yaml")
    for name in FLUX2_CONFIGS:
        params = load_params(f"configs/autoencoder/flux2/{name}.yaml")
        assert params["embed_dim"] == params["ddconfig"]["z_channels"] == 32
        assert params.get("use_quant_conv", True) and "scaling_factor" not in params
        assert params["latent_batch_norm"] == BN
        assert {**params["ddconfig"], "z_channels": 4} == sd1["ddconfig"]  # SD's encoder, 32 latent channels
        if name.startswith("asymmetric"):
            train = load_params(f"configs/autoencoder/flux2/{name}_train.yaml")
            for key in ("ddconfig", "decoder_overrides", "embed_dim", "latent_batch_norm"):
                assert train[key] == params[key], key
            sd1_name = {"asymmetric_base": "", "asymmetric_large": "_large", "asymmetric_large2": "_large2"}[name]
            sd1_train = load_params(f"configs/autoencoder/autoencoder_kl_32x32x4{sd1_name}_train.yaml")
            assert params["decoder_overrides"] == sd1_train["decoder_overrides"]
            assert (train["ignore_keys"], train["pretrained_lr_factor"]) == (sd1_train["ignore_keys"],
                                                                             sd1_train["pretrained_lr_factor"])
        model = build_meta(f"configs/autoencoder/flux2/{name}.yaml")
        assert latent_space_of(model) is row and model.latent_normalization == "batch_norm"


def test_full_size_flux2_configs_have_diffusers_parameter_counts():
    """vanilla = AutoencoderKLFlux2 with its defaults (FLUX.2's VAE), small_decoder = the same with
    decoder_block_out_channels [96, 192, 384, 384] (BFL's small decoder); the asymmetric decoders =
    AsymmetricAutoencoderKL's with the paper's widths and 32 latent channels. All on the meta device."""
    import diffusers

    from tests.models.test_latent_spaces import build_meta, numel

    with torch.device("meta"):
        vae = diffusers.AutoencoderKLFlux2()
        small = diffusers.AutoencoderKLFlux2(decoder_block_out_channels=[96, 192, 384, 384])
        asym = {ch: diffusers.AsymmetricAutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            down_block_out_channels=[128, 256, 512, 512], layers_per_down_block=2,
            up_block_out_channels=[ch, 2 * ch, 4 * ch, 4 * ch], layers_per_up_block=nrb, latent_channels=32)
            for ch, nrb in ((128, 2), (192, 3), (256, 5))}
    assert vae.config.latent_channels == 32 and vae.quant_conv is not None
    for name, theirs in (("vanilla", vae), ("small_decoder", small)):
        ours = build_meta(f"configs/autoencoder/flux2/{name}.yaml")
        assert numel(ours) == numel(theirs), name
        assert numel(ours.decoder) + numel(ours.post_quant_conv) == numel(theirs.decoder) + numel(
            theirs.post_quant_conv)
        assert {k: tuple(v.shape) for k, v in ours.bn.state_dict().items()} == {
            k: tuple(v.shape) for k, v in theirs.bn.state_dict().items()}
    for name, ch in (("asymmetric_base", 128), ("asymmetric_large", 192), ("asymmetric_large2", 256)):
        ours = build_meta(f"configs/autoencoder/flux2/{name}.yaml")
        assert numel(ours.encoder) == numel(vae.encoder)
        assert numel(ours.decoder) == numel(asym[ch].decoder), name


# ------------------------------------------------------------------- training, evaluation, tiling, benchmark
TINY_FLUX2 = "configs/tiny/autoencoder_kl_flux2_tiny.yaml"


def bfl_file(path, seed: int = 21):
    """A tiny FLUX.2 VAE as BFL ships it (ae.safetensors key layout, random weights and statistics)."""
    from safetensors.torch import save_file

    from ldm.checkpoints.tensors import to_bfl_flux2_layout

    vae = make_flux2(seed=seed).state_dict()
    save_file({k: v.contiguous() for k, v in to_bfl_flux2_layout(vae).items()}, str(path))
    return vae


@pytest.mark.slow
def test_main_trains_a_tiny_32_channel_asymmetric_decoder_from_bfl_ae_safetensors(tmp_path, request,
                                                                                  monkeypatch):
    """main.py end to end in FLUX.2's latent space: frozen 32-channel encoder and quant convs from a BFL-layout
    ae.safetensors, the statistics kept as loaded, a fresh condition branch, a few steps."""
    from tests.models.test_latent_spaces import tiny_training_config, train_with_main

    images = request.getfixturevalue("image_folder")
    vae = bfl_file(tmp_path / "ae.safetensors")
    config = tiny_training_config(TINY_FLUX2, tmp_path / "ae.safetensors", images)
    sd = train_with_main(tmp_path, monkeypatch, config, "flux2", steps=2)
    frozen = [k for k in vae if k.startswith(("encoder.", "quant_conv.", "post_quant_conv.", "bn."))]
    assert all(torch.equal(sd[k], vae[k]) for k in frozen)
    assert not torch.equal(sd["decoder.conv_out.weight"], vae["decoder.conv_out.weight"])
    assert "decoder.encoder.layers.0.weight" in sd


@pytest.mark.slow
def test_evaluate_tiling_and_benchmark_in_the_flux2_space(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from ldm.checkpoints.files import save_state_dict
    from ldm.loading import load_model
    from scripts import benchmark, evaluate

    model = set_statistics_(randomize_(load_model(TINY_FLUX2), 0))
    ckpt = save_state_dict(model.state_dict(), tmp_path / "flux2_tiny.ckpt")
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    assert evaluate.main(["reconstruction", "--images", str(tmp_path / "images"), "--size", "32", "--outdir",
                          str(tmp_path / "out"), "--decoder", f"flux2={TINY_FLUX2}:{ckpt}", "--quiet", "--no_lpips",
                          "--no_fid", "--n_examples", "0", "--tile", "16", "--tile_overlap", "4"]) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())["decoders"]["flux2"]
    assert report["n_images"] == 2 and np.isfinite(report["psnr_kept"])

    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 4:20, 8:28] = 1
    z = model.unscale_latents(torch.randn(1, 32, 16, 16, generator=g))
    with torch.no_grad():
        full = model.decode(z, image, mask)
        model.enable_tiling(32, 8)
        assert torch.equal(model.decode(z, image, mask), full)  # one tile = untiled
        model.enable_tiling(16, 4)
        assert model.decode(z, image, mask).shape == full.shape

    meta = benchmark.build_model("flux2_base", device="meta")
    assert (meta.embed_dim, meta.latent_normalization) == (32, "batch_norm")
    assert benchmark.count_flops("flux2_large", 64, 1, True, None, 0)[0] > 0
    assert "flux2_base" in benchmark.OURS_ONLY


def test_convert_checkpoint_cli_in_the_flux2_space(tmp_path, capsys):
    """to-diffusers: FLUX.2's VAE -> AutoencoderKLFlux2 (batch_norm_eps / patch_size in config.json, no scale),
    from-diffusers and reformat --bfl_flux2 give the same tensors back; the asymmetric decoder is refused."""
    import json

    from ldm.checkpoints.files import read_weights_file, save_state_dict
    from ldm.checkpoints.keys import read_state_dict
    from scripts import convert_checkpoint as cli

    model = make_flux2()
    original = model.state_dict()
    src = save_state_dict(original, tmp_path / "flux2_vae.ckpt")
    assert cli.main(["to-diffusers", str(src), str(tmp_path / "vae"), "--latent_space", "flux2"]) == 0
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and "scaling_factor" not in config
    assert (config["batch_norm_eps"], config["patch_size"], config["latent_channels"]) == (1e-4, [2, 2], 32)
    assert "latent_batch_norm" in capsys.readouterr().out
    assert cli.main(["from-diffusers", str(tmp_path / "vae"), str(tmp_path / "back.safetensors")]) == 0
    back = read_state_dict(tmp_path / "back.safetensors")
    assert_same_tensors(back, original)

    assert cli.main(["reformat", str(src), str(tmp_path / "ae.safetensors"), "--bfl_flux2"]) == 0
    bfl = read_weights_file(tmp_path / "ae.safetensors")
    assert "encoder.quant_conv.weight" in bfl and "quant_conv.weight" not in bfl
    assert torch.equal(bfl["decoder.post_quant_conv.weight"], original["post_quant_conv.weight"])

    asym = save_state_dict(make_flux2(condition=True).state_dict(), tmp_path / "flux2_base.ckpt")
    assert cli.main(["to-diffusers", str(asym), str(tmp_path / "asym"), "--latent_space", "flux2"]) == 2
    assert "AsymmetricAutoencoderKL has no BatchNorm" in capsys.readouterr().err
    assert cli.main(["to-diffusers", str(src), str(tmp_path / "x"), "--latent_space", "flux"]) == 2
    assert "latent BatchNorm statistics" in capsys.readouterr().err


def test_diffusers_vae_configs_read_as_our_normalisation_params():
    """normalization_from_diffusers(vae.config) (a saved config.json or a model's config, which has no _class_name)
    gives the constructor params of the same normalisation: FLUX.2's BatchNorm, per-channel, scale and shift."""
    import diffusers

    from ldm.latent_spaces import normalization_from_diffusers
    from ldm.models.autoencoder import AutoencoderKL

    def ours(channels, config, **kwargs):
        return AutoencoderKL(ddconfig=dict(TINY_DDCONFIG, z_channels=channels), embed_dim=channels,
                             lossconfig={"target": "torch.nn.Identity"}, **kwargs,
                             **normalization_from_diffusers(dict(config)).to_params())

    flux2 = ours(32, diffusers_flux2().config)
    assert flux2.latent_norm == PatchBatchNorm(eps=1e-4, patch_size=2) and flux2.bn.eps == 1e-4
    mean, std = [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]
    with torch.device("meta"):
        playground = diffusers.AutoencoderKL(latents_mean=mean, latents_std=std, scaling_factor=0.5).config
        flux1 = diffusers.AutoencoderKL(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159).config
    model = ours(4, playground)
    assert model.latent_norm == PerChannel(mean, std, 0.5) and model.latent_normalization == "per_channel"
    model = ours(16, flux1, use_quant_conv=False)
    assert (model.latent_normalization, model.scaling_factor, model.shift_factor) == ("scale_shift", 0.3611, 0.1159)
