"""Our decoder inside diffusers' inpainting pipelines.

One mechanism for every inpainting pipeline of the pinned diffusers whose VAE is one of our latent spaces
(:data:`PIPELINES`):

1. the pipeline runs as it always does (its own VAE encodes the image for the denoiser) with ``output_type="latent"``
   at the output size, so it returns its final latents instead of decoding them;
2. the latents become (B,C,h,w) in the VAE's own latent space: FLUX-style pipelines return 2x2 patches packed into
   tokens, restored by the pipeline's own ``_unpack_latents`` (the one private diffusers helper called here; a test
   compares it with the packing); most pipelines return latents as the denoiser sees them (``(z - shift) * scale``),
   undone by ``model.unscale_latents``; FLUX.2 undoes its normalisation itself before returning;
3. the pipeline's own ``image_processor`` / ``mask_processor`` prepare the image and mask at the output size, as the
   pipeline prepared them for itself (image in [-1,1], mask binarised, 1 = generate);
4. our decoder decodes with image and mask; the pipeline's ``image_processor`` turns the result into the output type.

What differs between pipelines is read from their code (diffusers 0.42.1) and written once per family
(:class:`Family`, :data:`FAMILIES`): which arguments carry the image and the mask, packed latents, normalised or
raw latents, who sets the output size, extra required arguments.
Images and masks are whatever the pipelines accept (PIL images, arrays, tensors); the mask is white / 1 = generate.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

if TYPE_CHECKING:  # torch is imported where it runs, so that scripts list PIPELINES in --help without loading it
    import torch

    from ..latent_spaces import Normalization

SizeRule = Callable[[Any, Any, Mapping[str, Any]], Tuple[Any, int, int]]


def _size_of_image(pipe: Any, image: Any, kwargs: Mapping[str, Any]) -> Tuple[Any, int, int]:
    """Z-Image inpainting: the image's own size, floored to what the image processor accepts (a multiple of 16)."""
    height, width = pipe.image_processor.get_default_height_width(image)
    return image, height, width


def _size_of_kontext(pipe: Any, image: Any, kwargs: Mapping[str, Any]) -> Tuple[Any, int, int]:
    """FLUX.1 Kontext: the preferred Kontext resolution nearest the image's aspect ratio (``_auto_resize``, on by
    default), else the image's own size; floored to a multiple of 16; the image resized to it."""
    from diffusers.pipelines.flux.pipeline_flux_kontext_inpaint import PREFERRED_KONTEXT_RESOLUTIONS

    first = image[0] if isinstance(image, list) else image
    height, width = pipe.image_processor.get_default_height_width(first)
    if kwargs.get("_auto_resize", True):
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    multiple = 2 * pipe.vae_scale_factor
    height, width = height // multiple * multiple, width // multiple * multiple
    return pipe.image_processor.resize(image, height, width), height, width


def _raw_size(image: Any) -> Tuple[int, int]:
    """(height, width) of a PIL image, a (..., H, W) tensor or a (..., H, W, C) array (the first of a list)."""
    first = image[0] if isinstance(image, list) else image
    if hasattr(first, "height") and hasattr(first, "width"):  # PIL
        return first.height, first.width
    shape = tuple(first.shape)
    return shape[-3:-1] if type(first).__module__ == "numpy" and len(shape) >= 3 else shape[-2:]


def _size_of_flux2(pipe: Any, image: Any, kwargs: Mapping[str, Any]) -> Tuple[Any, int, int]:
    """FLUX.2: the image's size, first scaled down to 1024x1024 pixels of area if larger; floored to a multiple
    of 16 (the pipeline's own rule, with its ``_get_raw_image_size``)."""
    height, width = _raw_size(image)
    if height * width > 1024 * 1024:
        scale = math.sqrt(1024 * 1024 / (height * width))
        image = pipe.image_processor.resize(image, int(height * scale), int(width * scale))
        height, width = _raw_size(image)
    multiple = 2 * pipe.vae_scale_factor
    return image, height // multiple * multiple, width // multiple * multiple


