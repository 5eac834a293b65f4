"""``AsymmetricVAE``: our ``AutoencoderKL`` as a ``comfy.sd.VAE``, so that ComfyUI's own nodes (VAEEncode,
VAEDecode, InpaintModelConditioning, ...) take it; imports ComfyUI."""
from __future__ import annotations

import logging

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sd
import torch

from ldm.integrations import comfyui as integration
from ldm.latent_spaces import latent_space_of
from ldm.loading import load_autoencoder

log = logging.getLogger(__name__)


class AsymmetricVAE(comfy.sd.VAE):
    """``comfy.sd.VAE`` around :class:`ldm.integrations.comfyui.ComfyFirstStage`. ``VAE.__init__`` is not called:
    it picks an architecture from a state dict's keys; the attributes ComfyUI's ``VAE`` methods read (ComfyUI
    v0.3.64) are set here from our model instead."""

    def __init__(self, model):
        first_stage = integration.ComfyFirstStage(model).eval()
        self.first_stage_model = first_stage
        self.memory_used_encode = lambda shape, dtype: first_stage.memory_used_encode(
            shape, model_management.dtype_size(dtype))
        self.memory_used_decode = lambda shape, dtype: first_stage.memory_used_decode(
            shape, model_management.dtype_size(dtype))
        self.downscale_ratio = self.upscale_ratio = model.downsample_factor
        self.latent_channels = model.embed_dim
        self.latent_dim = 2
        self.output_channels = 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        space = latent_space_of(model)
        # SDXL's VAE overflows in float16; bfloat16 and float32 are safe for every space
        self.working_dtypes = [torch.bfloat16, torch.float32]
        if space is not None and space.fp16_safe:
            self.working_dtypes = [torch.bfloat16, torch.float16, torch.float32]
        self.disable_offload = False
        self.not_video = False
        self.downscale_index_formula = self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True
        self.device = model_management.vae_device()
        self.vae_dtype = model_management.vae_dtype(self.device, self.working_dtypes)
        first_stage.to(self.vae_dtype)
        self.output_device = model_management.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(first_stage, load_device=self.device,
                                                        offload_device=model_management.vae_offload_device())
        log.info("asymmetric VAE: %s latent space, decoder ch %d, condition branch %s; device %s, dtype %s",
                 space.name if space else f"{model.embed_dim}-channel", model.decoder_config["ch"],
                 "yes" if model.decoder.has_condition else "no", self.device, self.vae_dtype)

    @classmethod
    def from_file(cls, path, config=None, latent_space=None) -> "AsymmetricVAE":
        """``config``: a YAML path, as given or relative to the repository (``load_model``'s rule)."""
        return cls(load_autoencoder(path, config=config, latent_space=latent_space))

    @property
    def model(self):
        """The ``AutoencoderKL``."""
        return self.first_stage_model.model

    def get_sd(self):
        """Our keys (ComfyUI's VAESave writes them; AsymmetricVAELoader reads that file back)."""
        return self.model.state_dict()

    def decode_with_prior(self, samples, pixels, mask, tile_size=None, overlap=64):
        """Raw latents, IMAGE, MASK -> IMAGE, decoded with the condition branch reading image and mask; models
        loaded and batches split as ``VAE.decode`` does (by ComfyUI's memory estimate)."""
        self.throw_exception_if_invalid()
        shape = samples.shape
        if tile_size is not None:
            f = self.downscale_ratio
            shape = (1, shape[1], min(shape[2], tile_size // f), min(shape[3], tile_size // f))
        memory = self.memory_used_decode(shape, self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory, force_full_load=self.disable_offload)
        batch = max(1, int(model_management.get_free_memory(self.device) / memory))
        images = integration.decode_with_prior(self.model, samples, pixels, mask, tile_size=tile_size,
                                               overlap=overlap, batch_size=batch)
        return images.to(self.output_device)
