"""What the DDIM and PLMS samplers share: the DDIM sub-schedule, classifier-free guidance in one batch, the DDIM
update and the sampling loop. ``ddim.py`` and ``plms.py`` only add their per-step rule.

The model is a :class:`~ldm.models.diffusion.ddpm.LatentDiffusion` (or anything with ``num_timesteps``,
``alphas_cumprod``, ``apply_model(x, t, cond)``, ``q_sample`` and ``parameterization == "eps"``).

Randomness: pass ``generator`` (a ``torch.Generator``) to make a run reproducible. Noise is drawn on the generator's
device and then moved to the latents' device, so a CPU generator gives the same numbers on every device. Without a
generator the global RNG is used, as in the original code.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from ...modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps

log = logging.getLogger(__name__)

# A conditioning: a tensor (B, ...), a list of tensors, or the hybrid dict {"c_concat": [...], "c_crossattn": [...]}.
Conditioning = Union[torch.Tensor, List[torch.Tensor], Dict[str, Union[torch.Tensor, List[torch.Tensor]]]]


def randn(shape: Sequence[int], device: Union[str, torch.device], generator: Optional[torch.Generator] = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn from ``generator`` (on the generator's own device, so a CPU
    generator gives the same numbers everywhere) or from the global RNG."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def conditioning_batch_size(c: Conditioning) -> int:
    """Batch size of a conditioning in any of its three forms."""
    if isinstance(c, Mapping):
        first = next(iter(c.values()))
        return conditioning_batch_size(first)
    if isinstance(c, (list, tuple)):
        return c[0].shape[0]
    return c.shape[0]


def cat_conditionings(uc: Conditioning, c: Conditioning) -> Conditioning:
    """Stack unconditional and conditional inputs along the batch, ``uc`` first, so that one UNet call computes
    both halves of classifier-free guidance. Dicts are concatenated key by key and list item by list item."""
    if isinstance(c, Mapping):
        if not isinstance(uc, Mapping) or set(uc) != set(c):
            raise ValueError(f"unconditional_conditioning must be a dict with the keys of the conditioning "
                             f"{sorted(c)}, got {sorted(uc) if isinstance(uc, Mapping) else type(uc).__name__}")
        return {k: cat_conditionings(uc[k], c[k]) for k in c}
    if isinstance(c, (list, tuple)):
        if not isinstance(uc, (list, tuple)) or len(uc) != len(c):
            raise ValueError("unconditional_conditioning must be a list as long as the conditioning list")
        return [torch.cat([u, v]) for u, v in zip(uc, c)]
    return torch.cat([uc, c])


class ScheduledSampler:
    """DDIM sub-schedule of a trained DDPM plus the loop the samplers share.

    Subclasses implement :meth:`_step` (one update from timestep ``t`` to the next-lower one).
    """

    progress_desc = "Sampler"

    def __init__(self, model: torch.nn.Module, schedule: str = "linear", **kwargs: Any):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule  # kept for the original signature; the betas come from the model

    # ------------------------------------------------------------------ schedule
    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Pick ``ddim_num_steps`` of the model's timesteps and the DDIM coefficients on them.

        ``uniform`` gives ``1, 1 + c, 1 + 2c, ...`` with ``c = T // steps`` (diffusers: ``timestep_spacing="leading"``,
        ``steps_offset=1``); ``ddim_alphas_prev`` of the last step is ``alphas_cumprod[0]`` (diffusers:
        ``set_alpha_to_one=False``).
        """
        if not isinstance(ddim_num_steps, (int, np.integer)) or not 1 <= ddim_num_steps <= self.ddpm_num_timesteps:
            raise ValueError(f"number of sampling steps must be an integer in [1, {self.ddpm_num_timesteps}], "
                             f"got {ddim_num_steps!r}")
        if ddim_eta < 0:
            raise ValueError(f"eta must be >= 0, got {ddim_eta}")
        self.ddim_timesteps = make_ddim_timesteps(ddim_discr_method=ddim_discretize, num_ddim_timesteps=ddim_num_steps,
                                                  num_ddpm_timesteps=self.ddpm_num_timesteps, verbose=verbose)
        if self.ddim_timesteps[-1] >= self.ddpm_num_timesteps:
            # uniform spacing: range(0, T, T // S) + 1 overshoots when T // S divides T - 1 (T 1000: S 3, 1000, ...)
            raise ValueError(f"{ddim_num_steps} {ddim_discretize} steps do not fit {self.ddpm_num_timesteps} "
                             f"timesteps (last step {self.ddim_timesteps[-1]}); choose another number of steps")
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("alphas_cumprod must have one entry per DDPM timestep")
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            alphacums=alphas_cumprod.detach().cpu().double().numpy(), ddim_timesteps=self.ddim_timesteps,
            eta=ddim_eta, verbose=verbose)

        def to_torch(a: Any) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=alphas_cumprod.device)

        self.ddim_sigmas = to_torch(sigmas)
        self.ddim_alphas = to_torch(alphas)
        self.ddim_alphas_prev = to_torch(alphas_prev)
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - self.ddim_alphas)

    # ------------------------------------------------------------------ public entry point
    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Optional[Conditioning] = None,
               callback: Optional[Callable[[int], None]] = None, normals_sequence: Any = None,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Optional[Mapping[str, Any]] = None, verbose: bool = True,
               x_T: Optional[torch.Tensor] = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Optional[Conditioning] = None,
               generator: Optional[torch.Generator] = None,
               progress: bool = True) -> Tuple[torch.Tensor, Dict[str, List[torch.Tensor]]]:
        """Sample latents (batch_size, *shape) with ``S`` steps. Returns ``(samples, intermediates)``, the latter
        ``{"x_inter": [...], "pred_x0": [...]}`` every ``log_every_t`` steps.

        The arguments are the original ones. ``unconditional_guidance_scale`` s != 1 with an
        ``unconditional_conditioning`` gives ``eps = eps(uc) + s * (eps(c) - eps(uc))``, both halves in one batch.
        ``mask`` / ``x0`` (latent size) follow this project's convention, **1 = generate, 0 = keep** ``x0`` (the
        original LDM samplers used the opposite); the kept part is re-noised from ``x0`` at every step.
        ``normals_sequence`` is accepted and unused, as in the original. Added: ``generator`` for the noise (x_T
        when not given, eta > 0 noise, the re-noising of ``x0``), ``progress`` to hide the per-step bar.
        """
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        if conditioning is not None and conditioning_batch_size(conditioning) != batch_size:
            raise ValueError(f"conditioning has batch size {conditioning_batch_size(conditioning)} but batch_size "
                             f"is {batch_size}")
        guided = unconditional_conditioning is not None and unconditional_guidance_scale != 1.0
        if guided and conditioning_batch_size(unconditional_conditioning) != batch_size:
            raise ValueError(f"unconditional_conditioning has batch size "
                             f"{conditioning_batch_size(unconditional_conditioning)} but batch_size is {batch_size}")
        if quantize_x0 and not hasattr(self.model.first_stage_model, "quantize"):
            raise ValueError("quantize_x0 needs a VQ first stage; this model's first stage has no quantizer")
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0, the latents to keep where mask == 0")
        if self.model.parameterization != "eps":
            raise ValueError(f"the samplers need an eps-prediction model, got {self.model.parameterization!r}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        device = self.model.alphas_cumprod.device
        if x_T is None:
            img = randn(size, device, generator)
        elif tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {size}")
        else:
            img = x_T.to(device)

        opts = dict(unconditional_guidance_scale=unconditional_guidance_scale,
                    unconditional_conditioning=unconditional_conditioning, score_corrector=score_corrector,
                    corrector_kwargs=corrector_kwargs or {}, quantize_denoised=quantize_x0, temperature=temperature,
                    noise_dropout=noise_dropout, generator=generator)
        intermediates: Dict[str, List[torch.Tensor]] = {"x_inter": [img], "pred_x0": [img]}
        time_range = np.flip(self.ddim_timesteps)
        total_steps = len(time_range)
        state: Dict[str, Any] = {}  # per-run memory of a multistep rule (PLMS's previous eps)
        if verbose:
            log.info("Running %s with %d timesteps", self.progress_desc, total_steps)
        for i, step in enumerate(tqdm(time_range, desc=self.progress_desc, total=total_steps, disable=not progress)):
            index = total_steps - i - 1
            ts = torch.full((batch_size,), int(step), device=device, dtype=torch.long)
            ts_next = torch.full((batch_size,), int(time_range[min(i + 1, total_steps - 1)]), device=device,
                                 dtype=torch.long)
            if mask is not None:
                img_orig = self.model.q_sample(x0, ts, noise=randn(x0.shape, x0.device, generator, x0.dtype))
                img = img_orig * (1.0 - mask) + mask * img
            img, pred_x0 = self._step(img, conditioning, ts, ts_next, index, state, **opts)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    # ------------------------------------------------------------------ shared pieces
    def _step(self, x: torch.Tensor, c: Optional[Conditioning], t: torch.Tensor, t_next: torch.Tensor, index: int,
              state: Dict[str, Any], **opts: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, c: Optional[Conditioning],
                   unconditional_guidance_scale: float = 1.0,
                   unconditional_conditioning: Optional[Conditioning] = None, score_corrector: Any = None,
                   corrector_kwargs: Optional[Mapping[str, Any]] = None, **_: Any) -> torch.Tensor:
        """The model's noise prediction at (x, t), with classifier-free guidance when asked."""
        if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
            e_t = self.model.apply_model(x, t, c)
        else:
            c_in = cat_conditionings(unconditional_conditioning, c)
            e_t_uncond, e_t = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), c_in).chunk(2)
            e_t = e_t_uncond + unconditional_guidance_scale * (e_t - e_t_uncond)
        if score_corrector is not None:
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
        return e_t

    def ddim_update(self, x: torch.Tensor, e_t: torch.Tensor, index: int, quantize_denoised: bool = False,
                    temperature: float = 1.0, noise_dropout: float = 0.0,
                    generator: Optional[torch.Generator] = None, **_: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """DDIM step (Song et al. eq. 12) from the latents at ddim index ``index`` given their eps.

        Returns ``(x_prev, pred_x0)``.
        """
        a_t = self.ddim_alphas[index]
        a_prev = self.ddim_alphas_prev[index]
        sigma_t = self.ddim_sigmas[index]
        pred_x0 = (x - self.ddim_sqrt_one_minus_alphas[index] * e_t) / a_t.sqrt()
        if quantize_denoised:
            pred_x0, *_ = self.model.first_stage_model.quantize(pred_x0)
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if sigma_t > 0:
            noise = sigma_t * randn(x.shape, x.device, generator, x.dtype) * temperature
            if noise_dropout > 0.0:
                noise = torch.nn.functional.dropout(noise, p=noise_dropout)
            x_prev = x_prev + noise
        return x_prev, pred_x0
