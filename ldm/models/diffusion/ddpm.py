"""Stable Diffusion v1 as the original ``LatentDiffusion`` lays it out: what inference needs, with the original names.

The attribute tree is the checkpoint format of ``sd-v1-5*.ckpt``:

* ``model.diffusion_model.*``: the UNet inside :class:`DiffusionWrapper`;
* ``first_stage_model.*``: the SD VAE (:class:`ldm.models.autoencoder.AutoencoderKL`, no condition branch);
* ``cond_stage_model.*``: the text encoder (``FrozenCLIPEmbedder`` for v1);
* ``betas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``, ... : the diffusion schedule buffers;
* ``model_ema.*``: EMA weights, only built with ``use_ema: true``.

Training (losses, logging, optimizers) is not part of this reimplementation: the paper keeps the diffusion model
frozen. Checkpoints load through :mod:`ldm.checkpoints.keys` (:meth:`LatentDiffusion.init_from_ckpt`).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoints.files import CheckpointError, PathLike
from ...checkpoints.keys import load_into, read_state_dict
from ...modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ...modules.distributions.distributions import DiagonalGaussianDistribution
from ...modules.ema import LitEma
from ...util import default, instantiate_from_config

log = logging.getLogger(__name__)

Conditioning = Union[torch.Tensor, List[torch.Tensor], Dict[str, List[torch.Tensor]]]

# Constructor arguments of the original DDPM/LatentDiffusion that only matter for training. They are accepted so that
# the original configs load, and ignored.
_TRAINING_ONLY_ARGS = frozenset({
    "loss_type", "l_simple_weight", "original_elbo_weight", "learn_logvar", "logvar_init", "clip_denoised",
    "load_only_unet", "use_positional_encodings", "scheduler_config", "finetune_keys", "monitor",
})

_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` and routes the conditioning into it.

    ``conditioning_key``: ``None`` (unconditional), ``"concat"`` (channels appended to x), ``"crossattn"`` (context
    for cross-attention), ``"hybrid"`` (both: the inpainting model), ``"adm"`` (class vector ``y``).
    """

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: Optional[str]):
        super().__init__()
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm"):
            raise ValueError(f"conditioning_key must be one of None, concat, crossattn, hybrid, adm; "
                             f"got {conditioning_key!r}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[List[torch.Tensor]] = None,
                c_crossattn: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        key = self.conditioning_key
        if key in ("concat", "hybrid"):
            if not c_concat:
                raise ValueError(f"conditioning_key {key!r} needs c_concat (a list of tensors)")
            x = torch.cat([x, *c_concat], dim=1)
        if key in ("crossattn", "hybrid"):
            if not c_crossattn:
                raise ValueError(f"conditioning_key {key!r} needs c_crossattn (a list of tensors)")
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0])
        return self.diffusion_model(x, t)


