"""Our decoder inside diffusers' inpainting pipelines.

One mechanism for ``StableDiffusionInpaintPipeline`` (SD 1.5 / SD 2 inpainting), ``StableDiffusionXLInpaintPipeline``,
``StableDiffusion3InpaintPipeline`` and ``FluxFillPipeline``:

1. the pipeline runs as it always does (its own VAE encodes the image for the denoiser) with ``output_type="latent"``
   at an explicit output size, so it returns the final latents instead of decoding them;
2. FLUX returns them packed into 2x2 patches: :func:`unpack_latents` restores (B,C,h,w) (the one place that calls a
   private diffusers helper, ``_unpack_latents``; a test compares it with the pipeline's own decode);
3. the pipeline's own ``image_processor`` / ``mask_processor`` prepare the image and mask at the output size, exactly
   as the pipeline prepared them for itself (image in [-1,1], mask binarised, 1 = generate);
4. our decoder undoes the latent scaling (``model.unscale_latents``: ``latents / scale + shift``, the inverse of the
   pipeline's encoding ``(x - shift) * scale``) and decodes with image and mask; the pipeline's ``image_processor``
   turns the result into the requested output type.

Images and masks are whatever the pipelines accept (PIL images, arrays, tensors); the mask is white / 1 = generate.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple

if TYPE_CHECKING:  # torch is imported where it runs, so that scripts list PIPELINES in --help without loading it
    import torch

PIPELINES: Dict[str, str] = {
    "StableDiffusionInpaintPipeline": "SD 1.5 / SD 2 inpainting",
    "StableDiffusionXLInpaintPipeline": "SDXL inpainting",
    "StableDiffusion3InpaintPipeline": "SD 3.x inpainting",
    "FluxFillPipeline": "FLUX.1 Fill",
}

# arguments that would make the pipeline's output something other than the decoded final latents at (height, width)
_REFUSED_ARGUMENTS = {
    "padding_mask_crop": "the pipeline would inpaint a crop and paste it back with its own VAE's decode",
    "return_dict": "inpaint() returns the images",
}


class PipelineError(ValueError):
    """A pipeline, decoder or argument that cannot be combined; the message names both sides."""


def check_pipeline(pipe: Any) -> None:
    """Refuse pipelines this module does not support (by class, including subclasses) and VAEs whose latents are
    normalised per channel (``latents_mean`` / ``latents_std``, e.g. Playground v2.5), which our decoders do not
    model."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    if not names & PIPELINES.keys():
        raise PipelineError(f"{type(pipe).__name__} is not supported; supported pipelines: {', '.join(PIPELINES)}")
    if getattr(pipe.vae.config, "latents_mean", None) is not None:
        raise PipelineError(f"{type(pipe).__name__}: its VAE normalises latents per channel (latents_mean / "
                            "latents_std); only a scalar scaling_factor / shift_factor is supported")


def vae_latent_space(vae_config: Mapping[str, Any]) -> Tuple[int, float, float, int]:
    """``(channels, scaling_factor, shift_factor, downsampling factor)`` of a diffusers VAE config
    (``pipe.vae.config`` or a ``vae/config.json``; a missing or null ``shift_factor`` is 0, as in SD 1.x / SDXL)."""
    return (int(vae_config["latent_channels"]), float(vae_config["scaling_factor"]),
            float(vae_config.get("shift_factor") or 0.0), 2 ** (len(vae_config["block_out_channels"]) - 1))


def decoder_latent_space(decoder: Any) -> Tuple[int, float, float, int]:
    """The same four numbers for our ``AutoencoderKL``."""
    return (int(decoder.embed_dim), float(decoder.scaling_factor), float(decoder.shift_factor),
            int(decoder.downsample_factor))


def describe_latent_space(space: Tuple[int, float, float, int]) -> str:
    channels, scale, shift, f = space
    return f"{channels} channels, scaling_factor {scale:g}, shift_factor {shift:g}, {f}x downsampling"


def check_decoder_fits(vae_config: Mapping[str, Any], decoder: Any, pipe_name: str = "the pipeline",
                       decoder_name: str = "the decoder") -> None:
    """Refuse a decoder whose latent space (channels, scale, shift, downsampling) is not that of the pipeline's VAE
    (``pipe.vae.config``); the message names both."""
    ours, theirs = decoder_latent_space(decoder), vae_latent_space(vae_config)
    same = (ours[0] == theirs[0] and ours[3] == theirs[3]
            and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(ours[1:3], theirs[1:3])))
    if not same:
        raise PipelineError(f"{decoder_name} decodes another latent space than {pipe_name}'s VAE: "
                            f"{decoder_name}: {describe_latent_space(ours)}; {pipe_name}'s VAE: "
                            f"{describe_latent_space(theirs)}")