@dataclasses.dataclass(frozen=True)
class Family:
    """What the pipelines of one family do with the image, the mask and the final latents, read from their code.

    ``image`` / ``mask``: the pipeline arguments that carry the image to inpaint and its mask (SD 3 ControlNet
    inpainting takes them as ``control_image`` / ``control_mask``).
    ``packed``: ``output_type="latent"`` returns 2x2 latent patches packed into tokens (FLUX).
    ``normalised``: the returned latents are normalised as the denoiser sees them (``model.unscale_latents``
    undoes it); ``False``: the VAE's own latents (FLUX.2 denormalises and unpatchifies before returning).
    ``size``: ``None`` = the pipeline takes ``height`` / ``width`` (passed explicitly: the image's size unless
    given); else the pipeline's own rule (the image's size, resized for Kontext and FLUX.2) as a function
    ``(pipe, image, kwargs) -> (image as the pipeline resized it, height, width)``; ``height`` / ``width`` are
    then refused.
    ``as_control``: the pipeline passes these inputs through its ControlNet ``prepare_image`` path: a tensor is
    taken as given ([-1,1] image, {0,1} mask), not preprocessed, and a batch is repeated image by image
    (``repeat_interleave``) where the others repeat it whole.
    ``requires``: further arguments the pipeline cannot run without.
    """
    name: str
    image: str = "image"
    mask: str = "mask_image"
    packed: bool = False
    normalised: bool = True
    size: Optional[SizeRule] = None
    as_control: Tuple[str, ...] = ()
    requires: Tuple[str, ...] = ()


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("SD"),  # SD 1.x / 2.x, SDXL, SD 3.x inpainting, their PAG variants
    Family("SD ControlNet", requires=("control_image",)),
    Family("SDXL ControlNet Union", requires=("control_image", "control_mode")),
    # text-to-image with an inpainting ControlNet: the image and mask are the control's
    Family("SD 3 ControlNet", image="control_image", mask="control_mask", as_control=("image", "mask")),
    Family("FLUX", packed=True),  # FLUX.1 Fill, FLUX.1 img2img inpainting, Chroma
    Family("FLUX control", packed=True, requires=("control_image",)),
    Family("FLUX Kontext", packed=True, size=_size_of_kontext),
    Family("Z-Image", size=_size_of_image),
    Family("Z-Image ControlNet", as_control=("image",), requires=("control_image",)),
    Family("FLUX.2", normalised=False, size=_size_of_flux2),
    # Qwen-Image: 2x2 patches packed into tokens, _unpack_latents gives (B, C, 1, h, w); latents normalised per channel
    Family("Qwen-Image", packed=True),
    Family("Qwen-Image ControlNet", image="control_image", mask="control_mask", packed=True,
           as_control=("image", "mask")),
)}


class Supported(NamedTuple):
    models: str
    space: str  # the name in ldm.latent_spaces.LATENT_SPACES
    family: str  # the key in FAMILIES


PIPELINES: Dict[str, Supported] = {
    "StableDiffusionInpaintPipeline": Supported("SD 1.5 / SD 2 inpainting", "sd", "SD"),
    "StableDiffusionPAGInpaintPipeline": Supported("SD 1.5 / SD 2 inpainting with PAG", "sd", "SD"),
    "StableDiffusionControlNetInpaintPipeline": Supported("SD 1.5 + ControlNet", "sd", "SD ControlNet"),
    "StableDiffusionControlNetPAGInpaintPipeline": Supported("SD 1.5 + ControlNet with PAG", "sd", "SD ControlNet"),
    "StableDiffusionXLInpaintPipeline": Supported("SDXL (inpainting fine-tunes or base)", "sdxl", "SD"),
    "StableDiffusionXLPAGInpaintPipeline": Supported("SDXL with PAG", "sdxl", "SD"),
    "StableDiffusionXLControlNetInpaintPipeline": Supported("SDXL + ControlNet", "sdxl", "SD ControlNet"),
    "StableDiffusionXLControlNetUnionInpaintPipeline": Supported("SDXL + ControlNet Union (ProMax)", "sdxl",
                                                                 "SDXL ControlNet Union"),
    "StableDiffusion3InpaintPipeline": Supported("SD 3.x inpainting", "sd3", "SD"),
    "StableDiffusion3ControlNetInpaintingPipeline": Supported("SD 3 + inpainting ControlNet (e.g. alimama's)",
                                                              "sd3", "SD 3 ControlNet"),
    "FluxFillPipeline": Supported("FLUX.1 Fill", "flux", "FLUX"),
    "FluxInpaintPipeline": Supported("FLUX.1 dev / schnell", "flux", "FLUX"),
    "ChromaInpaintPipeline": Supported("Chroma", "flux", "FLUX"),
    "FluxControlInpaintPipeline": Supported("FLUX.1 Canny / Depth", "flux", "FLUX control"),
    "FluxControlNetInpaintPipeline": Supported("FLUX.1 + ControlNet", "flux", "FLUX control"),
    "FluxKontextInpaintPipeline": Supported("FLUX.1 Kontext", "flux", "FLUX Kontext"),
    "ZImageInpaintPipeline": Supported("Z-Image (Turbo)", "flux", "Z-Image"),
    "ZImageControlNetInpaintPipeline": Supported("Z-Image + ControlNet (Union)", "flux", "Z-Image ControlNet"),
    "Flux2KleinInpaintPipeline": Supported("FLUX.2 [klein]", "flux2", "FLUX.2"),
    "QwenImageInpaintPipeline": Supported("Qwen-Image", "qwenimage", "Qwen-Image"),
    "QwenImageControlNetInpaintPipeline": Supported("Qwen-Image + inpainting ControlNet", "qwenimage",
                                                    "Qwen-Image ControlNet"),
}

