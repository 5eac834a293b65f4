"""Our decoder inside every supported diffusers inpainting pipeline (ldm/integrations/diffusers_pipelines.py), on
tiny random components built here.

Text encoders are left out: the pipelines take precomputed prompt embeddings. Each pipeline's VAE is exported from one
of our tiny autoencoders, so a condition-free decoder of ours holds exactly the pipeline VAE's weights.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict

import numpy as np
import pytest
import torch

from ldm.checkpoints.diffusers import ldm_to_diffusers
from ldm.checkpoints.qwenimage import ours_to_diffusers_qwenimage
from ldm.integrations import pair_batch
from ldm.integrations.diffusers_pipelines import (
    PIPELINES,
    PipelineError,
    check_decoder_fits,
    decoder_condition,
    decoder_latent_space,
    describe_latent_space,
    inpaint,
    unpack_latents,
    vae_config_of,
    vae_latent_space,
)
from ldm.latent_spaces import LATENT_SPACES, LatentSpace
from ldm.models.autoencoder import AutoencoderKL
from tests.conftest import TINY_DDCONFIG

diffusers = pytest.importorskip("diffusers")

H, W = 32, 48  # not the pipelines' default square: the output size must come from the image
# Qwen-Image's VAE at tiny widths (f = 8: its latents are 4 x 6 here)
TINY_QWEN = dict(double_z=True, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2, 4, 4],
                 num_res_blocks=1, attn_resolutions=[], dropout=0.0, temporal_downsample=[False, True, True])
TEXT_LEN, TEXT_DIM = 8, 32




def make_decoder(space: LatentSpace, condition: bool, seed: int = 0) -> AutoencoderKL:
    """A tiny autoencoder of ours in a latent space (channels, quant convs, normalisation as released; FLUX.2's
    BatchNorm statistics random, as far from 0 / 1 as the released ones)."""
    torch.manual_seed(seed)
    ddconfig = TINY_QWEN if space.architecture == "qwenimage" else {**TINY_DDCONFIG, "z_channels": space.channels}
    model = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=space.channels,
                          decoder_overrides={"condition": condition}, use_quant_conv=space.quant_conv,
                          architecture=space.architecture, **space.normalization.to_params()).eval()
    if model.bn is not None:
        g = torch.Generator().manual_seed(seed)
        model.bn.running_mean.copy_(torch.randn(model.bn.num_features, generator=g))
        model.bn.running_var.copy_(torch.rand(model.bn.num_features, generator=g) * 3 + 0.05)
    return model


def export_vae(model: AutoencoderKL) -> Any:
    """diffusers ``AutoencoderKL`` (``AutoencoderKLFlux2`` for FLUX.2) with our model's weights and latent
    normalisation."""
    if model.architecture == "qwenimage":
        state_dict, config = ours_to_diffusers_qwenimage(model.state_dict(), TINY_QWEN, model.latent_norm)
    else:
        state_dict, config = ldm_to_diffusers(model.state_dict(), normalization=model.latent_norm)
    vae = getattr(diffusers, config["_class_name"])(**{k: v for k, v in config.items() if not k.startswith("_")})
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


def build_sd(vae: Any, prediction_type: str = "epsilon", pag: bool = False) -> Any:
    cls = diffusers.StableDiffusionPAGInpaintPipeline if pag else diffusers.StableDiffusionInpaintPipeline
    return cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet(9, TEXT_DIM),
               scheduler=diffusers.DDIMScheduler(prediction_type=prediction_type), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)


def controlnet(cls: Any, cross_attention_dim: int, **extra: Any) -> Any:
    torch.manual_seed(0)
    return cls(block_out_channels=(32, 64), layers_per_block=1, in_channels=4, cross_attention_dim=cross_attention_dim,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
               conditioning_embedding_out_channels=(16, 32), **extra)


def build_sd_controlnet(vae: Any, pag: bool = False) -> Any:
    cls = (diffusers.StableDiffusionControlNetPAGInpaintPipeline if pag
           else diffusers.StableDiffusionControlNetInpaintPipeline)
    return cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet(9, TEXT_DIM),
               controlnet=controlnet(diffusers.ControlNetModel, TEXT_DIM), scheduler=diffusers.DDIMScheduler(),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# 6 time ids x 8 + the pooled text embedding (32) feed SDXL's added embedding
SDXL_UNET = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM, use_linear_projection=True)
SDXL_NONE = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                 scheduler=diffusers.EulerDiscreteScheduler(), requires_aesthetics_score=False, add_watermarker=False)


def build_sdxl(vae: Any, pag: bool = False) -> Any:
    cls = diffusers.StableDiffusionXLPAGInpaintPipeline if pag else diffusers.StableDiffusionXLInpaintPipeline
    return cls(vae=vae, unet=unet(9, 2 * TEXT_DIM, **SDXL_UNET), **SDXL_NONE)


def build_sdxl_controlnet(vae: Any) -> Any:
    return diffusers.StableDiffusionXLControlNetInpaintPipeline(
        vae=vae, unet=unet(9, 2 * TEXT_DIM, **SDXL_UNET),
        controlnet=controlnet(diffusers.ControlNetModel, 2 * TEXT_DIM, **SDXL_UNET), **SDXL_NONE)


def build_sdxl_union(vae: Any) -> Any:
    # ControlNet Union inpaints with a 4-channel UNet: the ControlNet reads the masked image
    union = controlnet(diffusers.ControlNetUnionModel, 2 * TEXT_DIM, num_trans_channel=32, num_trans_head=2,
                       num_proj_channel=32, **SDXL_UNET)
    return diffusers.StableDiffusionXLControlNetUnionInpaintPipeline(
        vae=vae, unet=unet(4, 2 * TEXT_DIM, **SDXL_UNET), controlnet=union, **SDXL_NONE)


SD3 = dict(sample_size=16, patch_size=1, out_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
           joint_attention_dim=TEXT_DIM, caption_projection_dim=32, pooled_projection_dim=64)
SD3_NONE = dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def build_sd3(vae: Any) -> Any:
    torch.manual_seed(0)
    # 33 input channels = latents + mask + masked-image latents (SD 3.x inpainting fine-tunes)
    return diffusers.StableDiffusion3InpaintPipeline(
        vae=vae, transformer=diffusers.SD3Transformer2DModel(in_channels=33, **SD3), **SD3_NONE)


def build_sd3_controlnet(vae: Any) -> Any:
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(in_channels=16, **SD3)
    # the inpainting ControlNet reads the masked image's latents and the mask (one extra channel)
    net = diffusers.SD3ControlNetModel(in_channels=16, extra_conditioning_channels=1, **SD3)
    return diffusers.StableDiffusion3ControlNetInpaintingPipeline(vae=vae, transformer=transformer, controlnet=net,
                                                                  **SD3_NONE)


FLUX = dict(patch_size=1, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, axes_dims_rope=[4, 4, 8])
FLUX_NONE = dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None)


def flux_transformer(in_channels: int) -> Any:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(in_channels=in_channels, out_channels=64, pooled_projection_dim=32, **FLUX)


def build_flux(vae: Any) -> Any:
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    packed = 4 * vae.config.latent_channels
    # packed latents + packed masked-image latents + the f x f mask packed the same way
    return diffusers.FluxFillPipeline(vae=vae, transformer=flux_transformer(2 * packed + 4 * f * f), **FLUX_NONE)


def build_flux_inpaint(vae: Any) -> Any:
    return diffusers.FluxInpaintPipeline(vae=vae, transformer=flux_transformer(64), **FLUX_NONE)


def build_flux_kontext(vae: Any) -> Any:
    return diffusers.FluxKontextInpaintPipeline(vae=vae, transformer=flux_transformer(64), **FLUX_NONE)


def build_flux_control(vae: Any) -> Any:
    # packed latents + packed control-image latents
    return diffusers.FluxControlInpaintPipeline(vae=vae, transformer=flux_transformer(128), **FLUX_NONE)


def build_flux_controlnet(vae: Any) -> Any:
    torch.manual_seed(0)
    net = diffusers.FluxControlNetModel(in_channels=64, pooled_projection_dim=32, **FLUX)
    return diffusers.FluxControlNetInpaintPipeline(vae=vae, transformer=flux_transformer(64), controlnet=net,
                                                   **FLUX_NONE)


def build_chroma(vae: Any) -> Any:
    torch.manual_seed(0)
    transformer = diffusers.ChromaTransformer2DModel(in_channels=64, out_channels=64, approximator_num_channels=8,
                                                     approximator_hidden_dim=32, approximator_layers=1, **FLUX)
    # diffusers 0.42.1's ChromaInpaintPipeline reads transformer.config.guidance_embeds, which Chroma's
    # transformer does not declare (AttributeError with any Chroma checkpoint); declared off, as Chroma has none
    transformer.register_to_config(guidance_embeds=False)
    return diffusers.ChromaInpaintPipeline(vae=vae, transformer=transformer, text_encoder=None, tokenizer=None,
                                           scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def zimage_transformer() -> Any:
    torch.manual_seed(0)
    return diffusers.ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
                                              n_kv_heads=2, cap_feat_dim=TEXT_DIM, axes_dims=[4, 4, 8],
                                              axes_lens=[64, 32, 32])


ZIMAGE_NONE = dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None)


def build_zimage(vae: Any) -> Any:
    return diffusers.ZImageInpaintPipeline(vae=vae, transformer=zimage_transformer(), **ZIMAGE_NONE)


def build_zimage_controlnet(vae: Any) -> Any:
    transformer = zimage_transformer()
    torch.manual_seed(0)
    # control latents + mask + masked-image latents (the Union 2.1 layout); shares the transformer's embedders
    net = diffusers.ZImageControlNetModel(control_layers_places=[0], control_refiner_layers_places=[0],
                                          control_in_dim=33, dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2)
    return diffusers.ZImageControlNetInpaintPipeline(vae=vae, transformer=transformer, controlnet=net, **ZIMAGE_NONE)


def build_flux2_klein(vae: Any) -> Any:
    torch.manual_seed(0)
    # packed 2x2 patches of the 32 latent channels; the reference image joins as tokens, not channels
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return diffusers.Flux2KleinInpaintPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                               text_encoder=None, tokenizer=None, transformer=transformer)


QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))


def build_qwen(vae: Any) -> Any:
    torch.manual_seed(0)
    return diffusers.QwenImageInpaintPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                              text_encoder=None, tokenizer=None,
                                              transformer=diffusers.QwenImageTransformer2DModel(**QWEN))


def build_qwen_controlnet(vae: Any) -> Any:
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(**QWEN)
    # the inpainting ControlNet reads the masked image's latents and the mask, both packed: 64 + 4 channels
    net = diffusers.QwenImageControlNetModel(extra_condition_channels=4, **QWEN)
    return diffusers.QwenImageControlNetInpaintPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                                        vae=vae, text_encoder=None, tokenizer=None,
                                                        transformer=transformer, controlnet=net)


def qwen_prompt() -> Dict[str, torch.Tensor]:
    return dict(prompt_embeds=embeds(1, TEXT_LEN, TEXT_DIM, seed=1), prompt_embeds_mask=torch.ones(1, TEXT_LEN))


def blind(pipe: Any) -> None:
    """The pipeline's VAE encoder ignores its input from here on (a constant output): the denoiser, the latent
    blending of the kept region and any control latents no longer see the image, so that a change of the image
    can reach the output only through our decoder. The pipeline's VAE decoder is untouched."""
    pipe.vae.encoder.conv_out.weight.data.zero_()


