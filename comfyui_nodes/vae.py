"""``AsymmetricVAE``: our ``AutoencoderKL`` as a ``comfy.sd.VAE``, so that ComfyUI's own nodes (VAEEncode,
VAEDecode, InpaintModelConditioning, ...) take it; imports ComfyUI."""
from __future__ import annotations

import logging

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sd
import torch

from ._project import submodule

load_autoencoder = submodule("loading").load_autoencoder
integration = submodule("integrations.comfyui")
latent_space_of = submodule("latent_spaces").latent_space_of

log = logging.getLogger(__name__)

# ComfyUI has no public way to wrap a model of another architecture as its VAE (comfy.sd.VAE(sd=...) picks one of
# its own from a state dict's keys), so AsymmetricVAE sets the attributes VAE's methods read. Every internal of
# ComfyUI it touches, in one place, checked against this ComfyUI version
# (tests/integrations/test_comfyui_integration.py compares
# them with what comfy.sd.VAE sets itself, so a ComfyUI update that adds or drops one fails there):
CHECKED_AGAINST = "0.3.64"
VAE_ATTRIBUTES = (
    "first_stage_model", "patcher", "memory_used_encode", "memory_used_decode", "downscale_ratio", "upscale_ratio",
    "latent_channels", "latent_dim", "output_channels", "process_input", "process_output", "working_dtypes",
    "disable_offload", "not_video", "downscale_index_formula", "upscale_index_formula", "extra_1d_channel",
    "crop_input", "device", "vae_dtype", "output_device")
# comfy.model_management's functions it calls (and comfy.model_patcher.ModelPatcher, comfy.sd.VAE's methods)
MODEL_MANAGEMENT = ("dtype_size", "vae_device", "vae_dtype", "vae_offload_device", "intermediate_device",
                    "load_models_gpu", "get_free_memory")


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
        # Qwen-Image's VAE is a video VAE in ComfyUI (latents (B, 16, 1, h, w), Wan21 format): one frame per image
        self.latent_dim = 3 if getattr(model, "architecture", "kl") == "qwenimage" else 2
        self.output_channels = 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
        space = latent_space_of(model)
        # SDXL's VAE overflows in float16; bfloat16 and float32 are safe for every space
        self.working_dtypes = [torch.bfloat16, torch.float32]
        if space is not None and space.fp16_safe:
            self.working_dtypes = [torch.bfloat16, torch.float16, torch.float32]
        self.disable_offload = False
        self.not_video = self.latent_dim == 3  # an image batch is B images of one frame, not a B-frame video
        self.downscale_index_formula = self.upscale_index_formula = None
        self.extra_1d_channel = None
        self.crop_input = True
        self.device = model_management.vae_device()
        self.vae_dtype = model_management.vae_dtype(self.device, self.working_dtypes)
        first_stage.to(self.vae_dtype)
        self.output_device = model_management.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(first_stage, load_device=self.device,
                                                        offload_device=model_management.vae_offload_device())
        _warn_if_untested_comfyui()
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
        samples = integration.one_frame(samples)
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


def _warn_if_untested_comfyui() -> None:
    try:
        from comfyui_version import __version__
    except ImportError:
        return
    if __version__ != CHECKED_AGAINST:
        log.warning("asymmetric VAE: written against ComfyUI %s, running in %s: if VAE nodes fail, compare "
                    "comfyui_nodes/vae.py's VAE_ATTRIBUTES with comfy.sd.VAE", CHECKED_AGAINST, __version__)
