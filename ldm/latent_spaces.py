"""The latent spaces this project trains decoders for: channels, quant convs, latent normalisation, configs.

A latent space is configuration, not code: ``AutoencoderKL(architecture, embed_dim, use_quant_conv, scaling_factor,
shift_factor, latents_mean, latents_std, latent_batch_norm)``. The numbers below are those of the released models'
diffusers VAE configs (``vae/config.json``); BFL's FLUX.1 code carries the same scale and shift.

=========  ==============  ============  ========  ===========  ===========  ================
name       models          architecture  channels  quant convs  normalised   scale / shift
=========  ==============  ============  ========  ===========  ===========  ================
sd         SD 1.x / 2.x    kl            4         yes          scale_shift  0.18215 / 0
sdxl       SDXL            kl            4         yes          scale_shift  0.13025 / 0
sd3        SD 3 / 3.5      kl            16        no           scale_shift  1.5305 / 0.0609
flux       FLUX.1          kl            16        no           scale_shift  0.3611 / 0.1159
flux2      FLUX.2          kl            32        yes          batch_norm   (statistics)
qwenimage  Qwen-Image      qwenimage     16        yes          per_channel  (mean / std)
=========  ==============  ============  ========  ===========  ===========  ================

``architecture``: ``kl`` is SD's KL-f8 network (GroupNorm, 2-D convs); ``qwenimage`` is Qwen-Image's / Wan-2.1's
causal 3-D VAE run on one frame (RMS norm, upsamplers that halve the width;
:mod:`ldm.modules.diffusionmodules.qwenimage`).

How the diffusion model's latents are made from the VAE's is one object per latent space (its ``normalization``),
which every user reads (the model's :meth:`ldm.models.autoencoder.AutoencoderKL.scale_latents`, the pipelines, the
ComfyUI loader, the diffusers export, the configs' params):

* :class:`ScaleShift`: ``(z - shift) * scale``, one scalar pair;
* :class:`PerChannel`: ``(z - latents_mean) * scale / latents_std`` with one mean and std per latent channel, for
  4-D and 5-D latents: Qwen-Image (scale 1) and diffusers' SDXL pipelines on a VAE config with ``latents_mean`` /
  ``latents_std`` (Playground v2.5);
* :class:`PatchBatchNorm`: FLUX.2's. The latent is cut into 2x2 patches (:func:`patchify_latents`: (B, C, h, w) ->
  (B, 4C, h/2, w/2)), each of the 4C channels is normalised with the running mean and variance of the VAE's
  ``bn`` BatchNorm (``(x - running_mean) / sqrt(running_var + eps)``; statistics read from the checkpoint, never
  updated), and put back (:func:`unpatchify_latents`). The result keeps the VAE's layout (B, C, h, w); the FLUX.2
  pipelines' own latents are that result patchified (and packed into tokens).

Each has ``normalize`` / ``denormalize``, ``to_params`` (our config params) / ``to_diffusers`` (``config.json``
entries), :func:`normalization_from_params` / :func:`normalization_from_diffusers` back, and one equality rule
(same kind, numbers equal within a relative 1e-6).

SD 1.x and SDXL (and SD 3.x and FLUX.1) have the same tensor shapes: a file tells the family, not the model.

What a file's tensors are (which space, which variant) is read by :mod:`ldm.checkpoints.tensors`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch


# ---------------------------------------------------------------------------------------------- normalisation
def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _stats_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel values as a (1, C, 1, ...) tensor broadcasting over ``like`` (4-D or 5-D), its device and dtype."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(1, -1, *([1] * (like.ndim - 2)))


@dataclasses.dataclass(frozen=True, eq=False)
class ScaleShift:
    """``(z - shift) * scale``: SD 1.x / 2.x, SDXL, SD 3.x, FLUX.1 (diffusers' ``scaling_factor`` /
    ``shift_factor``)."""

    scale: float
    shift: float = 0.0
    kind = "scale_shift"

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scale}")

    def normalize(self, z: torch.Tensor, bn: Any = None) -> torch.Tensor:
        return (z - self.shift) * self.scale

    def denormalize(self, latents: torch.Tensor, bn: Any = None) -> torch.Tensor:
        return latents / self.scale + self.shift

    def to_params(self) -> Dict[str, Any]:
        return {"scaling_factor": self.scale, "shift_factor": self.shift}

    def to_diffusers(self) -> Dict[str, Any]:
        return {"scaling_factor": self.scale, **({"shift_factor": self.shift} if self.shift else {})}

    def describe(self) -> str:
        return f"scaling_factor {self.scale:g}, shift_factor {self.shift:g}"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ScaleShift) and _close(self.scale, other.scale)
                and _close(self.shift, other.shift))

    __hash__ = None


@dataclasses.dataclass(frozen=True, eq=False)
class PerChannel:
    """``(z - mean) * scale / std`` with one mean and std per latent channel, for (B, C, h, w) and (B, C, T, h, w)
    latents: Qwen-Image / Wan-2.1 (scale 1; its pipelines multiply by ``1 / latents_std``), and diffusers' SDXL
    pipelines on a VAE config with ``latents_mean`` / ``latents_std`` (Playground v2.5, with its
    ``scaling_factor``)."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    scale: float = 1.0
    kind = "per_channel"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std):
            raise ValueError(f"latents_mean / latents_std need one value per latent channel each, got "
                             f"{len(self.mean)} / {len(self.std)}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"latents_std must be > 0, got {list(self.std)}")
        if not self.scale > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scale}")

    @property
    def shift(self) -> float:
        return 0.0

    def normalize(self, z: torch.Tensor, bn: Any = None) -> torch.Tensor:
        return (z - _stats_view(self.mean, z)) * self.scale / _stats_view(self.std, z)

    def denormalize(self, latents: torch.Tensor, bn: Any = None) -> torch.Tensor:
        return latents * _stats_view(self.std, latents) / self.scale + _stats_view(self.mean, latents)

    def to_params(self) -> Dict[str, Any]:
        return {"scaling_factor": self.scale, "latents_mean": list(self.mean), "latents_std": list(self.std)}

    def to_diffusers(self) -> Dict[str, Any]:
        return {"latents_mean": list(self.mean), "latents_std": list(self.std),
                **({"scaling_factor": self.scale} if self.scale != 1 else {})}

    def describe(self) -> str:
        return f"scaling_factor {self.scale:g}, per-channel latents_mean / latents_std"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PerChannel) and len(self.mean) == len(other.mean) and _close(self.scale, other.scale)
                and all(_close(a, b) for a, b in zip(self.mean + self.std, other.mean + other.std)))

    __hash__ = None


