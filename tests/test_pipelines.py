"""Our decoder inside diffusers' four inpainting pipelines (ldm/integrations/diffusers_pipelines.py), on tiny random
components built here.

Text encoders are left out: the pipelines take precomputed prompt embeddings. Each pipeline's VAE is exported from one
of our tiny autoencoders, so a condition-free decoder of ours holds exactly the pipeline VAE's weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import numpy as np
import pytest
import torch

from ldm.checkpoints.diffusers import ldm_to_diffusers
from ldm.integrations.diffusers_pipelines import PipelineError, check_decoder_fits, inpaint, unpack_latents
from ldm.latent_spaces import LATENT_SPACES, LatentSpace
from ldm.models.autoencoder import AutoencoderKL

from .conftest import TINY_DDCONFIG

diffusers = pytest.importorskip("diffusers")

H, W = 32, 48  # not the pipelines' default square: the output size must come from the image
TEXT_LEN, TEXT_DIM = 8, 32


def make_decoder(space: LatentSpace, condition: bool, seed: int = 0) -> AutoencoderKL:
    """A tiny autoencoder of ours in a latent space (channels, quant convs, scale, shift as released)."""
    torch.manual_seed(seed)
    ddconfig = {**TINY_DDCONFIG, "z_channels": space.channels}
    return AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=space.channels,
                         decoder_overrides={"condition": condition}, use_quant_conv=space.quant_conv,
                         scaling_factor=space.scaling_factor, shift_factor=space.shift_factor).eval()


def export_vae(model: AutoencoderKL) -> Any:
    """diffusers ``AutoencoderKL`` with our model's weights and latent scaling."""
    state_dict, config = ldm_to_diffusers(model.state_dict(), scaling_factor=model.scaling_factor,
                                          shift_factor=model.shift_factor)
    vae = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})
    vae.load_state_dict(state_dict)
    return vae.eval()


def embeds(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unet(in_channels: int, cross_attention_dim: int, **extra: Any) -> Any:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, **extra)


def build_sd(vae: Any, prediction_type: str = "epsilon") -> Any:
    return diffusers.StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet(9, TEXT_DIM),
        scheduler=diffusers.DDIMScheduler(prediction_type=prediction_type), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def build_sdxl(vae: Any) -> Any:
    # 6 time ids x 8 + the pooled text embedding (32) feed the added embedding
    return diffusers.StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet(9, 2 * TEXT_DIM, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM, use_linear_projection=True),
        scheduler=diffusers.EulerDiscreteScheduler(), requires_aesthetics_score=False, add_watermarker=False)


def build_sd3(vae: Any) -> Any:
    torch.manual_seed(0)
    # 33 input channels = latents + mask + masked-image latents (SD 3.x inpainting fine-tunes)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=33, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=32, pooled_projection_dim=64)
    return diffusers.StableDiffusion3InpaintPipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def build_flux(vae: Any) -> Any:
    torch.manual_seed(0)
    f = vae.config.block_out_channels and 2 ** (len(vae.config.block_out_channels) - 1)
    packed = 4 * vae.config.latent_channels
    # packed latents + packed masked-image latents + the f x f mask packed the same way
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=2 * packed + 4 * f * f, out_channels=packed, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8])
    return diffusers.FluxFillPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      transformer=transformer)


def blind_sd(pipe: Any) -> None:
    pipe.unet.conv_in.weight.data[:, 4:] = 0


def blind_sd3(pipe: Any) -> None:
    pipe.transformer.pos_embed.proj.weight.data[:, 16:] = 0


def blind_flux(pipe: Any) -> None:
    packed = 4 * pipe.vae.config.latent_channels
    pipe.transformer.x_embedder.weight.data[:, packed:] = 0


@dataclasses.dataclass
class Case:
    """One pipeline: its latent space, how to build it, its prompt embeddings and how to make its denoiser ignore
    the image (so that a change of the image can only reach the output through the decoder)."""
    name: str
    space: LatentSpace
    build: Callable[[Any], Any]
    prompt: Callable[[], Dict[str, torch.Tensor]]
    blind: Callable[[Any], None]
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.space.channels

    @property
    def scale(self) -> float:
        return self.space.scaling_factor

    @property
    def shift(self) -> float:
        return self.space.shift_factor


def sd_prompt() -> Dict[str, torch.Tensor]:
    return dict(prompt_embeds=embeds(1, TEXT_LEN, TEXT_DIM, seed=1),
                negative_prompt_embeds=embeds(1, TEXT_LEN, TEXT_DIM, seed=2))


