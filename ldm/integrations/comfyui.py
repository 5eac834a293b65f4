"""Our decoder in ComfyUI, the part that needs no ComfyUI: its tensor conventions, the first-stage model its
``VAE`` wraps, and decoding with the image and mask. The node package (``comfyui_nodes/``) is a thin layer on top.

ComfyUI's conventions (its ``nodes.py`` and ``comfy/sd.py``, v0.3.64):

* ``IMAGE``: (B, H, W, C) float in [0, 1]; ours (B, C, H, W) in [-1, 1].
* ``MASK``: (B, H, W) or (H, W), 1 = inpaint, the same meaning as ours (B, 1, H, W), 1 = generate.
* ``LATENT``: ``{"samples": (B, C, h, w)}`` of the VAE's raw latents (the diffusion model applies the latent
  scale / shift itself), which is what :meth:`AutoencoderKL.decode` takes.
* The VAE's ``first_stage_model.encode(x)`` takes images in [-1, 1] and returns raw latents (the posterior's mode);
  ``decode(z, **vae_options)`` returns images in [-1, 1].

The rule for a prior of another size (ComfyUI's ``InpaintModelConditioning`` / ``VAEEncodeForInpaint``): the mask
is resized bilinearly to the image; an image whose sides are not multiples of the downscale factor was encoded
centre-cropped to them (``VAE.vae_encode_crop_pixels``), so image and mask get that crop; a prior that still differs
from the latent's size is resized bilinearly to it. The mask is then rounded, as those nodes round it for the pixels
they mask. Batches pair as ComfyUI repeats a noise mask (``comfy.utils.repeat_to_batch_size``): a prior of batch 1
serves every latent, one whose batch divides the latent batch repeats in order; any other batch is an error.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path, PurePosixPath
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.files import CONFIG_NAME
from ..image_io import check_finite
from ..latent_spaces import latent_space_of, matching_spaces
from ..models.autoencoder import AutoencoderKL
from ..util import PathLike
from . import pair_batch

log = logging.getLogger(__name__)

# ComfyUI's estimate for SD's VAE (comfy/sd.py): bytes per latent pixel / per image pixel, times the dtype's size.
# Ours scales the decoder's by its width over SD's (128) and by 1.5 for the condition branch's features.
COMFY_DECODE_BYTES_PER_LATENT_PIXEL = 2178 * 64
COMFY_ENCODE_BYTES_PER_IMAGE_PIXEL = 1767


def image_to_ours(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``IMAGE`` (B, H, W, C) in [0, 1] -> (B, C, H, W) in [-1, 1] (an alpha channel is dropped)."""
    if image.ndim != 4:
        raise ValueError(f"pixels must be an IMAGE (batch, height, width, channels), got shape {tuple(image.shape)}")
    return image[..., :3].movedim(-1, 1) * 2.0 - 1.0