@dataclasses.dataclass(frozen=True, eq=False)
class PatchBatchNorm:
    """FLUX.2's: the latent cut into ``patch_size`` x ``patch_size`` patches (:func:`patchify_latents`), each of
    the patchified channels normalised with the running statistics of the VAE's ``bn`` BatchNorm, ``(x - mean) /
    sqrt(var + eps)``, and put back. The statistics come with the checkpoint (``bn`` is passed in); ``eps`` is the
    pipeline's (diffusers' FLUX.2 pipelines read the config's ``batch_norm_eps``, 1e-4; Ernie-Image hard-codes
    1e-5)."""

    eps: float = 1e-4
    patch_size: int = 2
    kind = "batch_norm"
    scale = 1.0
    shift = 0.0

    def __post_init__(self):
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "patch_size", int(self.patch_size))
        if self.patch_size < 1 or not self.eps >= 0:
            raise ValueError(f"latent_batch_norm: patch_size must be >= 1 and batch_norm_eps >= 0, got "
                             f"{self.patch_size} / {self.eps}")

    def _stats(self, bn: Any, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of ``bn``'s running statistics as (1, C, 1, 1), std computed in the statistics' dtype and
        then cast to ``like``'s, as diffusers' FLUX.2 pipelines do."""
        if bn is None:
            raise ValueError("FLUX.2's latent normalisation needs the VAE's BatchNorm statistics (bn)")
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def normalize(self, z: torch.Tensor, bn: Any = None) -> torch.Tensor:
        x = patchify_latents(z, self.patch_size)
        mean, std = self._stats(bn, x)
        return unpatchify_latents((x - mean) / std, self.patch_size)

    def denormalize(self, latents: torch.Tensor, bn: Any = None) -> torch.Tensor:
        x = patchify_latents(latents, self.patch_size)
        mean, std = self._stats(bn, x)
        return unpatchify_latents(x * std + mean, self.patch_size)

    def to_params(self) -> Dict[str, Any]:
        return {"latent_batch_norm": {"patch_size": self.patch_size, "batch_norm_eps": self.eps}}

    def to_diffusers(self) -> Dict[str, Any]:
        return {"batch_norm_eps": self.eps, "patch_size": [self.patch_size, self.patch_size]}

    def describe(self) -> str:
        return f"BatchNorm statistics over {self.patch_size}x{self.patch_size} patches, eps {self.eps:g} (FLUX.2)"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PatchBatchNorm) and self.patch_size == other.patch_size
                and _close(self.eps, other.eps))

    __hash__ = None


Normalization = Union[ScaleShift, PerChannel, PatchBatchNorm]
NORMALIZATIONS = (ScaleShift.kind, PerChannel.kind, PatchBatchNorm.kind)
FLUX2_BATCH_NORM = PatchBatchNorm(eps=1e-4, patch_size=2)  # AutoencoderKLFlux2's defaults (diffusers 0.42.1)


def normalization_from_params(params: Mapping[str, Any]) -> Normalization:
    """Our ``AutoencoderKL`` params (``scaling_factor``, ``shift_factor``, ``latents_mean`` / ``latents_std``,
    ``latent_batch_norm``; absent = SD 1.x's scale) -> the one normalisation they describe; contradictory
    params are refused."""
    scale, shift = params.get("scaling_factor"), params.get("shift_factor")
    mean, std, bn = params.get("latents_mean"), params.get("latents_std"), params.get("latent_batch_norm")
    if (mean is None) != (std is None):
        raise ValueError("latents_mean and latents_std come together (per-channel normalisation) or not at all")
    if bn is not None:
        if mean is not None:
            raise ValueError("latent_batch_norm and latents_mean / latents_std are two normalisations: set one")
        if scale not in (None, 1) or shift not in (None, 0):
            raise ValueError(f"latent_batch_norm normalises with its statistics alone (FLUX.2 has no scale or "
                             f"shift): scaling_factor must be 1 and shift_factor 0, got {scale} / {shift}")
        options = dict(bn)
        unknown = sorted(set(options) - {"patch_size", "batch_norm_eps"})
        if unknown:
            raise ValueError(f"latent_batch_norm: unknown entries {unknown} (it takes patch_size, batch_norm_eps)")
        return PatchBatchNorm(eps=options.get("batch_norm_eps", FLUX2_BATCH_NORM.eps),
                              patch_size=options.get("patch_size", FLUX2_BATCH_NORM.patch_size))
    if mean is not None:
        if shift not in (None, 0):
            raise ValueError(f"per-channel normalisation (latents_mean) has no shift_factor, got {shift}")
        return PerChannel(mean, std, 1.0 if scale is None else float(scale))
    return ScaleShift(float(0.18215 if scale is None else scale), float(0.0 if shift is None else shift))


def normalization_from_diffusers(config: Mapping[str, Any]) -> Normalization:
    """A diffusers VAE config (a saved ``config.json`` or a model's ``vae.config``, which has no ``_class_name``)
    -> its latent normalisation: FLUX.2's is told by ``batch_norm_eps``, per-channel by ``latents_mean``
    (its ``scaling_factor``, 1 where absent as in ``AutoencoderKLQwenImage``), else ``scaling_factor`` (diffusers'
    default 0.18215) and ``shift_factor``."""
    if config.get("_class_name") == "AutoencoderKLFlux2" or "batch_norm_eps" in config:
        patch = config.get("patch_size") or [FLUX2_BATCH_NORM.patch_size] * 2
        return PatchBatchNorm(eps=config.get("batch_norm_eps", FLUX2_BATCH_NORM.eps), patch_size=int(patch[0]))
    if config.get("latents_mean") is not None:
        return PerChannel(config["latents_mean"], config["latents_std"], float(config.get("scaling_factor") or 1.0))
    return ScaleShift(float(config.get("scaling_factor", 0.18215)), float(config.get("shift_factor") or 0.0))


# diffusers' AutoencoderKLQwenImage defaults (diffusers 0.42.1) = Qwen-Image's vae/config.json
QWENIMAGE_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                          0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWENIMAGE_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                         1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
ARCHITECTURES = ("kl", "qwenimage")


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    name: str
    models: str
    channels: int
    quant_conv: bool
    normalization: Normalization
    config_dir: str
    fp16_safe: bool = True  # SDXL's VAE overflows in float16 (diffusers' force_upcast): float32 or bfloat16 there
    architecture: str = "kl"  # one of ARCHITECTURES

    @property
    def scaling_factor(self) -> float:
        return self.normalization.scale

    @property
    def shift_factor(self) -> float:
        return self.normalization.shift


LATENT_SPACES: Dict[str, LatentSpace] = {s.name: s for s in (
    LatentSpace("sd", "SD 1.x / 2.x", 4, True, ScaleShift(0.18215, 0.0), "configs/autoencoder/"),
    LatentSpace("sdxl", "SDXL", 4, True, ScaleShift(0.13025, 0.0), "configs/autoencoder/sdxl/", fp16_safe=False),
    LatentSpace("sd3", "SD 3.x", 16, False, ScaleShift(1.5305, 0.0609), "configs/autoencoder/sd3/"),
    LatentSpace("flux", "FLUX.1", 16, False, ScaleShift(0.3611, 0.1159), "configs/autoencoder/flux/"),
    # diffusers' AutoencoderKLFlux2 (and BFL's FLUX.2 AutoEncoder) has quant convs and no scale or shift: its
    # pipelines normalise with the BatchNorm statistics over 2x2 patches
    LatentSpace("flux2", "FLUX.2", 32, True, FLUX2_BATCH_NORM, "configs/autoencoder/flux2/"),
    # diffusers' AutoencoderKLQwenImage (Wan-2.1's VAE): its quant convs are 1x1x1 causal convs
    LatentSpace("qwenimage", "Qwen-Image", 16, True, PerChannel(QWENIMAGE_LATENTS_MEAN, QWENIMAGE_LATENTS_STD),
                "configs/autoencoder/qwenimage/", architecture="qwenimage"),
)}
SD = LATENT_SPACES["sd"]


def latent_space_of(model: object) -> Optional[LatentSpace]:
    """The known latent space of an ``AutoencoderKL`` (by architecture, channels, quant convs and normalisation),
    if any."""
    key = (getattr(model, "architecture", "kl"), getattr(model, "embed_dim", None),
           getattr(model, "use_quant_conv", None))
    norm = getattr(model, "latent_norm", None)
    return next((s for s in LATENT_SPACES.values()
                 if (s.architecture, s.channels, s.quant_conv) == key and s.normalization == norm), None)


def matching_spaces(channels: int, quant_conv: bool, architecture: str = "kl") -> List[LatentSpace]:
    return [s for s in LATENT_SPACES.values()
            if (s.channels, s.quant_conv, s.architecture) == (channels, quant_conv, architecture)]


def describe_latent_layout(channels: int, quant_conv: bool, architecture: str = "kl") -> str:
    """'16 latent channels without quant convs (SD 3.x or FLUX.1: configs/autoencoder/sd3/ or ...)'."""
    what = f"{channels} latent channels {'with' if quant_conv else 'without'} quant convs"
    spaces = matching_spaces(channels, quant_conv, architecture)
    if not spaces:
        return f"{what}, which is none of the known latent spaces ({', '.join(LATENT_SPACES)})"
    return (f"{what}, the layout of {' or '.join(s.models for s in spaces)} "
            f"({' or '.join(s.config_dir for s in spaces)})")


# ---------------------------------------------------------------------------------------------- patches
def patchify_latents(z: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """(B, C, h, w) -> (B, C*p*p, h/p, w/p): channel ``c*p*p + i*p + j`` holds pixel ``(i, j)`` of each p x p patch
    of channel ``c`` (BFL's FLUX.2 ``rearrange("c (h i) (w j) -> (c i j) h w")``, diffusers'
    ``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = z.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latents {tuple(z.shape)}: height and width must be multiples of the patch size {p}")
    return z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify_latents(x: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify_latents`: (B, C*p*p, h/p, w/p) -> (B, C, h, w)."""
    b, cpp, h, w = x.shape
    p = patch_size
    if cpp % (p * p):
        raise ValueError(f"patchified latents {tuple(x.shape)}: channels must be a multiple of {p * p}")
    return x.reshape(b, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, cpp // (p * p), h * p, w * p)