# arguments that would make the pipeline's output something other than the decoded final latents at the output size
_REFUSED_ARGUMENTS = {
    "padding_mask_crop": "the pipeline would inpaint a crop and paste it back with its own VAE's decode",
    "return_dict": "inpaint() returns the pipeline's own output (its .images)",
    "masked_image_latents": "our decoder reads the image itself, not latents of it",
}


class PipelineError(ValueError):
    """A pipeline, decoder or argument that cannot be combined; the message names both sides."""


def supported(pipe: Any) -> Tuple[str, Supported]:
    """``(class name, PIPELINES entry)`` of a pipeline (a subclass counts as its supported base); refuses pipelines
    not in :data:`PIPELINES` and VAEs whose latents are normalised per channel (``latents_mean`` / ``latents_std``,
    e.g. Playground v2.5), which the inpainting pipelines do not apply consistently."""
    name = next((cls.__name__ for cls in type(pipe).__mro__ if cls.__name__ in PIPELINES), None)
    if name is None:
        raise PipelineError(f"{type(pipe).__name__} is not supported; supported pipelines: {', '.join(PIPELINES)}")
    if getattr(pipe.vae.config, "latents_mean", None) is not None and PIPELINES[name].space != "qwenimage":
        raise PipelineError(f"{type(pipe).__name__}: its VAE normalises latents per channel (latents_mean / "
                            "latents_std), which diffusers' inpainting pipelines apply when decoding (SDXL) but not "
                            "when encoding the image: no consistent latent space to decode")
    return name, PIPELINES[name]


def family_of(pipe: Any) -> Family:
    return FAMILIES[supported(pipe)[1].family]


LatentSpaceKey = Tuple[int, int, "Normalization"]  # (channels, downsampling factor, latent normalisation)


def vae_latent_space(vae_config: Mapping[str, Any]) -> LatentSpaceKey:
    """``(channels, downsampling factor, normalisation)`` of a diffusers VAE config (a ``vae/config.json``, or
    ``pipe.vae.config`` with ``_class_name`` added); the normalisation as
    :func:`ldm.latent_spaces.normalization_from_diffusers` reads it."""
    from ..latent_spaces import normalization_from_diffusers

    if "z_dim" in vae_config:  # AutoencoderKLQwenImage: z_dim, one 2x downsampling per temperal_downsample entry
        channels, factor = int(vae_config["z_dim"]), 2 ** len(vae_config["temperal_downsample"])
    else:
        channels, factor = int(vae_config["latent_channels"]), 2 ** (len(vae_config["block_out_channels"]) - 1)
    return channels, factor, normalization_from_diffusers(vae_config)


def decoder_latent_space(decoder: Any) -> LatentSpaceKey:
    """The same for our ``AutoencoderKL`` (its ``latent_norm``)."""
    return int(decoder.embed_dim), int(decoder.downsample_factor), decoder.latent_norm


def describe_latent_space(space: LatentSpaceKey) -> str:
    channels, f, norm = space
    return f"{channels} channels, {norm.describe()}, {f}x downsampling"


def check_decoder_fits(vae_config: Mapping[str, Any], decoder: Any, pipe_name: str = "the pipeline",
                       decoder_name: str = "the decoder") -> None:
    """Refuse a decoder whose latent space (channels, normalisation, downsampling) is not that of the pipeline's
    VAE (see :func:`vae_latent_space`); the message names both."""
    ours, theirs = decoder_latent_space(decoder), vae_latent_space(vae_config)
    if ours != theirs:
        raise PipelineError(f"{decoder_name} decodes another latent space than {pipe_name}'s VAE: "
                            f"{decoder_name}: {describe_latent_space(ours)}; {pipe_name}'s VAE: "
                            f"{describe_latent_space(theirs)}")