@dataclasses.dataclass
class Case:
    """One pipeline: its latent space, how to build it, its prompt embeddings and further arguments."""
    name: str
    space: LatentSpace
    build: Callable[[Any], Any]
    prompt: Callable[[], Dict[str, torch.Tensor]]
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.space.channels

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel of the tiny VAE."""
        return 8 if self.space.architecture == "qwenimage" else 2

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


def chroma_prompt() -> Dict[str, torch.Tensor]:
    return dict(prompt_embeds=embeds(1, TEXT_LEN, TEXT_DIM, seed=1), prompt_attention_mask=torch.ones(1, TEXT_LEN),
                negative_prompt_embeds=embeds(1, TEXT_LEN, TEXT_DIM, seed=2),
                negative_prompt_attention_mask=torch.ones(1, TEXT_LEN))


def zimage_prompt() -> Dict[str, Any]:
    # Z-Image takes one (tokens, dim) tensor per prompt
    return dict(prompt_embeds=[embeds(TEXT_LEN, TEXT_DIM, seed=1)],
                negative_prompt_embeds=[embeds(TEXT_LEN, TEXT_DIM, seed=2)])


def control_image() -> np.ndarray:
    return np.random.default_rng(9).random((1, H, W, 3), dtype=np.float32)


def flux2_prompt() -> Dict[str, torch.Tensor]:
    return dict(prompt_embeds=embeds(1, TEXT_LEN, TEXT_DIM, seed=1),
                negative_prompt_embeds=embeds(1, TEXT_LEN, TEXT_DIM, seed=2))


SD, SDXL, SD3_, FLUX_, FLUX2, QWEN_ = (LATENT_SPACES[name] for name in ("sd", "sdxl", "sd3", "flux", "flux2",
                                                                         "qwenimage"))
SDXL_PROMPT, SD3_PROMPT = pooled_prompt(2 * TEXT_DIM, TEXT_DIM), pooled_prompt(TEXT_DIM, 64)
CONTROL = {"control_image": control_image()}
CASES = [
    Case("sd15", SD, build_sd, sd_prompt),
    Case("sd2-v", SD, lambda vae: build_sd(vae, "v_prediction"), sd_prompt),
    Case("sd15-pag", SD, lambda vae: build_sd(vae, pag=True), sd_prompt, {"strength": 1.0}),
    Case("sd15-controlnet", SD, build_sd_controlnet, sd_prompt, CONTROL),
    Case("sd15-controlnet-pag", SD, lambda vae: build_sd_controlnet(vae, pag=True), sd_prompt, CONTROL),
    Case("sdxl", SDXL, build_sdxl, SDXL_PROMPT, {"strength": 1.0}),
    Case("sdxl-pag", SDXL, lambda vae: build_sdxl(vae, pag=True), SDXL_PROMPT, {"strength": 1.0}),
    Case("sdxl-controlnet", SDXL, build_sdxl_controlnet, SDXL_PROMPT, {"strength": 1.0, **CONTROL}),
    Case("sdxl-controlnet-union", SDXL, build_sdxl_union, SDXL_PROMPT,
         {"strength": 1.0, "control_image": [control_image()], "control_mode": [0]}),
    Case("sd3", SD3_, build_sd3, SD3_PROMPT, {"strength": 1.0}),
    Case("sd3-controlnet", SD3_, build_sd3_controlnet, SD3_PROMPT),
    Case("flux-fill", FLUX_, build_flux, flux_prompt),
    Case("flux-inpaint", FLUX_, build_flux_inpaint, flux_prompt, {"strength": 1.0}),
    Case("flux-kontext", FLUX_, build_flux_kontext, flux_prompt, {"_auto_resize": False}),
    Case("flux-control", FLUX_, build_flux_control, flux_prompt, {"strength": 1.0, **CONTROL}),
    Case("flux-controlnet", FLUX_, build_flux_controlnet, flux_prompt, {"strength": 1.0, **CONTROL}),
    Case("chroma", FLUX_, build_chroma, chroma_prompt, {"strength": 1.0}),
    Case("zimage", FLUX_, build_zimage, zimage_prompt),
    Case("zimage-controlnet", FLUX_, build_zimage_controlnet, zimage_prompt, CONTROL),
    Case("flux2-klein", FLUX2, build_flux2_klein, flux2_prompt, {"strength": 1.0}),
    Case("qwen", QWEN_, build_qwen, qwen_prompt, {"strength": 1.0}),
    Case("qwen-controlnet", QWEN_, build_qwen_controlnet, qwen_prompt),
]


def test_every_supported_pipeline_has_a_case():
    assert {type_name(case): case.space.name for case in CASES} == {
        name: entry.space for name, entry in PIPELINES.items()}


def type_name(case: Case) -> str:
    return {"sd2-v": "StableDiffusionInpaintPipeline"}.get(case.name) or PIPELINE_OF[case.name]


PIPELINE_OF = {
    "sd15": "StableDiffusionInpaintPipeline", "sd15-pag": "StableDiffusionPAGInpaintPipeline",
    "sd15-controlnet": "StableDiffusionControlNetInpaintPipeline",
    "sd15-controlnet-pag": "StableDiffusionControlNetPAGInpaintPipeline",
    "sdxl": "StableDiffusionXLInpaintPipeline", "sdxl-pag": "StableDiffusionXLPAGInpaintPipeline",
    "sdxl-controlnet": "StableDiffusionXLControlNetInpaintPipeline",
    "sdxl-controlnet-union": "StableDiffusionXLControlNetUnionInpaintPipeline",
    "sd3": "StableDiffusion3InpaintPipeline", "sd3-controlnet": "StableDiffusion3ControlNetInpaintingPipeline",
    "flux-fill": "FluxFillPipeline", "flux-inpaint": "FluxInpaintPipeline",
    "flux-kontext": "FluxKontextInpaintPipeline", "flux-control": "FluxControlInpaintPipeline",
    "flux-controlnet": "FluxControlNetInpaintPipeline", "chroma": "ChromaInpaintPipeline",
    "zimage": "ZImageInpaintPipeline", "zimage-controlnet": "ZImageControlNetInpaintPipeline",
    "flux2-klein": "Flux2KleinInpaintPipeline",
    "qwen": "QwenImageInpaintPipeline", "qwen-controlnet": "QwenImageControlNetInpaintPipeline",
}


@pytest.fixture(scope="module")
def decoders():
    """Per latent space: a condition-free decoder (whose weights the pipelines' VAEs get) and an asymmetric one,
    shared by the pipelines of that space."""
    return {name: (make_decoder(space, condition=False), make_decoder(space, condition=True, seed=1))
            for name, space in LATENT_SPACES.items() if name in {case.space.name for case in CASES}}


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def setup(request, decoders):
    """(case, pipeline, vanilla decoder holding the pipeline VAE's weights, asymmetric decoder)."""
    case = request.param
    vanilla, asymmetric = decoders[case.space.name]
    pipe = case.build(export_vae(vanilla))
    assert type(pipe).__name__ == type_name(case)
    pipe.set_progress_bar_config(disable=True)
    return case, pipe, vanilla, asymmetric


def inputs(seed: int = 0):
    """Image (1,H,W,3) in [0,1] and mask (1,H,W,1), 1 = generate on the left half's upper part, as arrays (the
    SD 3 and Z-Image ControlNet pipelines take tensors as given, arrays they preprocess as the others do)."""
    image = np.random.default_rng(seed).random((1, H, W, 3), dtype=np.float32)
    mask = np.zeros((1, H, W, 1), dtype=np.float32)
    mask[:, 4:20, 8:28] = 1
    return image, mask


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2)


# one step, no classifier-free guidance (one denoiser pass per step): the tests are about what surrounds the
# denoiser; the pairing test below keeps two steps with guidance
FAST = dict(num_inference_steps=1, guidance_scale=1.0)


def run(case: Case, pipe: Any, decoder: Any, image: Any, mask: Any, **kw: Any) -> np.ndarray:
    return inpaint(pipe, decoder, image, mask, output_type="np", generator=torch.Generator().manual_seed(0),
                   **FAST, **case.prompt(), **case.extra, **kw).images


@torch.no_grad()
def own_decode(pipe: Any, case: Case, image: Any, mask: Any) -> np.ndarray:
    """The pipeline's VAE decoding the pipeline's final latents with the scaling the pipeline encodes with."""
    latents = pipe(image=image, mask_image=mask, height=H, width=W, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **FAST, **case.prompt(), **case.extra).images
    latents = unpack_latents(pipe, latents, H, W)
    decoded = pipe.vae.decode(latents / case.scale + case.shift).sample
    return pipe.image_processor.postprocess(decoded, output_type="np")


@pytest.mark.slow
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


@pytest.mark.slow
def test_decoder_gets_the_pipelines_image_and_mask_and_the_kept_region_follows_the_image(setup, monkeypatch):
    """The decoder receives the image and mask the pipeline preprocessed for itself, at the output size; with the
    pipeline's VAE encoder blind (only our decoder reads the image), the kept region of the output follows the
    input image and the pixels under the mask do not matter."""
    case, pipe, _, asymmetric = setup
    blind(pipe)
    image, mask = inputs()
    made = {"image": [], "mask": []}
    for key, processor in (("image", pipe.image_processor), ("mask", pipe.mask_processor)):
        def record(*args, _orig=processor.preprocess, _key=key, **kwargs):
            made[_key].append(_orig(*args, **kwargs))
            return made[_key][-1]
        monkeypatch.setattr(processor, "preprocess", record)
    received = []

    def decode(z, im, m):
        received.append((z, im, m))
        return asymmetric.decode(z, im, m)

    base = run(case, pipe, asymmetric, image, mask, decode=decode)
    (z, got_image, got_mask), = received
    assert base.shape == (1, H, W, 3)
    assert z.shape == (1, case.channels, H // case.factor, W // case.factor)
    assert got_image.shape == (1, 3, H, W) and got_mask.shape == (1, 1, H, W)
    # the pipeline's own preprocessing, made while it ran (the last call of each is ours)
    assert any(torch.equal(got_image, made_here) for made_here in made["image"][:-1])
    assert any(torch.equal(got_mask, made_here) for made_here in made["mask"][:-1])
    torch.testing.assert_close(got_mask, nchw(mask))  # binary already: 1 = generate, as given
    torch.testing.assert_close(got_image, nchw(image) * 2 - 1, rtol=0, atol=1e-6)

    under_mask = image.copy()
    under_mask[:, 4:20, 8:28] = np.random.default_rng(5).random((1, 16, 20, 3))
    np.testing.assert_array_equal(run(case, pipe, asymmetric, under_mask, mask), base)

    kept = image.copy()
    kept[:, 24:, 30:] = 1 - kept[:, 24:, 30:]
    changed = np.abs(run(case, pipe, asymmetric, kept, mask, decode=decode) - base).max(axis=-1)[0]
    assert changed[mask[0, :, :, 0] == 0].max() > 1e-3  # float noise would be ~1e-7
    # the pipeline's latents did not change: the change came from our decoder
    assert torch.equal(received[-1][0], z)


def test_another_latent_space_is_refused_naming_both(setup):
    case, pipe, _, _ = setup
    other = make_decoder(LATENT_SPACES["sd" if case.channels == 16 else "sd3"], condition=True)
    image, mask = inputs()
    ours, theirs = describe_latent_space(decoder_latent_space(other)), describe_latent_space(
        vae_latent_space(vae_config_of(pipe)))
    with pytest.raises(PipelineError, match=re.escape(f"the decoder: {ours}; {type_name(case)}'s VAE: {theirs}")):
        run(case, pipe, other, image, mask)


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
        check_decoder_fits(vae_config_of(pipe), flux_decoder)
    sdxl_decoder = make_decoder(LATENT_SPACES["sdxl"], condition=True)
    image, mask = inputs()
    with pytest.raises(PipelineError, match="scaling_factor 0.13025.*scaling_factor 0.18215"):
        inpaint(pipe, sdxl_decoder, image, mask, **sd_prompt())
    with pytest.raises(PipelineError, match="padding_mask_crop"):
        inpaint(pipe, sdxl_decoder, image, mask, padding_mask_crop=8, **sd_prompt())


def test_the_controlnet_prepare_image_path_is_followed():
    """Z-Image ControlNet inpainting prepares its image with the ControlNet ``prepare_image`` (a tensor as given, an
    array preprocessed, a batch repeated image by image): the decoder gets the image the pipeline's method makes."""
    pipe = build_zimage_controlnet(export_vae(make_decoder(FLUX_, condition=False)))
    (a, mask), (b, _) = inputs(0), inputs(1)
    prepare = dict(width=W, height=H, device="cpu", dtype=torch.float32)
    two = torch.cat([nchw(a), nchw(b)]) * 2 - 1  # tensors in [-1,1], as the pipeline takes them
    got_image, got_mask = decoder_condition(pipe, two, np.concatenate([mask, mask]), H, W)
    theirs = pipe.prepare_image(image=two, batch_size=4, num_images_per_prompt=2, **prepare)
    torch.testing.assert_close(pair_batch(got_image, 4, "image", interleave=True), theirs, rtol=0, atol=0)
    assert got_mask.shape == (2, 1, H, W)
    got_array, _ = decoder_condition(pipe, a, mask, H, W)
    theirs = pipe.prepare_image(image=a, batch_size=1, num_images_per_prompt=1, **prepare)
    torch.testing.assert_close(got_array, theirs, rtol=0, atol=0)


def test_what_does_not_fit_is_refused_before_the_pipeline_runs():
    sd = make_decoder(LATENT_SPACES["sd"], condition=True)
    image, mask = inputs()
    text_to_image = diffusers.StableDiffusionPipeline(
        vae=export_vae(make_decoder(LATENT_SPACES["sd"], condition=False)), text_encoder=None, tokenizer=None,
        unet=unet(4, TEXT_DIM), scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    with pytest.raises(PipelineError, match="StableDiffusionPipeline is not supported; supported pipelines: "):
        inpaint(text_to_image, sd, image, mask)
    controlnet_pipe = build_sd_controlnet(text_to_image.vae)
    with pytest.raises(PipelineError, match="StableDiffusionControlNetInpaintPipeline needs control_image"):
        inpaint(controlnet_pipe, sd, image, mask, **sd_prompt())
    zimage = build_zimage(export_vae(make_decoder(LATENT_SPACES["flux"], condition=False)))
    with pytest.raises(PipelineError, match=r"ZImageInpaintPipeline sizes its output by the image \(48x32 here\)"):
        inpaint(zimage, None, image, mask, height=64, **zimage_prompt())


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
    out = inpaint(pipe, asymmetric, np.concatenate([a, b]), np.concatenate([mask, mask]), num_inference_steps=2,
                  output_type="np", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                  decode=lambda z, im, m: received.append(im) or asymmetric.decode(z, im, m), **prompt).images
    assert out.shape == (4, H, W, 3)
    masked_latents = denoiser_input[0][1]
    torch.testing.assert_close(masked_latents[2], masked_latents[0])  # the pipeline's pairing: image k mod 2
    assert not torch.equal(masked_latents[1], masked_latents[0])
    (got,) = received
    for k, expected in enumerate([a, b, a, b]):
        torch.testing.assert_close(got[k:k + 1], nchw(expected) * 2 - 1, rtol=0, atol=1e-6)
