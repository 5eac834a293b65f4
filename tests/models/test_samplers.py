"""DDIM / PLMS against diffusers' DDIMScheduler / PNDMScheduler(skip_prk_steps) on the same eps function and noise.

SD's sampler settings correspond to diffusers' ``beta_schedule="scaled_linear"``, ``timestep_spacing="leading"``,
``steps_offset=1``, ``set_alpha_to_one=False``, ``clip_sample=False``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_beta_schedule

T, START, END = 1000, 0.00085, 0.012
C, H, W, CTX = 4, 6, 5, 8


class LinearEpsModel(nn.Module):
    """A stand-in for LatentDiffusion: eps is a fixed random function of x, t and the conditioning.

    Conditioning: a (B, CTX) tensor, or the hybrid dict {"c_concat": [(B, 2, H, W)], "c_crossattn": [(B, CTX)]}.
    """

    parameterization = "eps"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        betas = make_beta_schedule("linear", T, linear_start=START, linear_end=END)
        alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt())
        self.num_timesteps = T
        self.a = torch.randn(C, C, generator=g) * 0.3 + torch.eye(C) * 0.5
        self.b = torch.randn(C, generator=g)
        self.p = torch.randn(CTX, C, generator=g) * 0.5
        self.q = torch.randn(2, C, generator=g) * 0.5
        self.batch_sizes = []

    def apply_model(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        if isinstance(cond, dict):
            ctx = torch.cat(cond["c_crossattn"], 1)
            concat = torch.cat(cond["c_concat"], 1)
            extra = torch.einsum("bkhw,kc->bchw", concat, self.q)
        else:
            ctx, extra = cond, 0.0
        scale = 1.0 + t.float().view(-1, 1, 1, 1) / T
        return (torch.einsum("bkhw,kc->bchw", x, self.a) * scale + torch.sin(t.float() / 100).view(-1, 1, 1, 1)
                * self.b.view(1, C, 1, 1) + (ctx @ self.p).view(-1, C, 1, 1) + extra)

    def q_sample(self, x_start, t, noise):
        return (self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x_start
                + self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise)


def guided(model, x, t, c, uc, scale):
    e_c = model.apply_model(x, t, c)
    e_u = model.apply_model(x, t, uc)
    return e_u + scale * (e_c - e_u)


def diffusers_kwargs():
    return dict(num_train_timesteps=T, beta_start=START, beta_end=END, beta_schedule="scaled_linear",
                set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@pytest.fixture
def setup():
    torch.manual_seed(1)
    model = LinearEpsModel()
    c = torch.randn(2, CTX)
    uc = torch.randn(2, CTX)
    x_T = torch.randn(2, C, H, W)
    return model, c, uc, x_T


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_matches_diffusers(setup, eta):
    from diffusers import DDIMScheduler

    model, c, uc, x_T = setup
    scale, steps = 7.5, 50
    _, inter = DDIMSampler(model).sample(steps, 2, (C, H, W), c, eta=eta, x_T=x_T, unconditional_guidance_scale=scale,
                                         unconditional_conditioning=uc, log_every_t=1, verbose=False, progress=False,
                                         generator=torch.Generator().manual_seed(5))
    sched = DDIMScheduler(clip_sample=False, **diffusers_kwargs())
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == list(range(981, 0, -20))
    noise_gen = torch.Generator().manual_seed(5)  # our sampler draws one noise tensor per step when eta > 0
    x, ref = x_T.clone(), [x_T.clone()]
    for t in sched.timesteps:
        ts = torch.full((2,), int(t), dtype=torch.long)
        noise = torch.randn(x.shape, generator=noise_gen) if eta > 0 else None
        x = sched.step(guided(model, x, ts, c, uc, scale), t, x, eta=eta, variance_noise=noise).prev_sample
        ref.append(x)
    assert len(inter["x_inter"]) == len(ref) == steps + 1
    for ours, theirs in zip(inter["x_inter"], ref):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    assert inter["x_inter"][-1].abs().max() > 0.1  # a trajectory that went somewhere


def test_plms_trajectory_matches_diffusers_pndm(setup):
    from diffusers import PNDMScheduler

    model, c, uc, x_T = setup
    scale, steps = 5.0, 50
    _, inter = PLMSSampler(model).sample(steps, 2, (C, H, W), c, x_T=x_T, unconditional_guidance_scale=scale,
                                         unconditional_conditioning=uc, log_every_t=1, verbose=False, progress=False)
    sched = PNDMScheduler(skip_prk_steps=True, **diffusers_kwargs())
    sched.set_timesteps(steps)
    x, ref = x_T.clone(), [x_T.clone()]
    for i, t in enumerate(sched.timesteps):
        ts = torch.full((2,), int(t), dtype=torch.long)
        x = sched.step(guided(model, x, ts, c, uc, scale), t, x).prev_sample
        if i != 0:  # diffusers' first call is the predictor half of the first (2nd-order) step
            ref.append(x)
    assert len(inter["x_inter"]) == len(ref) == steps + 1
    for ours, theirs in zip(inter["x_inter"], ref):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_guidance_runs_both_halves_in_one_batch_with_dict_conditioning():
    """Hybrid (inpainting) conditioning: c_concat and c_crossattn concatenated [uc, c] key by key, one UNet call."""
    torch.manual_seed(2)
    model = LinearEpsModel()
    cat = torch.randn(3, 2, H, W)
    c = {"c_concat": [cat], "c_crossattn": [torch.randn(3, CTX)]}
    uc = {"c_concat": [cat], "c_crossattn": [torch.randn(3, CTX)]}
    x_T = torch.randn(3, C, H, W)
    out, _ = DDIMSampler(model).sample(4, 3, (C, H, W), c, x_T=x_T, unconditional_guidance_scale=3.0,
                                       unconditional_conditioning=uc, verbose=False, progress=False)
    assert model.batch_sizes == [6] * 4

    sampler = DDIMSampler(model)
    sampler.make_schedule(4, verbose=False)
    x = x_T
    for index, t in reversed(list(enumerate(sampler.ddim_timesteps))):
        ts = torch.full((3,), int(t), dtype=torch.long)
        x, _ = sampler.ddim_update(x, guided(model, x, ts, c, uc, 3.0), index)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_unguided_sampling_has_one_half_and_scale_one_skips_uncond(setup):
    model, c, uc, x_T = setup
    DDIMSampler(model).sample(4, 2, (C, H, W), c, x_T=x_T, unconditional_guidance_scale=1.0,
                              unconditional_conditioning=uc, verbose=False, progress=False)
    assert model.batch_sizes == [2] * 4


def test_same_generator_same_samples(setup):
    model, c, uc, _ = setup

    def run(seed):
        return DDIMSampler(model).sample(5, 2, (C, H, W), c, eta=1.0, verbose=False, progress=False,
                                         generator=torch.Generator().manual_seed(seed))[0]

    torch.testing.assert_close(run(3), run(3), atol=0, rtol=0)
    assert not torch.allclose(run(3), run(4))


def test_mask_convention_one_generates(setup):
    """mask == 1 everywhere: nothing is kept, same as no mask. mask == 0: the result follows x0."""
    model, c, _, x_T = setup
    kw = dict(verbose=False, progress=False, x_T=x_T)
    free, _ = DDIMSampler(model).sample(10, 2, (C, H, W), c, **kw)
    x0 = torch.randn(2, C, H, W) * 3
    all_gen, _ = DDIMSampler(model).sample(10, 2, (C, H, W), c, mask=torch.ones(2, 1, H, W), x0=x0, **kw)
    torch.testing.assert_close(all_gen, free, atol=0, rtol=0)
    mask = torch.ones(2, 1, H, W)
    mask[..., :3, :] = 0
    kept, _ = DDIMSampler(model).sample(10, 2, (C, H, W), c, mask=mask, x0=x0, **kw)
    err_kept = (kept - x0)[..., :3, :].abs().mean()
    err_free = (free - x0)[..., :3, :].abs().mean()
    assert err_kept < 0.5 * err_free


def test_bad_arguments(setup):
    model, c, uc, x_T = setup
    with pytest.raises(ValueError, match="eta must be 0 for PLMS"):
        PLMSSampler(model).sample(5, 2, (C, H, W), c, eta=0.5, verbose=False, progress=False)
    with pytest.raises(ValueError, match="x_T has shape"):
        DDIMSampler(model).sample(5, 2, (C, H + 1, W), c, x_T=x_T, verbose=False, progress=False)
    with pytest.raises(ValueError, match="batch size 2 but batch_size is 3"):
        DDIMSampler(model).sample(5, 3, (C, H, W), c, verbose=False, progress=False)
    with pytest.raises(ValueError, match="sampling steps"):
        DDIMSampler(model).sample(0, 2, (C, H, W), c, verbose=False, progress=False)
    with pytest.raises(ValueError, match="do not fit"):
        DDIMSampler(model).sample(3, 2, (C, H, W), c, verbose=False, progress=False)
    with pytest.raises(ValueError, match="needs x0"):
        DDIMSampler(model).sample(5, 2, (C, H, W), c, mask=torch.ones(2, 1, H, W), verbose=False, progress=False)
    with pytest.raises(ValueError, match="must be a dict"):
        DDIMSampler(model).sample(5, 2, (C, H, W), {"c_crossattn": [c], "c_concat": [torch.zeros(2, 2, H, W)]},
                                  unconditional_guidance_scale=2.0, unconditional_conditioning=uc, verbose=False,
                                  progress=False)
