"""LatentDiffusion / LatentInpaintDiffusion: SD v1 checkpoint layout, loading, and conditioning as the original
builds it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.checkpoints.files import CheckpointError, save_state_dict
from ldm.loading import load_model
from ldm.project import load_yaml
from ldm.util import instantiate_from_config
from tests.conftest import REPO

TINY_INPAINT = REPO / "configs/tiny/v1-inpainting-tiny.yaml"
TINY_T2I = REPO / "configs/tiny/v1-t2i-tiny.yaml"

# Buffers the original DDPM.register_schedule saves in every SD checkpoint.
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"}
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def build(config_path, seed=0, **overrides):
    config = load_yaml(config_path).model
    for key, value in overrides.items():
        config.params[key] = value
    torch.manual_seed(seed)
    return instantiate_from_config(config).eval()


def original_layout(model) -> dict:
    """The model's weights as an SD v1.x file stores them: plus EMA counters and the CLIP position ids."""
    sd = dict(model.state_dict())
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    sd[POSITION_IDS] = torch.arange(77)[None]
    return sd


@pytest.fixture(scope="module")
def inpaint_model():
    return build(TINY_INPAINT)


@pytest.mark.parametrize("name, unet_params", [("v1-t2i-inference.yaml", 859_520_964),
                                               ("v1-inpainting-inference.yaml", 859_535_364)])
def test_full_size_configs_build_sd_v1(name, unet_params):
    """SD v1.x sizes: UNet 859.52M (+14,400 for the inpainting UNet's 5 extra input channels), VAE 83,653,863,
    CLIP ViT-L/14 text 123,060,480 (built on the meta device: no memory)."""
    params = load_yaml(REPO / "configs/autoencoder" / name).model.params
    with torch.device("meta"):
        counts = [sum(p.numel() for p in instantiate_from_config(params[k]).parameters())
                  for k in ("unet_config", "first_stage_config", "cond_stage_config")]
    assert counts == [unet_params, 83_653_863, 123_060_480]
    assert params.first_stage_config.params.get("decoder_overrides", {}).get("condition", False) is False


