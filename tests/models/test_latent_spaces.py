"""Latent spaces as configuration: latent channels, optional quant convs, scaling and shift (SD 1.x/2.x, SDXL,
SD 3.x, FLUX.1), and the one place that converts VAE latents to diffusion latents."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.latent_spaces import ScaleShift
from ldm.project import load_yaml
from tests.checkpoints.test_interop import randomize_
from tests.conftest import TINY_DDCONFIG, assert_same_tensors
from tests.training.test_main import image_folder  # noqa: F401 - fixture, requested by name below

TINY16 = dict(TINY_DDCONFIG, z_channels=16)


def make_16ch(condition: bool = True, seed: int = 0, **kwargs):
    """A tiny FLUX-like autoencoder: 16 latent channels, no quant convs."""
    from ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(ddconfig=TINY16, lossconfig={"target": "torch.nn.Identity"}, embed_dim=16,
                         decoder_overrides={"condition": condition}, use_quant_conv=False,
                         scaling_factor=0.3611, shift_factor=0.1159, **kwargs).eval()


def test_scale_latents_is_shift_then_scale_and_unscale_inverts_it():
    model = make_16ch()
    z = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(model.scale_latents(z), (z - 0.1159) * 0.3611, rtol=0, atol=0)
    torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)
    assert (model.scaling_factor, model.shift_factor, model.embed_dim) == (0.3611, 0.1159, 16)


def test_sd1_defaults_scale_bit_identically_to_the_original_formula():
    from tests.conftest import make_autoencoder

    model = make_autoencoder()
    z = torch.randn(2, 4, 4, 4)
    assert (model.scaling_factor, model.shift_factor) == (0.18215, 0.0)
    assert torch.equal(model.scale_latents(z), 0.18215 * z)
    assert torch.equal(model.unscale_latents(z), z / 0.18215)


def test_without_quant_convs_there_are_no_such_modules_or_keys():
    model = make_16ch()
    keys = model.state_dict().keys()
    assert not any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys)
    assert model.quant_conv is None and model.post_quant_conv is None
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == (1, 16, 8, 8)
    # the latent is the encoder's output itself
    torch.testing.assert_close(posterior.mean, model.encoder(x)[:, :16], rtol=0, atol=0)
    assert model.decode(posterior.mode()).shape == (1, 3, 16, 16)


def test_without_quant_convs_embed_dim_must_equal_z_channels():
    from ldm.models.autoencoder import AutoencoderKL

    with pytest.raises(ValueError, match="embed_dim"):
        AutoencoderKL(ddconfig=TINY16, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4,
                      use_quant_conv=False)


def test_diffusion_model_scales_through_its_first_stage():
    """LatentDiffusion's scale_factor (its config) becomes the first stage's scaling_factor, and encoding /
    decoding go through the first stage's scale_latents / unscale_latents (shift included)."""

    from ldm.util import instantiate_from_config

    cfg = load_yaml("configs/tiny/v1-t2i-tiny.yaml").model
    cfg.params.scale_factor = 0.5
    cfg.params.first_stage_config.params.shift_factor = 0.25
    model = instantiate_from_config(cfg).eval()
    assert model.first_stage_model.scaling_factor == 0.5
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(model.get_first_stage_encoding(z), (z - 0.25) * 0.5, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_first_stage(z), model.first_stage_model.decode(z / 0.5 + 0.25),
                                   rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- configs
# The released models' diffusers AutoencoderKL configs (vae/config.json): latent channels, quant convs, scale, shift.
RELEASED = {
    "sdxl": (4, True, 0.13025, 0.0),
    "sd3": (16, False, 1.5305, 0.0609),
    "flux": (16, False, 0.3611, 0.1159),
}
SPACE_CONFIGS = ["vanilla", "asymmetric_base", "asymmetric_large", "asymmetric_large2"]


def load_params(path: str):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(load_yaml(path).model.params, resolve=True)


@pytest.mark.parametrize("space", sorted(RELEASED))
def test_each_latent_space_is_a_config_folder_with_the_released_numbers(space):
    from ldm.latent_spaces import LATENT_SPACES

    channels, quant, scale, shift = RELEASED[space]
    table = LATENT_SPACES[space]
    assert (table.channels, table.quant_conv, table.scaling_factor, table.shift_factor) == RELEASED[space]
    sd1 = load_params("configs/autoencoder/autoencoder_kl_32x32x4.yaml")
    for name in SPACE_CONFIGS:
        params = load_params(f"configs/autoencoder/{space}/{name}.yaml")
        assert params["embed_dim"] == params["ddconfig"]["z_channels"] == channels
        assert params.get("use_quant_conv", True) is quant
        assert (params["scaling_factor"], params["shift_factor"]) == (scale, shift)
        # the same encoder as SD 1.x's, apart from the latent channels
        assert {**params["ddconfig"], "z_channels": 4} == sd1["ddconfig"]
        if name != "vanilla":
            train = load_params(f"configs/autoencoder/{space}/{name}_train.yaml")
            for key in ("ddconfig", "decoder_overrides", "embed_dim", "scaling_factor", "shift_factor"):
                assert train[key] == params[key], key
            assert train.get("use_quant_conv", True) is quant
    # the large variants are the SD 1.x overrides
    for name, sd1_name in (("asymmetric_base", ""), ("asymmetric_large", "_large"), ("asymmetric_large2", "_large2")):
        ours = load_params(f"configs/autoencoder/{space}/{name}.yaml")["decoder_overrides"]
        assert ours == load_params(f"configs/autoencoder/autoencoder_kl_32x32x4{sd1_name}.yaml")["decoder_overrides"]


def test_asuka_config_is_their_condition_decoder_yaml():
    """ASUKA's configs/condition_decoder.yaml: z_channels 16, ch 128, ch_mult [1,2,4,4], num_res_blocks 2,
    concat_mask True, gate_conv False; their decoder resizes the mask by area."""
    params = load_params("configs/autoencoder/flux/asuka.yaml")
    dec = {**params["ddconfig"], **params["decoder_overrides"]}
    assert {k: dec[k] for k in ("z_channels", "ch", "ch_mult", "num_res_blocks", "concat_mask", "gate_conv",
                                "mask_resize", "condition")} == dict(
        z_channels=16, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, concat_mask=True, gate_conv=False,
        mask_resize="area", condition=True)
    assert (params["embed_dim"], params["use_quant_conv"], params["scaling_factor"], params["shift_factor"]) == (
        16, False, 0.3611, 0.1159)


# --------------------------------------------------------------------------- full-size parameter counts
def diffusers_reference(space: str, decoder=None):
    """diffusers' own models built on the meta device from the released VAE's config values (and, for an
    asymmetric decoder, diffusers' AsymmetricAutoencoderKL with the paper's up widths)."""
    import diffusers

    channels, quant, _, _ = RELEASED[space]
    common = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=channels, norm_num_groups=32)
    with torch.device("meta"):
        if decoder is None:
            return diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                           use_quant_conv=quant, use_post_quant_conv=quant, **common)
        ch, nrb = decoder
        return diffusers.AsymmetricAutoencoderKL(
            down_block_out_channels=[128, 256, 512, 512], layers_per_down_block=2,
            up_block_out_channels=[ch, 2 * ch, 4 * ch, 4 * ch], layers_per_up_block=nrb, **common)


