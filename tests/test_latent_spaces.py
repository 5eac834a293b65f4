"""Latent spaces as configuration: latent channels, optional quant convs, scaling and shift (SD 1.x/2.x, SDXL,
SD 3.x, FLUX.1), and the one place that converts VAE latents to diffusion latents."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_DDCONFIG

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
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load("configs/tiny/v1-t2i-tiny.yaml").model
    cfg.params.scale_factor = 0.5
    cfg.params.first_stage_config.params.shift_factor = 0.25
    model = instantiate_from_config(cfg).eval()
    assert model.first_stage_model.scaling_factor == 0.5
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(model.get_first_stage_encoding(z), (z - 0.25) * 0.5, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_first_stage(z), model.first_stage_model.decode(z / 0.5 + 0.25),
                                   rtol=0, atol=0)