def test_schedule_buffers_have_original_names_and_sd_values(inpaint_model):
    from diffusers import DDIMScheduler

    state = inpaint_model.state_dict()
    top_level = {k for k in state if "." not in k}
    assert top_level == SCHEDULE_BUFFERS
    assert {k.split(".")[0] for k in state if "." in k} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith("model.diffusion_model.") for k in state if k.startswith("model."))
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(inpaint_model.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(inpaint_model.betas, ref.betas, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_sd_checkpoint_loads_with_only_documented_extras(inpaint_model, tmp_path, suffix):
    path = save_state_dict(original_layout(inpaint_model), tmp_path / f"sd{suffix}")
    loaded = load_model(TINY_INPAINT, path)  # fresh random init, then the file
    for k, v in inpaint_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_checkpoint_mismatch_names_the_keys(inpaint_model, tmp_path):
    sd = original_layout(inpaint_model)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    del sd["model.diffusion_model.out.2.bias"]
    path = save_state_dict(sd, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_model(TINY_INPAINT, path)
    assert "model.diffusion_model.extra.weight" in str(e.value)
    assert "model.diffusion_model.out.2.bias" in str(e.value)


def test_a_diffusers_folder_for_the_sd_model_is_refused_in_one_line(tmp_path):
    """``inpaint_st.py --ckpt_d <diffusers folder>``: the SD model is read from one file only."""
    (tmp_path / "sd-inpainting").mkdir()
    (tmp_path / "sd-inpainting" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"sd-inpainting: a folder; the SD model is read from one \.ckpt or "
                                              r"\.safetensors file") as e:
        load_model(TINY_INPAINT, tmp_path / "sd-inpainting")
    assert "\n" not in str(e.value)


def test_ema_scope_and_missing_ema_weights(tmp_path):
    model = build(TINY_T2I, use_ema=True)
    assert "model_ema.decay" in model.state_dict()
    path = save_state_dict(original_layout(build(TINY_T2I)), tmp_path / "emaonly.ckpt")
    with pytest.raises(CheckpointError, match="use_ema: false"):
        model.init_from_ckpt(path)

    weight = model.model.diffusion_model.out[2].weight
    before = weight.detach().clone()
    for name, buf in model.model_ema.named_buffers():
        if name not in ("decay", "num_updates"):
            buf.add_(1.0)
    with model.ema_scope():
        torch.testing.assert_close(weight, before + 1.0)
    torch.testing.assert_close(weight, before)


def test_inpaint_conditioning_is_built_as_the_original(inpaint_model):
    """c_concat = [mask nearest-resized to latent size, scale_factor * SD-VAE sample of image * (mask < 0.5)]."""
    model = inpaint_model
    torch.manual_seed(3)
    image = torch.rand(2, 3, 48, 64) * 2 - 1
    mask = torch.zeros(2, 1, 48, 64)
    mask[0, :, 5:30, 9:40] = 1
    mask[1, :, 20:, :] = 1
    c_cat = model.inpaint_conditioning(image, mask, generator=torch.Generator().manual_seed(7))

    with torch.no_grad():  # as inpaint_conditioning runs it (the CPU layout of inference differs by rounding)
        posterior = model.first_stage_model.encode(image * (mask < 0.5))
    g = torch.Generator().manual_seed(7)
    latent = 0.18215 * (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g))
    assert c_cat.shape == (2, 5, 24, 32)
    torch.testing.assert_close(c_cat[:, :1], F.interpolate(mask, size=(24, 32), mode="nearest"), atol=0, rtol=0)
    torch.testing.assert_close(c_cat[:, 1:], latent, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same size|one size"):
        model.inpaint_conditioning(image, mask[..., :32])


def test_apply_model_routes_hybrid_and_crossattn_conditioning(inpaint_model):
    model = inpaint_model
    torch.manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    c_cat, ctx = torch.randn(2, 5, 8, 8), torch.randn(2, 77, 32)
    out = model.apply_model(x, t, {"c_concat": [c_cat], "c_crossattn": [ctx]})
    ref = model.model.diffusion_model(torch.cat([x, c_cat], 1), t, context=ctx)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs c_concat"):
        model.apply_model(x, t, ctx)

    t2i = build(TINY_T2I)
    ref = t2i.model.diffusion_model(x, t, context=ctx)
    torch.testing.assert_close(t2i.apply_model(x, t, ctx), ref, atol=0, rtol=0)
    torch.testing.assert_close(t2i.apply_model(x, t, [ctx]), ref, atol=0, rtol=0)


def test_stages(inpaint_model):
    model = inpaint_model
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(model.decode_first_stage(z), model.first_stage_model.decode(z / 0.18215))
    uc = model.get_unconditional_conditioning(3, "")
    assert uc.shape == (3, 77, 32)
    torch.testing.assert_close(uc[2], model.cond_stage_model.encode([""])[0])
    posterior = model.encode_first_stage(torch.zeros(1, 3, 16, 16))
    torch.testing.assert_close(model.get_first_stage_encoding(posterior.mode()), 0.18215 * posterior.mode())


def test_bad_constructor_arguments():
    config = load_yaml(TINY_INPAINT).model
    bad = copy.deepcopy(config)
    bad.params.masked_image_key = "image"
    with pytest.raises(ValueError, match="masked_image_key"):
        instantiate_from_config(bad)
    bad = copy.deepcopy(config)
    bad.params.conditioning_key = "sideways"
    with pytest.raises(ValueError, match="conditioning_key"):
        instantiate_from_config(bad)
    bad = copy.deepcopy(config)
    bad.params.personalization_config = {}
    with pytest.raises(TypeError, match="personalization_config"):
        instantiate_from_config(bad)



@pytest.mark.parametrize("spatial, legacy, up_heads", [(True, False, 2), (True, True, 2), (False, False, 2),
                                                       (False, True, 4)])
def test_unet_head_counts_follow_the_original(spatial, legacy, up_heads):
    """num_heads_upsample reaches only the output blocks' AttentionBlock, and only where the original lets it
    (legacy, no num_head_channels); SpatialTransformer uses num_heads at every level, as CompVis' UNetModel."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, UNetModel

    unet = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[1], channel_mult=[1], num_heads=2, num_heads_upsample=4,
                     use_spatial_transformer=spatial, context_dim=16 if spatial else None, legacy=legacy)

    def heads(block):
        if isinstance(block, SpatialTransformer):
            attn = block.transformer_blocks[0].attn1
            return attn.heads, attn.dim_head
        return block.num_heads, 32 // block.num_heads

    kind = SpatialTransformer if spatial else AttentionBlock
    down = [m for m in [*unet.input_blocks.modules(), *unet.middle_block.modules()] if isinstance(m, kind)]
    up = [m for m in unet.output_blocks.modules() if isinstance(m, kind)]
    assert len(down) == 2 and len(up) == 2
    assert [heads(m) for m in down] == [(2, 16)] * 2
    assert [heads(m) for m in up] == [(up_heads, 32 // up_heads)] * 2

# ---------------------------------------------------------------------------------------------------------------------
# The whole sampling chain against diffusers' pipelines, built from the same weights with diffusers' own converters.

def diffusers_parts(model, config_path):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    original_config = OmegaConf.to_container(load_yaml(config_path))
    sd = model.state_dict()
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original_config, sd)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, unet_config))
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original_config, sd)
    vae = DiffusersVAE(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, vae_config))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=None, tokenizer=None, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor:FutureWarning")
@torch.no_grad()
def test_inpainting_chain_matches_diffusers_inpaint_pipeline(inpaint_model):
    """inpaint_st.py's chain (mask + masked-image latents, CFG in one batch, DDIM eta 1 with the noise drawn from one
    generator) equals StableDiffusionInpaintPipeline given the same weights, embeddings, x_T and generator."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from ldm.models.diffusion.ddim import DDIMSampler

    model = inpaint_model
    torch.manual_seed(5)
    image = torch.rand(2, 3, 32, 48) * 2 - 1  # diffusers warns that [-1, 1] tensors are deprecated, and takes them
    mask = torch.zeros(2, 1, 32, 48)
    mask[:, :, 8:24, 10:30] = 1
    c = model.get_learned_conditioning(["a cat", "a dog"])
    uc = model.get_unconditional_conditioning(2, "")
    x_T = torch.randn(2, 4, 16, 24)

    g = torch.Generator().manual_seed(11)
    c_cat = model.inpaint_conditioning(image, mask, generator=g)
    ours, _ = DDIMSampler(model).sample(5, 2, (4, 16, 24), {"c_concat": [c_cat], "c_crossattn": [c]}, eta=1.0,
                                        unconditional_guidance_scale=7.5, x_T=x_T, generator=g, verbose=False,
                                        unconditional_conditioning={"c_concat": [c_cat], "c_crossattn": [uc]},
                                        progress=False)

    pipe = StableDiffusionInpaintPipeline(scheduler=DDIMScheduler(clip_sample=False, **SCHEDULER),
                                          **diffusers_parts(model, TINY_INPAINT))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=c, negative_prompt_embeds=uc, image=image, mask_image=mask, height=32, width=48,
               num_inference_steps=5, guidance_scale=7.5, eta=1.0, generator=torch.Generator().manual_seed(11),
               latents=x_T, output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_txt2img_chain_matches_diffusers_pipeline_with_pndm():
    """txt2img.py --plms: PLMS with CFG equals StableDiffusionPipeline with PNDMScheduler(skip_prk_steps=True).

    (The step count must divide 1000: otherwise the original's uniform spacing visits one step more than asked,
    which diffusers does not.)"""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from ldm.models.diffusion.plms import PLMSSampler

    model = build(TINY_T2I)
    torch.manual_seed(6)
    c = model.get_learned_conditioning(["a cat", "a dog"])
    uc = model.get_unconditional_conditioning(2, "")
    x_T = torch.randn(2, 4, 16, 16)
    ours, _ = PLMSSampler(model).sample(10, 2, (4, 16, 16), c, unconditional_guidance_scale=5.0,
                                        unconditional_conditioning=uc, x_T=x_T, verbose=False, progress=False)
    pipe = StableDiffusionPipeline(scheduler=PNDMScheduler(skip_prk_steps=True, **SCHEDULER),
                                   **diffusers_parts(model, TINY_T2I))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=c, negative_prompt_embeds=uc, height=32, width=32, num_inference_steps=10,
               guidance_scale=5.0, latents=x_T, output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