def numel(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_meta(path: str):

    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        return instantiate_from_config(load_yaml(path).model)


@pytest.mark.parametrize("space", sorted(RELEASED))
def test_full_size_configs_have_the_released_parameter_counts(space):
    vae = diffusers_reference(space)
    ours = build_meta(f"configs/autoencoder/{space}/vanilla.yaml")
    assert numel(ours.encoder) == numel(vae.encoder)
    assert numel(ours.decoder) == numel(vae.decoder)
    assert numel(ours.quant_conv) + numel(ours.post_quant_conv) == numel(vae.quant_conv) + numel(vae.post_quant_conv)
    assert numel(ours) == numel(vae)
    for name, shape in (("asymmetric_base", (128, 2)), ("asymmetric_large", (192, 3)),
                        ("asymmetric_large2", (256, 5))):
        asym = build_meta(f"configs/autoencoder/{space}/{name}.yaml")
        assert numel(asym.encoder) == numel(vae.encoder)
        # diffusers' condition encoder always has 5 layers: all of them are used by a 4-level decoder
        assert numel(asym.decoder) == numel(diffusers_reference(space, shape).decoder), name


def test_asuka_decoder_parameter_count():
    """ASUKA's decoder = the paper's base decoder for 16 latent channels, plus the mask's input channel in the
    branch's first 3x3 conv (128 filters x 1 channel x 3 x 3); its unused up_layers are not built."""
    ours = build_meta("configs/autoencoder/flux/asuka.yaml")
    assert numel(ours.decoder) == numel(diffusers_reference("flux", (128, 2)).decoder) + 128 * 1 * 3 * 3
    assert numel(ours.encoder) == numel(diffusers_reference("flux").encoder)


# ------------------------------------------------------------------------------------ diffusers parity
def image_and_mask(size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 3:11, 2:9] = 1
    mask[1, :, : size // 2] = 1
    return image, mask


def assert_same_vae(ours, theirs, image) -> None:
    """Our model and a diffusers VAE encode ``image`` (posterior mean and log-variance) and decode its mean alike:
    max abs difference below 1e-4 (float32); the output is not trivially small."""
    with torch.no_grad():
        post, dist = ours.encode(image), theirs.encode(image).latent_dist
        assert (post.mean - dist.mean).abs().max() < 1e-4 and (post.logvar - dist.logvar).abs().max() < 1e-4
        out = ours.decode(post.mean)
        assert out.abs().mean() > 0.05
        assert (out - theirs.decode(post.mean).sample).abs().max() < 1e-4


def test_16_channel_vae_without_quant_convs_equals_diffusers_autoencoderkl():
    import diffusers

    from ldm.checkpoints.diffusers import ldm_to_diffusers

    ours = randomize_(make_16ch(condition=False), 0)
    sd, config = ldm_to_diffusers(ours.state_dict(), normalization=ours.latent_norm)
    assert config["_class_name"] == "AutoencoderKL"
    assert (config["latent_channels"], config["use_quant_conv"], config["use_post_quant_conv"]) == (16, False, False)
    theirs = diffusers.AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, latent_channels=16,
                                     use_quant_conv=False, use_post_quant_conv=False, norm_num_groups=32,
                                     down_block_types=["DownEncoderBlock2D"] * 2,
                                     up_block_types=["UpDecoderBlock2D"] * 2).eval()
    theirs.load_state_dict(sd, strict=True)
    image, _ = image_and_mask()
    assert_same_vae(ours, theirs, image)


@pytest.mark.slow
def test_16_channel_asymmetric_decoder_equals_diffusers_after_export_and_round_trips(tmp_path):
    """AsymmetricAutoencoderKL always has quant convs: a VAE without them is exported with identity 1x1 convs,
    which change nothing (float32), and the way back drops them: the round trip is tensor-identical."""
    import diffusers

    from ldm.checkpoints.diffusers import write_diffusers_folder
    from ldm.checkpoints.keys import read_state_dict

    ours = randomize_(make_16ch(condition=True), 0)
    folder = write_diffusers_folder(ours.state_dict(), TINY16, {"condition": True}, tmp_path / "asym",
                                    normalization=ours.latent_norm, use_quant_conv=False)
    theirs = diffusers.AsymmetricAutoencoderKL.from_pretrained(folder).eval()
    assert torch.equal(theirs.post_quant_conv.weight[:, :, 0, 0], torch.eye(16))
    assert torch.equal(theirs.quant_conv.weight[:, :, 0, 0], torch.eye(32))
    assert not theirs.quant_conv.bias.any() and not theirs.post_quant_conv.bias.any()
    assert theirs.config.scaling_factor == 0.3611
    image, mask = image_and_mask()
    with torch.no_grad():
        post = ours.encode(image)
        assert (post.mean - theirs.encode(image).latent_dist.mean).abs().max() < 1e-4
        z = post.mean
        cond = ours.decode(z, image, mask)
        assert (cond - theirs.decode(z, image=image, mask=mask).sample).abs().max() < 1e-4
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max() < 1e-4
        # the identity convs are exact: the latent passes through bit for bit
        assert torch.equal(theirs.post_quant_conv(z), z)

    back = read_state_dict(folder)
    original = ours.state_dict()
    assert_same_tensors(back, original)
    restored = make_16ch(condition=True, seed=1)
    restored.init_from_ckpt(folder, fresh_condition=False)
    with torch.no_grad():
        assert torch.equal(restored.decode(z, image, mask), cond)


def test_asuka_style_branch_is_refused_by_the_diffusers_export():
    from ldm.checkpoints.diffusers import ldm_to_diffusers
    from ldm.checkpoints.files import CheckpointError
    from ldm.models.autoencoder import AutoencoderKL

    asuka = AutoencoderKL(ddconfig=TINY16, lossconfig={"target": "torch.nn.Identity"}, embed_dim=16,
                          use_quant_conv=False, decoder_overrides={"condition": True, "concat_mask": True})
    with pytest.raises(CheckpointError, match="concat_mask"):
        ldm_to_diffusers(asuka.state_dict())
    with pytest.raises(CheckpointError, match="mask_resize"):
        ldm_to_diffusers(make_16ch().state_dict(), TINY16, {"condition": True, "mask_resize": "area"},
                         use_quant_conv=False)


# ------------------------------------------------------------------------------------- starting weights
def train_model(space: str, seed: int = 5):
    """A tiny training-start model of the latent space (condition branch on, fresh)."""
    from ldm.models.autoencoder import AutoencoderKL

    channels, quant, scale, shift = RELEASED[space]
    torch.manual_seed(seed)
    return AutoencoderKL(ddconfig=dict(TINY_DDCONFIG, z_channels=channels), lossconfig={"target": "torch.nn.Identity"},
                         embed_dim=channels, decoder_overrides={"condition": True}, use_quant_conv=quant,
                         scaling_factor=scale, shift_factor=shift)


def released_vae(space: str, seed: int = 9):
    """The tensors of a released VAE of that latent space in the ldm names (tiny widths)."""
    from ldm.models.autoencoder import AutoencoderKL

    channels, quant, _, _ = RELEASED[space]
    torch.manual_seed(seed)
    return AutoencoderKL(ddconfig=dict(TINY_DDCONFIG, z_channels=channels), lossconfig={"target": "torch.nn.Identity"},
                         embed_dim=channels, use_quant_conv=quant).state_dict()


def assert_loaded(model, vae):
    own = model.state_dict()
    for k, v in vae.items():
        assert torch.equal(own[k], v), k


def test_sdxl_single_file_loads_as_starting_weights(tmp_path):
    """sd_xl_base_1.0.safetensors holds the VAE under first_stage_model.* next to the UNet and text encoders."""
    from safetensors.torch import save_file

    vae = released_vae("sdxl")
    single = {f"first_stage_model.{k}": v for k, v in vae.items()}
    single["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    single["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file(single, str(path))
    model = train_model("sdxl")
    model.init_from_ckpt(path)
    assert_loaded(model, vae)
    assert model.scaling_factor == 0.13025


def test_flux_ae_safetensors_loads_as_starting_weights_and_wrong_spaces_are_named(tmp_path):
    """BFL's ae.safetensors: encoder.* / decoder.* in the ldm names (attention q/k/v/proj_out as 1x1 convs), no
    quant convs. Loaded into a 4-channel config it is refused naming the latent space it looks like."""
    from safetensors.torch import save_file

    from ldm.checkpoints.files import CheckpointError

    vae = released_vae("flux")
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in vae)
    assert vae["encoder.mid.attn_1.q.weight"].ndim == 4
    path = tmp_path / "ae.safetensors"
    save_file(vae, str(path))
    model = train_model("flux")
    model.init_from_ckpt(path)
    assert_loaded(model, vae)

    with pytest.raises(CheckpointError, match=r"16 latent channels without quant convs.*FLUX\.1.*configs/autoencoder/"
                                              r"flux/.*4 latent channels with quant convs"):
        train_model("sdxl").init_from_ckpt(path)
    sdxl = tmp_path / "sdxl_vae.safetensors"
    save_file(released_vae("sdxl"), str(sdxl))
    with pytest.raises(CheckpointError, match=r"4 latent channels with quant convs.*SDXL"):
        train_model("flux").init_from_ckpt(sdxl)


def test_diffusers_vae_folder_of_a_16_channel_space_loads_as_starting_weights(tmp_path):
    """The vae/ folder of an SD 3.x / FLUX.1 pipeline (diffusers AutoencoderKL without quant convs)."""
    from ldm.checkpoints.diffusers import write_diffusers_folder

    vae = released_vae("sd3")
    write_diffusers_folder(vae, None, None, tmp_path / "pipe" / "vae", normalization=ScaleShift(1.5305, 0.0609))
    model = train_model("sd3")
    model.init_from_ckpt(tmp_path / "pipe")
    assert_loaded(model, vae)


# ------------------------------------------------------------------------------------------ training
def train_with_main(tmp_path: Path, monkeypatch, config, name: str, steps: int):
    """Run ``main.py -t`` on ``config`` (a dict or OmegaConf) for ``steps`` steps; the state dict of last.ckpt."""
    from omegaconf import OmegaConf

    import main

    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(config) if isinstance(config, dict) else config, path)
    monkeypatch.setenv(main.RUN_TIMESTAMP_ENV, "2020-01-01T00-00-00")
    rc = main.main(["--logdir", str(tmp_path / "logs"), "--wandb", "off", "--base", str(path), "-t", "-n", name,
                    "--max_steps", str(steps)])
    assert rc == 0
    (run,) = (tmp_path / "logs").glob(f"*_{name}")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == steps
    return ckpt["state_dict"]