def vae_config_of(pipe: Any) -> Dict[str, Any]:
    """``pipe.vae.config`` as its ``config.json`` reads (with ``_class_name``)."""
    return {"_class_name": type(pipe.vae).__name__, **pipe.vae.config}


def output_size(pipe: Any, image: Any, height: Optional[int] = None, width: Optional[int] = None,
                **pipe_kwargs: Any) -> Tuple[int, int]:
    """The output ``(height, width)``. Pipelines that take a size: the given one, else the input image's, both
    rounded down to what the pipeline's image processor accepts (a multiple of 8, 16 for FLUX and Z-Image), passed
    to the pipeline explicitly so that the pipeline, the decoder's image and mask and FLUX's unpacking all use it
    (the pipelines' own default is a fixed square, e.g. 1024x1024, which would stretch the image). Pipelines that
    size their output by the image (Z-Image inpainting, FLUX.1 Kontext, FLUX.2): their own rule."""
    return _prepare_size(pipe, family_of(pipe), image, height, width, pipe_kwargs)[1:]


def _prepare_size(pipe: Any, family: Family, image: Any, height: Optional[int], width: Optional[int],
                  kwargs: Mapping[str, Any]) -> Tuple[Any, int, int]:
    if family.size is None:  # a list of images (as the pipelines take it) is sized by its first, as they do
        first = image[0] if isinstance(image, list) and image else image
        return (image, *pipe.image_processor.get_default_height_width(first, height, width))
    resized, own_height, own_width = family.size(pipe, image, kwargs)
    if (height is not None and height != own_height) or (width is not None and width != own_width):
        raise PipelineError(f"{type(pipe).__name__} sizes its output by the image ({own_width}x{own_height} here): "
                            f"height={height} / width={width} cannot be honoured; resize the image instead")
    return resized, own_height, own_width


def native_size(pipe: Any) -> int:
    """The pipeline's default output side in pixels (its ``height``/``width`` when none is given): 512 for SD 1.5,
    1024 for the others (Z-Image's pipelines have no sample size: 1024, the Z-Image ControlNet pipeline's
    default)."""
    sample_size = getattr(pipe, "default_sample_size", None)
    if sample_size is None and getattr(pipe, "unet", None) is not None:
        sample_size = pipe.unet.config.sample_size
    return 1024 if sample_size is None else int(sample_size) * int(pipe.vae_scale_factor)


def unpack_latents(pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Final latents as the pipeline returns them with ``output_type="latent"`` -> (B,C,h,w). Most return
    (B,C,h,w) already; FLUX-style pipelines return 2x2 patches packed into tokens (B, h*w/4, 4*C), restored by the
    pipeline's own ``_unpack_latents`` (private in diffusers: ``tests/integrations/test_pipelines.py`` fails if it
    changes);
    Qwen-Image's gives one frame (B, C, 1, h, w), taken as the image's latents."""
    if latents.ndim == 4:
        return latents
    unpack = getattr(type(pipe), "_unpack_latents", None)
    if latents.ndim != 3 or unpack is None:
        raise PipelineError(f"{type(pipe).__name__} returned latents of shape {tuple(latents.shape)}: expected "
                            "(B,C,h,w), or packed (B,tokens,channels) with the pipeline's _unpack_latents (FLUX)")
    latents = unpack(latents, height, width, pipe.vae_scale_factor)
    return latents[:, :, 0] if latents.ndim == 5 else latents


def decoder_condition(pipe: Any, image: Any, mask_image: Any, height: int, width: int
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The image (B,3,H,W) in [-1,1] and mask (B,1,H,W) in {0,1} (1 = generate) as the pipeline prepares them for
    itself: its ``image_processor`` and ``mask_processor`` at the output size (the image as the pipeline resized
    it, for the pipelines that size by the image); tensors as given on a ControlNet ``prepare_image`` path."""
    import torch

    family = family_of(pipe)
    prepared = []
    for key, value, processor in (("image", image, pipe.image_processor), ("mask", mask_image, pipe.mask_processor)):
        if key in family.as_control and isinstance(value, torch.Tensor):
            if tuple(value.shape[-2:]) != (height, width):
                raise PipelineError(f"{type(pipe).__name__} takes a {key} tensor as it is: its size "
                                    f"{tuple(value.shape[-2:])} must be the output size {(height, width)}")
            prepared.append(value)
        else:
            prepared.append(processor.preprocess(value, height=height, width=width))
    return prepared[0], prepared[1]