def output_size(pipe: Any, image: Any, height: Optional[int] = None, width: Optional[int] = None) -> Tuple[int, int]:
    """The output ``(height, width)``: the given ones, else the input image's size; both rounded down to what the
    pipeline's image processor accepts (a multiple of 8, 16 for FLUX). Passed to the pipeline explicitly, so the
    pipeline, the decoder's image and mask, and FLUX's unpacking all use the same size (the pipelines' own default is
    a fixed square, e.g. 1024x1024, which would stretch the image)."""
    return pipe.image_processor.get_default_height_width(image, height, width)


def native_size(pipe: Any) -> int:
    """The pipeline's default output side in pixels (its ``height``/``width`` when none is given): 512 for SD 1.5,
    1024 for SDXL, SD 3.x and FLUX.1 Fill."""
    sample_size = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    return int(sample_size) * int(pipe.vae_scale_factor)


def unpack_latents(pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Final latents as the pipeline returns them with ``output_type="latent"`` -> (B,C,h,w). SD/SDXL/SD3 return
    (B,C,h,w) already; FLUX returns 2x2 patches packed into tokens (B, h*w/4, 4*C), restored by the pipeline's own
    ``_unpack_latents`` (private in diffusers: ``tests/test_pipelines.py`` fails if it changes)."""
    if latents.ndim == 4:
        return latents
    unpack = getattr(type(pipe), "_unpack_latents", None)
    if latents.ndim != 3 or unpack is None:
        raise PipelineError(f"{type(pipe).__name__} returned latents of shape {tuple(latents.shape)}: expected "
                            "(B,C,h,w), or packed (B,tokens,channels) with the pipeline's _unpack_latents (FLUX)")
    return unpack(latents, height, width, pipe.vae_scale_factor)


def decoder_condition(pipe: Any, image: Any, mask_image: Any, height: int, width: int
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The image (B,3,H,W) in [-1,1] and mask (B,1,H,W) in {0,1} (1 = generate) as the pipeline prepares them for
    itself: its ``image_processor`` and ``mask_processor`` at the output size."""
    return (pipe.image_processor.preprocess(image, height=height, width=width),
            pipe.mask_processor.preprocess(mask_image, height=height, width=width))


def _batch_like(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Image/mask batch -> the latent batch: batch 1 is shared; B prompts x n images per prompt repeat the whole
    batch n times, as the pipelines repeat their mask and masked image for the denoiser."""
    if t.shape[0] in (1, batch):
        return t
    if batch % t.shape[0]:
        raise PipelineError(f"{t.shape[0]} images for {batch} latents: cannot pair them")
    return t.repeat(batch // t.shape[0], 1, 1, 1)


def inpaint(pipe: Any, decoder: Optional[Any], image: Any, mask_image: Any, *, height: Optional[int] = None,
            width: Optional[int] = None, output_type: str = "pil",
            decode: Optional[Callable[..., "torch.Tensor"]] = None, **pipe_kwargs: Any) -> Any:
    """Run ``pipe`` (one of :data:`PIPELINES`) and decode its final latents with ``decoder`` (our
    ``AutoencoderKL``, conditioned on the pipeline's image and mask); ``decoder=None`` lets the pipeline decode
    with its own VAE (for comparison, at the same size).

    ``pipe_kwargs`` go to the pipeline unchanged (``prompt``, ``num_inference_steps``, ``guidance_scale``,
    ``generator``, ``num_images_per_prompt``, ``strength``, prompt embeddings, ...). Returns what
    ``pipe(...).images`` would be for ``output_type`` ("pil", "np" or "pt"), at :func:`output_size`.
    The decoder runs on its own device and dtype; the latents are moved there. ``decode(z, image, mask)`` replaces
    ``decoder.decode`` (float32, the exact path) where a faster path of the same decoder is wanted.
    """
    import torch

    check_pipeline(pipe)
    for name, why in _REFUSED_ARGUMENTS.items():
        if name in pipe_kwargs:
            raise PipelineError(f"{name} is not supported here: {why}")
    if output_type == "latent":
        raise PipelineError("output_type='latent': call the pipeline itself to get latents")
    height, width = output_size(pipe, image, height, width)
    call = dict(image=image, mask_image=mask_image, height=height, width=width, **pipe_kwargs)
    if decoder is None:
        return pipe(**call, output_type=output_type).images
    check_decoder_fits(pipe.vae.config, decoder)
    latents = unpack_latents(pipe, pipe(**call, output_type="latent").images, height, width)
    cond_image, cond_mask = decoder_condition(pipe, image, mask_image, height, width)
    weight = next(decoder.parameters())
    z = decoder.unscale_latents(latents.to(device=weight.device, dtype=weight.dtype))
    cond_image = _batch_like(cond_image.to(device=weight.device, dtype=weight.dtype), z.shape[0])
    cond_mask = _batch_like(cond_mask.to(device=weight.device, dtype=weight.dtype), z.shape[0])
    with torch.no_grad():
        decoded = (decode or decoder.decode)(z, cond_image, cond_mask)
    return pipe.image_processor.postprocess(decoded.float(), output_type=output_type)