def tiny_training_config(config_path, ckpt_path, images: Path):
    """A tiny model config made trainable by main.py: starting weights ``ckpt_path``, the base recipe's decoder
    rate (0.1), L1 + KL + GAN from step 1 (no LPIPS weights here), the image folder's ``train`` split, 2 images a
    batch, no image logger or validation."""
    from ldm.project import load_yaml

    config = load_yaml(config_path)
    params = config.model.params
    params.ckpt_path = str(ckpt_path)
    params.pretrained_lr_factor = 0.1
    params.lossconfig = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                         "params": {"disc_start": 1, "perceptual_weight": 0, "kl_weight": 1e-6}}
    config.model.base_learning_rate = 1e-5
    dataset = {"target": "ldm.data.inpainting.ImageFolderInpainting",
               "params": {"size": 32, "no_mask_prob": 0.25, "mask_config": "configs/autoencoder/random_thick_256.yaml",
                          "root": str(images / "train")}}
    config.data = {"target": "main.DataModuleFromConfig",
                   "params": {"batch_size": 2, "num_workers": 0, "train": dataset}}
    config.lightning = {"callbacks": {"image_logger": {"params": {"disabled": True}}},
                        "trainer": {"log_every_n_steps": 1, "enable_model_summary": False,
                                    "enable_progress_bar": False, "limit_val_batches": 0}}
    return config