def inpaint(pipe: Any, decoder: Optional[Any], image: Any, mask_image: Any, *, height: Optional[int] = None,
            width: Optional[int] = None, output_type: str = "pil",
            decode: Optional[Callable[..., "torch.Tensor"]] = None, **pipe_kwargs: Any) -> Any:
    """Run ``pipe`` (one of :data:`PIPELINES`) and decode its final latents with ``decoder`` (our
    ``AutoencoderKL``, conditioned on the pipeline's image and mask); ``decoder=None`` lets the pipeline decode
    with its own VAE (for comparison, at the same size).

    ``image`` / ``mask_image`` go to the pipeline's arguments for them (``control_image`` / ``control_mask`` for
    SD 3 ControlNet inpainting), as one image each or lists (a batch), as the pipeline takes them. ``pipe_kwargs``
    go to the pipeline unchanged (``prompt``, ``num_inference_steps``, ``guidance_scale``, ``generator``,
    ``num_images_per_prompt``, ``strength``, ``control_image``, prompt embeddings, ...). Returns the pipeline's own
    output (e.g. ``StableDiffusionPipelineOutput``; ``.images`` for ``output_type`` "pil", "np" or "pt"), at
    :func:`output_size`. The decoder runs on its own device and dtype; the latents are moved there.
    ``decode(z, image, mask)`` replaces ``decoder.decode`` (float32, the exact path) where a faster path of the
    same decoder is wanted. Non-finite values are refused, naming where they are: ``image`` / ``mask_image``
    arrays or tensors (before the pipeline runs; a NaN pixel under the mask would still reach the pipeline's
    encoder, and the mask processor would silently binarise a NaN), the pipeline's final latents (e.g. a float16
    overflow), the decoded images.
    """
    import numpy as np
    import torch

    from ..image_io import check_finite
    from . import pair_batch

    name, entry = supported(pipe)
    family = FAMILIES[entry.family]
    for argument, why in _REFUSED_ARGUMENTS.items():
        if argument in pipe_kwargs:
            raise PipelineError(f"{argument} is not supported here: {why}")
    if output_type == "latent":
        raise PipelineError("output_type='latent': call the pipeline itself to get latents")
    missing = [argument for argument in family.requires if pipe_kwargs.get(argument) is None]
    if missing:
        raise PipelineError(f"{name} needs {', '.join(missing)} (pass {missing[0]}=... to inpaint)")
    for argument, value in ((family.image, image), (family.mask, mask_image)):
        for k, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, (torch.Tensor, np.ndarray)):  # PIL images are always finite
                check_finite(torch.as_tensor(item), argument if not isinstance(value, list) else f"{argument}[{k}]")
    resized, height, width = _prepare_size(pipe, family, image, height, width, pipe_kwargs)
    call = {family.image: image, family.mask: mask_image, **pipe_kwargs}
    if family.size is None:
        call.update(height=height, width=width)
    if decoder is None:
        return pipe(**call, output_type=output_type)
    check_decoder_fits(vae_config_of(pipe), decoder, pipe_name=name)
    cond_image, cond_mask = decoder_condition(pipe, resized, mask_image, height, width)
    output = pipe(**call, output_type="latent")
    check_finite(output.images, f"{name}'s final latents")
    latents = unpack_latents(pipe, output.images, height, width)
    weight = next(decoder.parameters())
    latents = latents.to(device=weight.device, dtype=weight.dtype)
    z = decoder.unscale_latents(latents) if family.normalised else latents
    cond_image = pair_batch(cond_image.to(device=weight.device, dtype=weight.dtype), z.shape[0], "image",
                            interleave="image" in family.as_control)
    cond_mask = pair_batch(cond_mask.to(device=weight.device, dtype=weight.dtype), z.shape[0], "mask",
                           interleave="mask" in family.as_control)
    with torch.no_grad():
        decoded = (decode or decoder.decode)(z, cond_image, cond_mask)
    check_finite(decoded, "the decoded images")
    images = pipe.image_processor.postprocess(decoded.float(), output_type=output_type)
    return dataclasses.replace(output, images=images)
