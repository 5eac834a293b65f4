"""Small helpers of the SD v1 UNet and its samplers: noise schedules, DDIM sub-schedules, timestep embeddings,
layer factories and gradient checkpointing.

Numbers follow CompVis/stable-diffusion (``ldm/modules/diffusionmodules/util.py``); where diffusers names the same
thing differently the docstring says so, because the tests use diffusers as the reference.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence, Tuple

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- schedules
def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """Betas (n_timestep,) float64.

    ``linear`` is SD's schedule: ``linspace(sqrt(start), sqrt(end), n) ** 2`` (diffusers: ``"scaled_linear"``; SD v1
    uses start 0.00085, end 0.012, n 1000). ``cosine`` is Nichol & Dhariwal's, betas clipped to 0.999.
    ``sqrt_linear`` = ``linspace(start, end)``, ``sqrt`` = ``linspace(start, end) ** 0.5`` (the original's names).
    """
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be >= 1, got {n_timestep}")
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64,
                               device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; expected linear, cosine, sqrt_linear or sqrt")
    return betas.numpy()


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = True) -> np.ndarray:
    """The DDPM timesteps a DDIM/PLMS run visits, ascending, int64.

    ``uniform``: ``range(0, T, T // S) + 1``. As in the original, this has more than ``S`` entries when ``S`` does not
    divide ``T`` (T 1000, S 3 -> 0, 333, 666, 999 -> 4 steps); SD's usual 50 steps give exactly 50 (1, 21, ..., 981,
    diffusers: ``timestep_spacing="leading"``, ``steps_offset=1``). ``quad``: ``linspace(0, sqrt(0.8 T), S) ** 2 + 1``.
    The ``+ 1`` is the original's: it makes the last step reach ``alphas_cumprod[0]`` through ``alphas_prev``.
    """
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in [1, {num_ddpm_timesteps}], got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        ddim_timesteps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretization {ddim_discr_method!r}; expected uniform or quad")
    steps_out = (ddim_timesteps + 1).astype(np.int64)
    if verbose:
        log.info("DDIM timesteps (%d): %s", len(steps_out), steps_out)
    return steps_out


def make_ddim_sampling_parameters(alphacums: np.ndarray, ddim_timesteps: np.ndarray, eta: float,
                                  verbose: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigmas, alphas, alphas_prev) for the DDIM update (Song et al. eq. 16), each (len(ddim_timesteps),).

    ``alphas`` = alphas_cumprod at each visited step; ``alphas_prev`` = the one of the previous visited step, and
    ``alphas_cumprod[0]`` for the last step (diffusers: ``set_alpha_to_one=False``);
    ``sigmas = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))``.
    """
    alphacums = np.asarray(alphacums)
    ddim_timesteps = np.asarray(ddim_timesteps)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        log.info("DDIM alphas: %s; alphas_prev: %s; sigmas (eta %s): %s", alphas, alphas_prev, eta, sigmas)
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """``a[t]`` for a batch of timesteps ``t`` (B,), reshaped to (B, 1, ..., 1) so it broadcasts over ``x_shape``."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


# ---------------------------------------------------------------------------------------------- embeddings
def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embeddings (B, dim) of timesteps (B,), possibly fractional: ``[cos(t f_i), sin(t f_i)]`` with
    ``f_i = max_period ** (-i / (dim // 2))`` (diffusers: ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``).
    ``repeat_only`` returns ``t`` repeated ``dim`` times instead (the original's option)."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


# ---------------------------------------------------------------------------------------------- layer factories
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (half-precision statistics are too coarse)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's norm layer: GroupNorm(32 groups, eps 1e-5) in float32."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.Conv{1,2,3}d`` by ``dims``."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.AvgPool{1,2,3}d`` by ``dims``."""
    if dims not in (1, 2, 3):
        raise ValueError(f"unsupported dimensions: {dims}")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it (output layers start as the identity residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor], flag: bool) -> Any:
    """``func(*inputs)``, recomputed in the backward pass instead of storing activations when ``flag`` is true and
    gradients are being recorded.

    Uses ``torch.utils.checkpoint`` in its non-reentrant form, which tracks parameters itself; ``params`` is kept only
    so calls written for the original signature work.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