def pooled_prompt(dim: int, pooled: int) -> Callable[[], Dict[str, torch.Tensor]]:
    return lambda: dict(prompt_embeds=embeds(1, TEXT_LEN, dim, seed=1), pooled_prompt_embeds=embeds(1, pooled, seed=3),
                        negative_prompt_embeds=embeds(1, TEXT_LEN, dim, seed=2),
                        negative_pooled_prompt_embeds=embeds(1, pooled, seed=4))


def flux_prompt() -> Dict[str, torch.Tensor]:
    return dict(prompt_embeds=embeds(1, TEXT_LEN, TEXT_DIM, seed=1), pooled_prompt_embeds=embeds(1, 32, seed=3))


CASES = [
    Case("sd15", LATENT_SPACES["sd"], build_sd, sd_prompt, blind_sd),
    Case("sd2-v", LATENT_SPACES["sd"], lambda vae: build_sd(vae, "v_prediction"), sd_prompt, blind_sd),
    Case("sdxl", LATENT_SPACES["sdxl"], build_sdxl, pooled_prompt(2 * TEXT_DIM, TEXT_DIM), blind_sd,
         {"strength": 1.0}),
    Case("sd3", LATENT_SPACES["sd3"], build_sd3, pooled_prompt(TEXT_DIM, 64), blind_sd3, {"strength": 1.0}),
    Case("flux-fill", LATENT_SPACES["flux"], build_flux, flux_prompt, blind_flux),
]


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def setup(request):
    """(case, pipeline, vanilla decoder holding the pipeline VAE's weights, asymmetric decoder)."""
    case = request.param
    vanilla = make_decoder(case.space, condition=False)
    pipe = case.build(export_vae(vanilla))
    pipe.set_progress_bar_config(disable=True)
    asymmetric = make_decoder(case.space, condition=True, seed=1)
    return case, pipe, vanilla, asymmetric


def inputs(seed: int = 0):
    """Image (1,3,H,W) in [0,1] and mask (1,1,H,W), 1 = generate on the left half's upper part."""
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, 1, H, W)
    mask[..., 4:20, 8:28] = 1
    return image, mask


def run(case: Case, pipe: Any, decoder: Any, image: torch.Tensor, mask: torch.Tensor, **kw: Any) -> np.ndarray:
    return inpaint(pipe, decoder, image, mask, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0), **case.prompt(), **case.extra, **kw)


