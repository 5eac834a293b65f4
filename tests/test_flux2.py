"""FLUX.2's latent space (32 channels, quant convs, latents normalised by BatchNorm statistics over 2x2 patches)
and the per-channel normalisation, against diffusers' AutoencoderKLFlux2 and the formulas its pipelines apply."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_DDCONFIG
from tests.test_interop import randomize_

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
@pytest.mark.parametrize("decoder_ch", [32, 64])
def test_encode_and_decode_equal_diffusers_autoencoderklflux2(tmp_path, decoder_ch):
    """Our vanilla FLUX.2 VAE exported to an AutoencoderKLFlux2 folder (a decoder of other widths:
    decoder_block_out_channels, as BFL's small decoder) computes what diffusers computes from it, and the folder
    reads back tensor-identical, statistics included."""
    import diffusers

    from ldm.checkpoints.diffusers import write_diffusers_folder
    from ldm.checkpoints.keys import read_state_dict

    ours = make_flux2(decoder_ch=decoder_ch).eval()
    folder = write_diffusers_folder(ours.state_dict(), TINY32, {"condition": False, "ch": decoder_ch},
                                    tmp_path / "vae", normalization={"batch_norm_eps": 1e-4, "patch_size": [2, 2]})
    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(folder).eval()
    assert theirs.config.batch_norm_eps == 1e-4 and list(theirs.config.patch_size) == [2, 2]
    assert (theirs.config.decoder_block_out_channels is None) == (decoder_ch == 32)
    assert torch.equal(theirs.bn.running_var, ours.bn.running_var)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post, dist = ours.encode(image), theirs.encode(image).latent_dist
        assert (post.mean - dist.mean).abs().max() < 1e-4 and (post.logvar - dist.logvar).abs().max() < 1e-4
        z = post.mean
        out = ours.decode(z)
        assert out.abs().mean() > 0.05
        assert (out - theirs.decode(z).sample).abs().max() < 1e-4

    back = read_state_dict(folder)
    original = ours.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


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