@pytest.mark.slow
def test_main_trains_a_tiny_16_channel_asymmetric_decoder_from_an_ae_safetensors(tmp_path, request,
                                                                                 monkeypatch):
    """main.py end to end in FLUX.1's latent space: starts from a BFL-layout ae.safetensors, frozen 16-channel
    encoder without quant convs, ASUKA's branch options, a few steps, last.ckpt has the latent space's keys."""
    from safetensors.torch import save_file

    images = request.getfixturevalue("image_folder")
    vae = released_vae("flux")
    save_file(vae, str(tmp_path / "ae.safetensors"))
    dataset = {"target": "ldm.data.inpainting.ImageFolderInpainting",
               "params": {"size": 32, "no_mask_prob": 0.25, "mask_config": "configs/autoencoder/random_thick_256.yaml"}}
    config = {
        "model": {"base_learning_rate": 1e-5, "target": "ldm.models.autoencoder.AutoencoderKL",
                  "params": {"embed_dim": 16, "use_quant_conv": False, "scaling_factor": 0.3611,
                             "shift_factor": 0.1159, "ckpt_path": str(tmp_path / "ae.safetensors"),
                             "ddconfig": dict(TINY_DDCONFIG, z_channels=16), "pretrained_lr_factor": 0.1,
                             "decoder_overrides": {"condition": True, "concat_mask": True, "mask_resize": "area"},
                             "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                            "params": {"disc_start": 2, "perceptual_weight": 0, "kl_weight": 1e-6}}}},
        "data": {"target": "main.DataModuleFromConfig",
                 "params": {"batch_size": 2, "num_workers": 0,
                            "train": {**dataset, "params": {**dataset["params"], "root": str(images / "train")}},
                            "validation": {**dataset, "params": {**dataset["params"], "random_crop": False,
                                                                 "fixed_masks": True,
                                                                 "root": str(images / "val")}}}},
        "lightning": {"callbacks": {"image_logger": {"params": {"disabled": True}}},
                      "trainer": {"log_every_n_steps": 1, "enable_model_summary": False,
                                  "enable_progress_bar": False}},
    }
    sd = train_with_main(tmp_path, monkeypatch, config, "flux", steps=3)
    assert sd["decoder.encoder.layers.0.weight"].shape[1] == 4  # masked image + mask
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in sd)
    # the frozen encoder is the file's; the decoder trained away from it
    assert all(torch.equal(sd[k], v) for k, v in vae.items() if k.startswith("encoder."))
    assert not torch.equal(sd["decoder.conv_out.weight"], vae["decoder.conv_out.weight"])


# --------------------------------------------------------------------- evaluation, tiling, benchmark
TINY_FLUX = "configs/tiny/autoencoder_kl_flux_tiny.yaml"


def test_evaluate_reconstruction_in_a_16_channel_space_untiled_and_tiled(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from ldm.checkpoints.files import save_state_dict
    from ldm.loading import load_model
    from scripts import evaluate

    torch.manual_seed(3)
    model = load_model(TINY_FLUX)
    ckpt = save_state_dict(randomize_(model, 0).state_dict(), tmp_path / "flux_tiny.ckpt")
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    for extra in ([], ["--tile", "16", "--tile_overlap", "4"]):
        out = tmp_path / f"out{len(extra)}"
        assert evaluate.main(["reconstruction", "--images", str(tmp_path / "images"), "--size", "32", "--outdir",
                              str(out), "--decoder", f"flux={TINY_FLUX}:{ckpt}", "--quiet", "--no_lpips", "--no_fid",
                              "--n_examples", "0", *extra]) == 0
        report = json.loads((out / "metrics.json").read_text())["decoders"]["flux"]
        assert report["n_images"] == 2 and math_finite(report["psnr_kept"]) and math_finite(report["pre_error"])


def math_finite(x) -> bool:
    import math

    return isinstance(x, float) and math.isfinite(x)


def test_tiled_decode_of_a_16_channel_asuka_style_decoder():
    """One tile covering everything = the untiled decode, exactly; several tiles keep the image size."""
    from ldm.loading import load_model

    torch.manual_seed(4)
    model = randomize_(load_model(TINY_FLUX), 0)
    image, mask = image_and_mask(32)
    z = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        full = model.decode(z, image, mask)
        model.enable_tiling(32, 8)
        assert torch.equal(model.decode(z, image, mask), full)
        model.enable_tiling(16, 4)
        tiled = model.decode(z, image, mask)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()


def test_benchmark_builds_16_channel_inputs_for_other_latent_spaces():
    from scripts import benchmark

    for variant in ("flux_base", "sd3_large", "asuka"):
        model = benchmark.build_model(variant, device="meta")
        assert model.embed_dim == 16
        assert benchmark.count_flops(variant, 64, 1, True, None, 0)[0] > 0


def test_latent_space_of_a_model_and_the_sdxl_float16_warning():
    from ldm.latent_spaces import LATENT_SPACES, latent_space_of

    assert latent_space_of(build_meta("configs/autoencoder/sdxl/vanilla.yaml")) is LATENT_SPACES["sdxl"]
    assert latent_space_of(build_meta("configs/autoencoder/flux/asuka.yaml")) is LATENT_SPACES["flux"]
    assert latent_space_of(build_meta("configs/autoencoder/autoencoder_kl_32x32x4.yaml")) is LATENT_SPACES["sd"]
    assert [s.name for s in LATENT_SPACES.values() if not s.fp16_safe] == ["sdxl"]


# ---------------------------------------------------------------------------------------- converter CLI
def test_convert_checkpoint_cli_for_16_channel_spaces(tmp_path, capsys):
    """to-diffusers needs to know SD 3.x from FLUX.1 (same tensors): --config or --latent_space; the scale and
    shift land in config.json; from-diffusers gives back the same tensors; a mismatching space is refused."""
    import json

    from ldm.checkpoints.files import save_state_dict
    from ldm.checkpoints.keys import read_state_dict
    from scripts import convert_checkpoint as cli

    model = randomize_(make_16ch(), 0)
    src = save_state_dict(model.state_dict(), tmp_path / "flux_base.ckpt")
    assert cli.main(["to-diffusers", str(src), str(tmp_path / "a")]) == 2
    assert "pass --config or --latent_space" in capsys.readouterr().err
    assert cli.main(["to-diffusers", str(src), str(tmp_path / "a"), "--latent_space", "sdxl"]) == 2
    assert "16 latent channels without quant convs" in capsys.readouterr().err

    assert cli.main(["to-diffusers", str(src), str(tmp_path / "flux"), "--latent_space", "flux"]) == 0
    config = json.loads((tmp_path / "flux" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"], config["latent_channels"]) == (0.3611, 0.1159, 16)
    assert "identity" in capsys.readouterr().out
    assert cli.main(["from-diffusers", str(tmp_path / "flux"), str(tmp_path / "back.safetensors")]) == 0
    back, original = read_state_dict(tmp_path / "back.safetensors"), model.state_dict()
    assert_same_tensors(back, original)

    params = tmp_path / "sd3.yaml"
    params.write_text(Path("configs/autoencoder/sd3/asymmetric_base.yaml").read_text()
                      .replace("ch: 128", "ch: 32").replace("ch_mult: [1, 2, 4, 4]", "ch_mult: [1, 2]")
                      .replace("num_res_blocks: 2", "num_res_blocks: 1").replace("resolution: 256", "resolution: 32"))
    assert cli.main(["to-diffusers", str(src), str(tmp_path / "sd3"), "--config", str(params)]) == 0
    config = json.loads((tmp_path / "sd3" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (1.5305, 0.0609)


def test_normalisation_objects_round_trip_through_configs_and_compare_by_one_rule():
    """Each kind's to_params / to_diffusers reads back as an equal object; equality is one rule (same kind,
    numbers within a relative 1e-6); PerChannel works on 4-D and 5-D latents, as Qwen-Image's pipelines compute
    ``(z - mean) * (1 / std)`` and ``z / (1 / std) + mean`` over (B, C, T, h, w)."""
    from ldm.latent_spaces import (
        LATENT_SPACES,
        PatchBatchNorm,
        PerChannel,
        normalization_from_diffusers,
        normalization_from_params,
    )

    for space in LATENT_SPACES.values():
        norm = space.normalization
        assert normalization_from_params(norm.to_params()) == norm
        assert normalization_from_diffusers(norm.to_diffusers()) == norm
    qwen = LATENT_SPACES["qwenimage"].normalization
    assert qwen != LATENT_SPACES["flux"].normalization
    assert qwen == PerChannel([m * (1 + 1e-8) for m in qwen.mean], qwen.std)
    assert qwen != PerChannel([m + 1e-3 for m in qwen.mean], qwen.std)
    assert PatchBatchNorm(eps=1e-5) != PatchBatchNorm(eps=1e-4)
    z5 = torch.randn(2, 16, 1, 3, 5)
    mean = torch.tensor(qwen.mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(qwen.std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(qwen.normalize(z5), (z5 - mean) * inv_std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qwen.denormalize(z5), z5 / inv_std + mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qwen.normalize(z5[:, :, 0]), qwen.normalize(z5)[:, :, 0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be > 0"):
        PerChannel([0.0], [0.0])