class LatentDiffusion(nn.Module):
    """Latent diffusion model (inference subset), constructed from the original SD v1 config arguments.

    Shapes: latents (B, channels, image_size, image_size) for SD v1 = (B, 4, 64, 64) at 512x512; images in [-1, 1].

    Args (original names): ``unet_config``, ``first_stage_config``, ``cond_stage_config`` (``target``/``params``);
    ``conditioning_key``; ``timesteps``, ``beta_schedule``, ``linear_start``, ``linear_end``, ``cosine_s``,
    ``given_betas``, ``v_posterior`` (the diffusion schedule); ``scale_factor`` (latent scaling, 0.18215 for SD;
    ``scale_by_std`` stores it as a buffer as the original does; it becomes the first stage's ``scaling_factor``,
    whose ``scale_latents`` / ``unscale_latents`` convert between VAE and diffusion latents); ``use_ema``;
    ``parameterization`` ("eps");
    ``first_stage_key``, ``cond_stage_key``, ``image_size``, ``channels``, ``log_every_t``, ``num_timesteps_cond``,
    ``cond_stage_trainable``, ``concat_mode``, ``cond_stage_forward``; ``ckpt_path``/``ignore_keys`` (weights to
    load after building). Training-only arguments (``monitor``, ``scheduler_config``, ``loss_type`` ...) are
    accepted and ignored.
    """

    def __init__(self, first_stage_config: Mapping[str, Any], cond_stage_config: Union[str, Mapping[str, Any]],
                 unet_config: Mapping[str, Any], num_timesteps_cond: Optional[int] = None,
                 cond_stage_key: str = "image", cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: Optional[str] = None, conditioning_key: Optional[str] = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False, timesteps: int = 1000,
                 beta_schedule: str = "linear", linear_start: float = 1e-4, linear_end: float = 2e-2,
                 cosine_s: float = 8e-3, given_betas: Optional[Sequence[float]] = None, v_posterior: float = 0.0,
                 parameterization: str = "eps", use_ema: bool = True, first_stage_key: str = "image",
                 image_size: int = 256, channels: int = 3, log_every_t: int = 100,
                 ckpt_path: Optional[PathLike] = None, ignore_keys: Sequence[str] = (), **training_only: Any):
        super().__init__()
        unknown = set(training_only) - _TRAINING_ONLY_ARGS
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(unknown)}")
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization must be 'eps' or 'x0', got {parameterization!r}")
        self.parameterization = parameterization
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        if self.num_timesteps_cond > timesteps:
            raise ValueError(f"num_timesteps_cond ({self.num_timesteps_cond}) must be <= timesteps ({timesteps})")
        if conditioning_key is None:  # the original's backwards-compatible default
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_forward = cond_stage_forward
        self.concat_mode = concat_mode
        self.image_size = image_size
        self.channels = channels
        self.log_every_t = log_every_t
        self.v_posterior = v_posterior

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.scale_by_std = scale_by_std
        if scale_by_std:  # then the checkpoint stores the factor
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor

        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config))
        self._set_first_stage_scaling()
        if cond_stage_config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif cond_stage_config == "__is_unconditional__":
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(cond_stage_config)
            self.cond_stage_model = model if cond_stage_trainable else self._frozen(model)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def _set_first_stage_scaling(self) -> None:
        """The diffusion config's ``scale_factor`` is the latent space the UNet was trained in: the first stage
        scales and unscales with it."""
        scale = float(self.scale_factor)
        if scale != self.first_stage_model.scaling_factor:
            log.info("first stage scaling_factor %s -> %s (the diffusion model's scale_factor)",
                     self.first_stage_model.scaling_factor, scale)
            self.first_stage_model.scaling_factor = scale

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        model.eval()
        model.requires_grad_(False)
        return model

    def register_schedule(self, given_betas: Optional[Sequence[float]] = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3) -> None:
        """Register the diffusion schedule buffers under the original names (they are in the checkpoints)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                       cosine_s=cosine_s)
            betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end

        # posterior q(x_{t-1} | x_t, x_0)
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # clipped because the posterior variance is 0 at the start of the chain
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    # ------------------------------------------------------------------ plumbing
    @property
    def device(self) -> torch.device:
        return self.betas.device

    @contextmanager
    def ema_scope(self, context: Optional[str] = None) -> Iterator[None]:
        """Run the block with the EMA weights in ``model`` (a no-op without ``use_ema``)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                log.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    log.info("%s: restored training weights", context)

    def known_unused_keys(self) -> Dict[str, str]:
        """Checkpoint key prefixes dropped on load, with the reason logged (see ``ldm.checkpoints.keys.load_into``)."""
        unused: Dict[str, str] = {}
        if not self.use_ema:
            unused["model_ema."] = ("EMA bookkeeping of the training run (decay, num_updates; shadow weights if "
                                    "any); this config has use_ema: false")
        own = self.state_dict()
        if _POSITION_IDS not in own:
            unused[_POSITION_IDS] = "constant CLIP position ids, a non-persistent buffer in current transformers"
        sub = getattr(self.first_stage_model, "known_unused_keys", None)
        if callable(sub):
            unused.update({f"first_stage_model.{k}": v for k, v in sub().items()})
        return unused

    def init_from_ckpt(self, path: PathLike, ignore_keys: Sequence[str] = ()) -> None:
        """Load a full SD checkpoint (``.ckpt`` or ``.safetensors``) strictly, apart from :meth:`known_unused_keys`.
        A diffusers pipeline folder is refused in one line: only the decoder is read from diffusers folders."""
        if Path(path).is_dir():
            raise CheckpointError(
                f"{path}: a folder; the SD model is read from one .ckpt or .safetensors file (e.g. "
                "sd-v1-5-inpainting.ckpt or v1-5-pruned-emaonly.safetensors), not from a diffusers folder (a diffusers "
                "pipeline folder runs with scripts/inpaint_diffusers.py --pipeline)")
        state_dict = read_state_dict(path)
        hint = None
        if self.use_ema and not any(k.startswith("model_ema.") and k.count(".") == 1 and
                                    k not in ("model_ema.decay", "model_ema.num_updates") for k in state_dict):
            hint = ("the checkpoint holds no EMA shadow weights: set use_ema: false in the config (the released "
                    "SD v1.5 files keep a single set of weights)")
        load_into(self, state_dict, source=path, ignore_keys=ignore_keys, known_unused=self.known_unused_keys(),
                  hint=hint, assign=True)
        if self.scale_by_std:  # the buffer came from the checkpoint
            self._set_first_stage_scaling()
        log.info("restored %s from %s", type(self).__name__, path)

    # ------------------------------------------------------------------ diffusion
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise clean latents to timestep ``t``: sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Optional[Conditioning],
                    return_ids: bool = False) -> torch.Tensor:
        """Noise prediction for latents ``x_noisy`` (B,C,h,w) at integer timesteps ``t`` (B,).

        ``cond``: the hybrid dict ``{"c_concat": [...], "c_crossattn": [...]}``, or a tensor / list of tensors that
        goes to ``c_concat`` or ``c_crossattn`` according to ``conditioning_key``.
        """
        if not isinstance(cond, Mapping):
            if cond is None:
                cond = {}
            else:
                key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
                cond = {key: cond if isinstance(cond, list) else [cond]}
        out = self.model(x_noisy, t, **cond)
        if isinstance(out, tuple) and not return_ids:
            return out[0]
        return out

    # ------------------------------------------------------------------ stages
    def get_learned_conditioning(self, c: Any) -> torch.Tensor:
        """Text (list of B strings for SD) -> conditioning (B, 77, context_dim)."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        encode = getattr(self.cond_stage_model, "encode", None)
        if callable(encode):
            c = encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    @torch.no_grad()
    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = "") -> torch.Tensor:
        """The conditioning of ``null_label`` (the empty prompt) repeated ``batch_size`` times."""
        c = self.get_learned_conditioning([null_label] if isinstance(null_label, str) else null_label)
        return c.expand(batch_size, *c.shape[1:]).to(self.device)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B,3,H,W) in [-1,1] -> the first stage's posterior over unscaled latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Union[DiagonalGaussianDistribution, torch.Tensor],
                                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Posterior (or latents) -> diffusion latents: a sample, scaled by the first stage's ``scale_latents``
        (for SD: times ``scale_factor``, as the original)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is not supported")
        return self.first_stage_model.scale_latents(z)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images (B,3,H,W) in about [-1,1], with the model's own first stage (the SD VAE)."""
        return self.first_stage_model.decode(self.first_stage_model.unscale_latents(z))