def image_to_comfy(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> ComfyUI ``IMAGE`` (B, H, W, C) in [0, 1], clamped (ComfyUI's process_output)."""
    return torch.clamp((image + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1)


def mask_to_ours(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``MASK`` (B, H, W) or (H, W), 1 = inpaint -> (B, 1, H, W), 1 = generate."""
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be a MASK (batch, height, width), got shape {tuple(mask.shape)}")
    return mask.reshape(-1, 1, *mask.shape[-2:])


def fit_prior(image: torch.Tensor, mask: torch.Tensor, size: Tuple[int, int], factor: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image (B, C, H, W) and mask (B, 1, h, w) -> both of ``size`` (the latent's size times ``factor``), by the
    rule in the module docstring, with a log line saying what was done; the mask is rounded to 0 / 1."""
    height, width = image.shape[-2:]
    if tuple(mask.shape[-2:]) != (height, width):
        log.info("mask %s resized (bilinear) to the image's %s, as InpaintModelConditioning does",
                 tuple(mask.shape[-2:]), (height, width))
        mask = F.interpolate(mask.float(), size=(height, width), mode="bilinear")
    cropped = ((height // factor) * factor, (width // factor) * factor)
    if cropped != (height, width) and cropped == tuple(size):
        top, left = (height % factor) // 2, (width % factor) // 2
        log.info("image and mask %s centre-cropped to %s, the crop VAEEncode encoded", (height, width), cropped)
        image = image[..., top:top + cropped[0], left:left + cropped[1]]
        mask = mask[..., top:top + cropped[0], left:left + cropped[1]]
    if tuple(image.shape[-2:]) != tuple(size):
        log.info("image and mask %s resized (bilinear) to %s, the size the latent decodes to",
                 tuple(image.shape[-2:]), tuple(size))
        image = F.interpolate(image, size=size, mode="bilinear")
        mask = F.interpolate(mask, size=size, mode="bilinear")
    return image, mask.round().clamp(0, 1)


def describe_latent_channels(channels: int) -> str:
    """'16 channels (SD 3.x or FLUX.1)' for an error message: ComfyUI's latents carry no quant-conv flag."""
    spaces = [s.models for quant in (True, False) for s in matching_spaces(channels, quant)]
    return f"{channels} channels ({' or '.join(spaces) or 'no known latent space'})"


def one_frame(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Qwen-Image / Wan latents (B, C, 1, h, w) -> (B, C, h, w); other shapes unchanged (a video latent,
    T > 1, is refused by :func:`check_latent`)."""
    return samples[:, :, 0] if samples.ndim == 5 and samples.shape[2] == 1 else samples


def check_latent(samples: torch.Tensor, model: AutoencoderKL) -> None:
    """Refuse latents this decoder cannot read: not (B, C, h, w), or another latent space (naming both)."""
    if samples.ndim != 4:
        raise ValueError(f"samples must be an image latent (batch, channels, height, width), got shape "
                         f"{tuple(samples.shape)} (video latents are not supported)")
    if samples.shape[1] != model.embed_dim:
        space = latent_space_of(model)
        mine = f"{space.models}'s" if space is not None else f"a {model.embed_dim}-channel"
        raise ValueError(f"the latent has {describe_latent_channels(samples.shape[1])}, but this decoder reads "
                         f"{mine} latent space ({model.embed_dim} channels): use the decoder of the model that "
                         "made the latent")


class ComfyFirstStage(nn.Module):
    """``AutoencoderKL`` with the interface ComfyUI's ``VAE`` calls on its ``first_stage_model``: ``encode(x)``
    -> raw latents (the posterior's mode, as ComfyUI's own KL VAE), ``decode(z, image=None, mask=None)`` -> images,
    both in [-1, 1], (B, C, H, W). ``image`` and ``mask`` (our convention) reach the decoder's condition branch."""

    def __init__(self, model: AutoencoderKL):
        super().__init__()
        self.model = model

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), or one frame (B, 3, 1, H, W) as ComfyUI hands a Qwen-Image VAE its images (latents then
        (B, C, 1, h, w), as its Wan VAE gives)."""
        if x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(f"images {tuple(x.shape)}: {x.shape[2]} frames; this VAE encodes one image per "
                                 "frame (video is not supported)")
            return self.model.encode(x[:, :, 0]).mode()[:, :, None]
        return self.model.encode(x).mode()

    def decode(self, z: torch.Tensor, image: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latents (B, C, h, w), or one frame (B, C, 1, h, w) -> images of the same layout."""
        if z.ndim == 5:
            check_latent(one_frame(z), self.model)
            return self.model.decode(z[:, :, 0], image, mask)[:, :, None]
        return self.model.decode(z, image, mask)

    def memory_used_decode(self, shape: Tuple[int, ...], dtype_size: int) -> int:
        """Bytes a decode of latents of ``shape`` needs (ComfyUI's estimate for SD scaled by width, see above)."""
        width = self.model.decoder_config["ch"] * self.model.decoder_config["ch_mult"][0]
        branch = 1.5 if self.model.decoder.has_condition else 1.0
        return int(COMFY_DECODE_BYTES_PER_LATENT_PIXEL * shape[-2] * shape[-1] * dtype_size * width / 128 * branch)

    def memory_used_encode(self, shape: Tuple[int, ...], dtype_size: int) -> int:
        """Bytes an encode of images of ``shape`` (B, C, H, W) needs (the encoder is SD's / FLUX.1's)."""
        return int(COMFY_ENCODE_BYTES_PER_IMAGE_PIXEL * shape[-2] * shape[-1] * dtype_size)


def prepare_prior(samples: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor, model: AutoencoderKL
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``samples`` (B, C, h, w), ``pixels`` (IMAGE) and ``mask`` (MASK) -> our image (b, 3, H, W) in [-1, 1]
    and mask (b, 1, H, W), 1 = generate, b = 1 or B, sized for the decoder; every error names the input. NaN / inf
    anywhere is refused, under the mask too: ``(1 - mask) * image`` keeps a NaN (0 * NaN), and one NaN spreads
    through the decoder's convolutions and norms to the whole image."""
    samples = one_frame(samples)
    check_latent(samples, model)
    for name, t in (("samples", samples), ("pixels", pixels), ("mask", mask)):
        check_finite(t, name)
    f = model.downsample_factor
    size = (samples.shape[-2] * f, samples.shape[-1] * f)
    batch = samples.shape[0]
    image = pair_batch(image_to_ours(pixels.float()), batch, "pixels")
    ours = pair_batch(mask_to_ours(mask.float()), batch, "mask")
    return fit_prior(image, ours, size, f)


def decode_with_prior(model: AutoencoderKL, samples: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor,
                      tile_size: Optional[int] = None, overlap: int = 64,
                      batch_size: Optional[int] = None) -> torch.Tensor:
    """What ``AsymmetricVAEDecode`` computes, in ComfyUI's conventions and without ComfyUI: raw latents, IMAGE and
    MASK -> IMAGE (B, H, W, 3) in [0, 1], on the CPU. ``tile_size`` / ``overlap`` (image pixels): decode in tiles
    (:meth:`AutoencoderKL.enable_tiling`, which crops the prior with each tile); ``batch_size``: latents decoded
    at a time (default: all)."""
    samples = one_frame(samples)
    image, ours = prepare_prior(samples, pixels, mask, model)
    weight = model.decoder.conv_in.weight
    batch = samples.shape[0]
    step = batch_size or batch
    image, ours = image.expand(batch, -1, -1, -1), ours.expand(batch, -1, -1, -1)
    out = []
    with tiled(model, tile_size, overlap), torch.no_grad():
        for i in range(0, batch, step):
            part = [t[i:i + step].to(weight.device, weight.dtype) for t in (samples, image, ours)]
            out.append(image_to_comfy(model.decode(*part).float()).cpu())
    return torch.cat(out)


@contextlib.contextmanager
def tiled(model: AutoencoderKL, tile_size: Optional[int], overlap: int) -> Iterator[None]:
    """Inside, ``model`` decodes in tiles of ``tile_size`` image pixels (rounded down to the downscale factor;
    ``None``: as it was); afterwards as before."""
    before = model.tiling
    if tile_size is not None:
        f = model.downsample_factor
        tile = max(f, tile_size // f * f)
        model.enable_tiling(tile, min(overlap // f * f, tile - f))
    try:
        yield
    finally:
        if before is None:
            model.disable_tiling()
        else:
            model.enable_tiling(*before)


# ---------------------------------------------------------------------- files in ComfyUI's models/vae folders
def vae_choices(filenames: Sequence[str], bases: Sequence[PathLike]) -> List[str]:
    """What the loader lists: ComfyUI's file names of the ``vae`` folders (``folder_paths.get_filename_list``),
    where the weights of a diffusers folder (``config.json`` beside them) are replaced by the folder's name."""
    choices = []
    for name in filenames:
        parent = PurePosixPath(name.replace("\\", "/")).parent
        in_folder = parent != PurePosixPath(".") and any(Path(b, parent, CONFIG_NAME).is_file() for b in bases)
        choice = f"{parent}/" if in_folder else name
        if choice not in choices:
            choices.append(choice)
    return choices


def resolve_choice(name: str, bases: Sequence[PathLike]) -> Path:
    """The path of a :func:`vae_choices` entry under one of ``bases``; a ``FileNotFoundError`` naming the folders."""
    for base in bases:
        path = Path(base, name)
        if path.is_file() or (name.endswith("/") and path.is_dir()):
            return path
    raise FileNotFoundError(f"vae_name {name!r}: not found in ComfyUI's vae folders ({', '.join(map(str, bases))}); "
                            "put the decoder's .ckpt / .safetensors or diffusers folder there")
