"""Our decoder as a block of diffusers' modular Qwen-Image inpainting pipeline (imports diffusers).

The modular inpaint pipeline (``QwenImageAutoBlocks``, diffusers 0.42.1) decodes in ``QwenImageInpaintDecodeStep``:
``QwenImageDecoderStep`` (unpacked latents -> images with the pipeline's VAE) then the output step (postprocessing,
the optional mask overlay). :class:`AsymmetricQwenImageDecoderStep` takes the first one's place: the same inputs
and output (``images``, (B, 3, H, W) in [-1, 1]), decoded by our ``AutoencoderKL`` conditioned on the image and
mask the pipeline's own input step prepared (``processed_image`` in [-1, 1], ``processed_mask_image``, 1 =
generate)::

    blocks = QwenImageAutoBlocks()
    blocks.sub_blocks["decode"].sub_blocks["inpaint_decode"].sub_blocks["decode"] = \\
        AsymmetricQwenImageDecoderStep(model)

(the path of the inpaint branch's decoder step in the blocks' tree, ``print(blocks)``). The decoder is checked
against the pipeline VAE's latent space (channels, normalisation, downsampling) before it runs.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from diffusers.modular_pipelines.modular_pipeline import ModularPipelineBlocks, PipelineState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam

from . import pair_batch
from .diffusers_pipelines import check_decoder_fits


class AsymmetricQwenImageDecoderStep(ModularPipelineBlocks):
    """``QwenImageDecoderStep`` with our decoder (module docstring); without ``processed_image`` /
    ``processed_mask_image`` in the state (text-to-image) it decodes with no prior."""

    model_name = "qwenimage"

    def __init__(self, decoder: Any):
        super().__init__()
        self.decoder = decoder

    @property
    def description(self) -> str:
        return "Decodes the latents with the asymmetric decoder, conditioned on the processed image and mask"

    @property
    def expected_components(self) -> List[ComponentSpec]:
        from diffusers import AutoencoderKLQwenImage

        return [ComponentSpec("vae", AutoencoderKLQwenImage)]

    @property
    def inputs(self) -> List[InputParam]:
        return [
            InputParam(name="latents", required=True, type_hint=torch.Tensor,
                       description="The denoised latents, unpacked: (B, C, 1, h, w) or (B, C, h, w)"),
            InputParam(name="processed_image", type_hint=torch.Tensor,
                       description="The image the input step prepared, (B, 3, H, W) in [-1, 1]"),
            InputParam(name="processed_mask_image", type_hint=torch.Tensor,
                       description="The mask the input step prepared, (B, 1, H, W), 1 = generate"),
        ]

    @property
    def intermediate_outputs(self) -> List[OutputParam]:
        return [OutputParam.template("images", note="tensor output of the asymmetric decoder.")]

    @torch.no_grad()
    def __call__(self, components: Any, state: PipelineState) -> Tuple[Any, PipelineState]:
        block_state = self.get_block_state(state)
        vae = components.vae
        check_decoder_fits({"_class_name": type(vae).__name__, **vae.config}, self.decoder,
                           pipe_name="the modular Qwen-Image pipeline")
        latents = block_state.latents
        if latents.ndim == 5:
            if latents.shape[2] != 1:
                raise ValueError(f"latents {tuple(latents.shape)}: one frame expected (an image)")
            latents = latents[:, :, 0]
        weight = next(self.decoder.parameters())
        z = self.decoder.unscale_latents(latents.to(weight.device, weight.dtype))
        image, mask = block_state.processed_image, block_state.processed_mask_image
        if image is not None and mask is not None:
            image = pair_batch(image.to(weight.device, weight.dtype), z.shape[0], "image")
            mask = pair_batch(mask.to(weight.device, weight.dtype), z.shape[0], "mask")
            block_state.images = self.decoder.decode(z, image, mask)
        else:
            block_state.images = self.decoder.decode(z)
        self.set_block_state(state, block_state)
        return components, state