class LatentInpaintDiffusion(LatentDiffusion):
    """SD inpainting model: the UNet reads ``cat([x, mask, masked-image latent])`` (4 + 1 + 4 = 9 channels).

    ``concat_keys`` gives the order of the concatenated inputs (original: ``("mask", "masked_image")``), and
    ``masked_image_key`` which of them is encoded by the first stage; the others are resized to latent size.
    ``finetune_keys`` (training only) is accepted and ignored.
    """

    def __init__(self, concat_keys: Sequence[str] = ("mask", "masked_image"), masked_image_key: str = "masked_image",
                 finetune_keys: Any = None, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if masked_image_key not in concat_keys:
            raise ValueError(f"masked_image_key {masked_image_key!r} must be one of concat_keys {list(concat_keys)}")
        self.masked_image_key = masked_image_key
        self.concat_keys = tuple(concat_keys)

    @torch.no_grad()
    def concat_conditioning(self, batch: Mapping[str, torch.Tensor],
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``c_concat`` from a batch of (B,C,H,W) tensors: the masked image encoded and scaled (a posterior sample,
        as the original), every other key nearest-resized to the latent size; concatenated in ``concat_keys``
        order. Returns (B, sum of channels, h, w)."""
        missing = [k for k in self.concat_keys if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing} (concat_keys {list(self.concat_keys)})")
        latent = self.get_first_stage_encoding(self.encode_first_stage(batch[self.masked_image_key].float()),
                                               generator=generator)
        parts = [latent if k == self.masked_image_key else F.interpolate(batch[k].float(), size=latent.shape[-2:])
                 for k in self.concat_keys]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def inpaint_conditioning(self, image: torch.Tensor, mask: torch.Tensor,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``c_concat`` for ``image`` (B,3,H,W) in [-1,1] and a binary ``mask`` (B,1,H,W), 1 = generate: the batch
        the original script builds (masked image = image * (mask < 0.5)) passed to :meth:`concat_conditioning`."""
        if image.ndim != 4 or mask.ndim != 4 or mask.shape[1] != 1 or image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image (B,3,H,W) and mask (B,1,H,W) of one size expected, got {tuple(image.shape)} "
                             f"and {tuple(mask.shape)}")
        batch = {"image": image, "mask": mask, "masked_image": image * (mask < 0.5)}
        return self.concat_conditioning(batch, generator=generator)