@torch.no_grad()
def own_decode(pipe: Any, case: Case, image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The pipeline's VAE decoding the pipeline's final latents with the scaling the pipeline encodes with."""
    latents = pipe(image=image, mask_image=mask, height=H, width=W, num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **case.prompt(), **case.extra).images
    latents = unpack_latents(pipe, latents, H, W)
    decoded = pipe.vae.decode(latents / case.scale + case.shift).sample
    return pipe.image_processor.postprocess(decoded, output_type="np")


def test_vanilla_decoder_gives_the_pipelines_own_output(setup):
    case, pipe, vanilla, _ = setup
    image, mask = inputs()
    ours = run(case, pipe, vanilla, image, mask)
    assert ours.shape == (1, H, W, 3)
    if case.name == "sd3":
        # diffusers' SD3 inpainting decodes latents / scale without adding the shift its own encoding subtracted
        # (huggingface/diffusers#13611); we invert the encoding, as its text-to-image and img2img pipelines do
        reference = own_decode(pipe, case, image, mask)
        theirs = run(case, pipe, None, image, mask)
        assert np.abs(theirs - reference).max() > 1e-3
    else:
        reference = run(case, pipe, None, image, mask)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_decoder_gets_the_pipelines_image_and_mask_at_the_output_size(setup, monkeypatch):
    case, pipe, _, asymmetric = setup
    image, mask = inputs()
    made = {"image": [], "mask": []}
    for key, processor in (("image", pipe.image_processor), ("mask", pipe.mask_processor)):
        def record(*args, _orig=processor.preprocess, _key=key, **kwargs):
            made[_key].append(_orig(*args, **kwargs))
            return made[_key][-1]
        monkeypatch.setattr(processor, "preprocess", record)
    received = []
    out = run(case, pipe, asymmetric, image, mask,
              decode=lambda z, im, m: received.append((z, im, m)) or asymmetric.decode(z, im, m))
    (z, got_image, got_mask), = received
    assert out.shape == (1, H, W, 3)
    assert z.shape == (1, case.channels, H // 2, W // 2)
    assert got_image.shape == (1, 3, H, W) and got_mask.shape == (1, 1, H, W)
    # the first preprocess calls are the pipeline's own, made while it ran
    torch.testing.assert_close(got_image, made["image"][0], rtol=0, atol=0)
    torch.testing.assert_close(got_mask, made["mask"][0], rtol=0, atol=0)
    torch.testing.assert_close(got_mask, mask)  # binary already: 1 = generate, as given
    torch.testing.assert_close(got_image, image * 2 - 1, rtol=0, atol=1e-6)


def test_kept_region_follows_the_input_image(setup):
    case, pipe, vanilla, asymmetric = setup
    case.blind(pipe)  # from here on the denoiser ignores the image: a change can reach the output only via decoding
    image, mask = inputs()
    keep = (mask[0, 0] == 0).numpy()
    base = run(case, pipe, asymmetric, image, mask)

    under_mask = image.clone()
    under_mask[..., 4:20, 8:28] = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(run(case, pipe, asymmetric, under_mask, mask), base)

    kept = image.clone()
    kept[..., 24:, 30:] = 1 - kept[..., 24:, 30:]
    changed = np.abs(run(case, pipe, asymmetric, kept, mask) - base).max(axis=-1)[0]
    assert changed[keep].max() > 1e-3  # float noise would be ~1e-7; the control below is exact
    # the pipeline's own VAE does not read the image: its output stays the same, so the change came from our decoder
    np.testing.assert_array_equal(run(case, pipe, vanilla, kept, mask), run(case, pipe, vanilla, image, mask))


def test_flux_unpacking_is_the_inverse_of_flux_packing():
    """Guards the one private diffusers helper we call (FluxFillPipeline._unpack_latents): FLUX packs 2x2 latent
    patches into tokens (B, h/2 * w/2, 4C), row-major over patches, channel-major inside a token."""
    pipe = build_flux(export_vae(make_decoder(LATENT_SPACES["flux"], condition=False)))
    latents = torch.randn(2, 16, H // 2, W // 2)
    b, c, h, w = latents.shape
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
    torch.testing.assert_close(unpack_latents(pipe, packed, H, W), latents, rtol=0, atol=0)


def test_mismatched_latent_space_is_refused_naming_both():
    pipe = build_sd(export_vae(make_decoder(LATENT_SPACES["sd"], condition=False)))
    flux_decoder = make_decoder(LATENT_SPACES["flux"], condition=True)
    with pytest.raises(PipelineError, match=r"16 channels, scaling_factor 0.3611.*4 channels, scaling_factor 0.18215"):
        check_decoder_fits(pipe.vae.config, flux_decoder)
    sdxl_decoder = make_decoder(LATENT_SPACES["sdxl"], condition=True)
    image, mask = inputs()
    with pytest.raises(PipelineError, match="scaling_factor 0.13025.*scaling_factor 0.18215"):
        inpaint(pipe, sdxl_decoder, image, mask, **sd_prompt())
    with pytest.raises(PipelineError, match="padding_mask_crop"):
        inpaint(pipe, sdxl_decoder, image, mask, padding_mask_crop=8, **sd_prompt())


def test_several_images_and_samples_pair_as_in_the_pipeline():
    """2 images x 2 samples each: the pipeline conditions latent k on image k mod 2 (it repeats its mask and masked
    image batch); the decoder gets the same pairing."""
    case = CASES[0]
    pipe = case.build(export_vae(make_decoder(case.space, condition=False)))
    pipe.set_progress_bar_config(disable=True)
    asymmetric = make_decoder(case.space, condition=True, seed=1)
    (a, mask), (b, _) = inputs(0), inputs(1)
    prompt = {k: v.repeat(2, 1, 1) for k, v in case.prompt().items()}
    received, denoiser_input = [], []
    prepare = pipe.prepare_mask_latents
    pipe.prepare_mask_latents = lambda *args, **kw: denoiser_input.append(prepare(*args, **kw)) or denoiser_input[-1]
    out = inpaint(pipe, asymmetric, torch.cat([a, b]), torch.cat([mask, mask]), num_inference_steps=2,
                  output_type="np", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                  decode=lambda z, im, m: received.append(im) or asymmetric.decode(z, im, m), **prompt)
    assert out.shape == (4, H, W, 3)
    masked_latents = denoiser_input[0][1]
    torch.testing.assert_close(masked_latents[2], masked_latents[0])  # the pipeline's pairing: image k mod 2
    assert not torch.equal(masked_latents[1], masked_latents[0])
    (got,) = received
    for k, expected in enumerate([a, b, a, b]):
        torch.testing.assert_close(got[k:k + 1], expected * 2 - 1, rtol=0, atol=1e-6)
