"""SD UNet, its helpers and EMA against diffusers, which is the independent reference: its own converter for
original SD checkpoints maps our state dict onto ``UNet2DConditionModel``."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, UNetModel
from ldm.modules.diffusionmodules.util import (
    GroupNorm32,
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    timestep_embedding,
)
from ldm.modules.ema import LitEma

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

# SD v1 structure at tiny width: 3 levels, attention at factors 1 and 2 but not at the deepest level
# (as SD's [4, 2, 1] of 4 levels), inpainting input of 9 channels, per-head count like SD v1 (num_heads).
TINY_V1 = dict(image_size=16, in_channels=9, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
               num_res_blocks=1, channel_mult=[1, 2, 2], num_heads=2, use_spatial_transformer=True,
               transformer_depth=1, context_dim=24, legacy=False)
# SD 2.x flavour: head width instead of head count, Linear proj_in/proj_out, two transformer blocks, 4 channels.
TINY_V2 = dict(TINY_V1, in_channels=4, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
               transformer_depth=2)
SD_V1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
             num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
             transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere: the zero-initialised output convs would otherwise hide most of the net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:  # matrices and kernels: unit gain
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales stay near 1, or they would shrink every signal
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def to_diffusers(params: dict, state_dict: dict, device: str = "cpu", extract_ema: bool = False):
    """diffusers' own conversion of an original SD checkpoint: config from the yaml params, weights renamed."""
    original_config = {"model": {"params": {"unet_config": {"params": {k: v for k, v in params.items() if v != -1}},
                                            "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = single_file_utils.create_unet_diffusers_config_from_ldm(original_config, state_dict)
    converted = single_file_utils.convert_ldm_unet_checkpoint(state_dict, config, extract_ema=extract_ema)
    with torch.device(device):
        ref = UNet2DConditionModel(**config)
    return ref, converted


@pytest.mark.slow
@pytest.mark.parametrize("params", [TINY_V1, TINY_V2], ids=["v1-inpainting", "v2-linear"])
def test_unet_matches_diffusers(params):
    model = randomize_(UNetModel(**params)).eval()
    state_dict = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    ref, converted = to_diffusers(params, state_dict)
    ref.load_state_dict(converted, strict=True)
    ref.eval()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, params["in_channels"], 16, 16, generator=g)
    t = torch.tensor([3, 981])
    context = torch.randn(2, 5, params["context_dim"], generator=g)
    with torch.no_grad():
        ours = model(x, t, context)
        theirs = ref(x, t, encoder_hidden_states=context).sample
    assert ours.shape == (2, 4, 16, 16)
    assert ours.abs().mean() > 0.1  # the comparison is not between two near-zero tensors
    assert (ours - theirs).abs().max() < 1e-4
    with torch.no_grad():  # the context reaches the output through the cross-attention
        assert (model(x, t, context.flip(0)) - ours).abs().max() > 0.1


@pytest.mark.parametrize("in_channels,n_params", [(4, 859_520_964), (9, 859_535_364)])
def test_full_size_sd_v1_keys(in_channels, n_params):
    """SD v1.5 (and its inpainting variant) built on the meta device: 686 tensors, every one consumed by diffusers'
    converter onto exactly the keys and shapes of the full-size UNet2DConditionModel."""
    params = dict(SD_V1, in_channels=in_channels)
    with torch.device("meta"):
        model = UNetModel(**params)
    ours = model.state_dict()
    assert len(ours) == 686
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert ours["input_blocks.0.0.weight"].shape == (320, in_channels, 3, 3)
    for key in ["time_embed.0.weight", "time_embed.2.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.3.0.op.weight", "middle_block.1.proj_in.weight", "middle_block.2.out_layers.3.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", "out.0.weight", "out.2.weight"]:
        assert key in ours, key
    ref, converted = to_diffusers(params, {f"model.diffusion_model.{k}": v for k, v in ours.items()}, device="meta")
    theirs = ref.state_dict()
    assert len(converted) == len(ours)
    assert set(converted) == set(theirs)
    assert all(converted[k].shape == theirs[k].shape for k in theirs)


@pytest.mark.slow
def test_unet_rejects_bad_input():
    model = UNetModel(**TINY_V1).eval()
    context = torch.zeros(1, 3, 24)
    with pytest.raises(ValueError, match="9"):
        model(torch.zeros(1, 4, 16, 16), torch.tensor([1]), context)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 9, 18, 16), torch.tensor([1]), context)
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.zeros(2, 9, 16, 16), torch.tensor([1, 2, 3]), context.expand(2, -1, -1))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 9, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 9, 16, 16), torch.tensor([1]), torch.zeros(1, 3, 25))
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.zeros(1, 9, 16, 16), torch.tensor([1]), context, y=torch.tensor([0]))
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 9, 16, 16), torch.tensor([1, 2]), context)
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(**dict(TINY_V1, context_dim=None))
    with pytest.raises(ValueError, match="use_fp16"):
        UNetModel(**dict(TINY_V1, use_fp16=True))
    with torch.no_grad():  # a scalar timestep is broadcast over the batch
        x = torch.randn(2, 9, 16, 16)
        c = torch.randn(2, 3, 24)
        assert torch.equal(model(x, torch.tensor(7), c), model(x, torch.tensor([7, 7]), c))


@pytest.mark.slow
def test_use_checkpoint_gives_the_same_gradients():
    plain = randomize_(UNetModel(**TINY_V1)).train()
    ckpt = UNetModel(**dict(TINY_V1, use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 9, 16, 16, generator=g), torch.randn(1, 3, 24, generator=g)
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, torch.tensor([10]), c).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_explicit_softmax(new_order):
    """The non-transformer attention (LDM configs without cross-attention): SDPA against the original's formula,
    softmax(q^T k / sqrt(ch)) over positions, for both qkv channel layouts."""
    block = randomize_(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order))
    x = torch.randn(2, 64, 4, 4)
    qkv = block.qkv(block.norm(x.reshape(2, 64, 16)))
    if new_order:
        q, k, v = (t.reshape(8, 16, 16) for t in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(8, 48, 16).split(16, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(16), dim=-1)
    h = torch.einsum("bts,bcs->bct", weight, v).reshape(2, 64, 16)
    expected = (x.reshape(2, 64, 16) + block.proj_out(h)).reshape(2, 64, 4, 4)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_unet_without_cross_attention_runs():
    """LDM-style options (self-attention blocks, resblock up/down, scale-shift norm, classes): shapes only."""
    model = UNetModel(image_size=16, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
                      attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16, num_classes=5,
                      use_scale_shift_norm=True, resblock_updown=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), y=torch.tensor([0, 4]))
    assert out.shape == (2, 3, 16, 16)
    assert "label_emb.weight" in model.state_dict() and "input_blocks.2.0.op.weight" not in model.state_dict()


# ------------------------------------------------------------------------------------------ util.py
def test_beta_schedules_match_diffusers():
    ours = torch.from_numpy(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    theirs = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert torch.allclose(ours.float(), theirs, rtol=1e-6, atol=0)
    ours = torch.from_numpy(make_beta_schedule("cosine", 1000))
    theirs = DDIMScheduler(beta_schedule="squaredcos_cap_v2").betas
    assert torch.allclose(ours.float(), theirs, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_beta_schedule("quadratic", 10)


def test_ddim_timesteps_and_parameters():
    ours = make_ddim_timesteps("uniform", 50, 1000, verbose=False)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False)
    scheduler.set_timesteps(50)
    assert ours.tolist() == sorted(scheduler.timesteps.tolist())
    assert ours[0] == 1 and ours[-1] == 981
    # the original's quirk, kept: 3 does not divide 1000, so range(0, 1000, 333) gives 4 steps
    assert make_ddim_timesteps("uniform", 3, 1000, verbose=False).tolist() == [1, 334, 667, 1000]
    alphacums = scheduler.alphas_cumprod.double().numpy()
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphacums, ours, eta=0.0, verbose=False)
    assert (sigmas == 0).all()
    assert alphas_prev[0] == alphacums[0] and (alphas_prev[1:] == alphas[:-1]).all()
    sigmas, _, _ = make_ddim_sampling_parameters(alphacums, ours, eta=1.0, verbose=False)
    # eta 1 is DDPM's posterior std: diffusers' DDIM variance for the same step pair
    t, prev = int(ours[10]), int(ours[9])
    assert math.isclose(sigmas[10] ** 2, float(scheduler._get_variance(t, prev)), rel_tol=1e-5)
    with pytest.raises(ValueError):
        make_ddim_timesteps("uniform", 0, 1000)


def test_timestep_embedding_matches_diffusers():
    t = torch.tensor([0, 1, 500, 999.5])
    for dim in (32, 7):
        ours = timestep_embedding(t, dim)
        theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert ours.shape == (4, dim)
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_groupnorm32_computes_in_float32():
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4) * 100
    out = norm(x.half())
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), norm(x.half().float()), atol=2e-3)


# ------------------------------------------------------------------------------------------ ema.py
class _Wrapper(nn.Module):
    """The ``model.diffusion_model`` level of LatentDiffusion."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet


def test_ema_names_and_update_rule():
    model = _Wrapper(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    model.diffusion_model[1].bias.requires_grad_(False)
    ema = LitEma(model, decay=0.9)
    assert set(ema.state_dict()) == {"decay", "num_updates", "diffusion_model0weight", "diffusion_model0bias",
                                     "diffusion_model1weight"}
    start = model.diffusion_model[0].weight.detach().clone()
    with torch.no_grad():
        model.diffusion_model[0].weight.add_(1.0)
    ema(model)  # first update: warm-up decay min(0.9, 2 / 11)
    expected = start + (1 - 2 / 11) * 1.0
    assert ema.num_updates == 1
    assert torch.allclose(ema.diffusion_model0weight, expected)

    live = [p.detach().clone() for p in model.parameters()]
    ema.store(model.parameters())
    ema.copy_to(model)
    assert torch.allclose(model.diffusion_model[0].weight, expected)
    ema.restore(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(live, model.parameters()))
    with pytest.raises(ValueError, match="decay"):
        LitEma(model, decay=1.5)
    with pytest.raises(ValueError, match="lacks"):
        ema.copy_to(nn.Linear(3, 4))


def test_ema_keys_are_what_diffusers_extracts():
    """An SD checkpoint's ``model_ema.*`` keys, as diffusers' converter reads them (``extract_ema=True``), give
    the weights ``LitEma.copy_to`` puts into the UNet."""
    model = _Wrapper(randomize_(UNetModel(**TINY_V1), seed=3)).eval()
    ema = LitEma(model)
    randomize_(model, seed=4)  # live weights now differ from the shadow
    state_dict = {f"model.{k}": v for k, v in model.state_dict().items()}
    state_dict.update({f"model_ema.{k}": v for k, v in ema.state_dict().items()})
    ref, converted = to_diffusers(TINY_V1, state_dict, extract_ema=True)
    ref.load_state_dict(converted, strict=True)
    ema.copy_to(model)
    x, c = torch.randn(1, 9, 16, 16), torch.randn(1, 3, 24)
    with torch.no_grad():
        assert (model.diffusion_model(x, torch.tensor([500]), c)
                - ref.eval()(x, torch.tensor([500]), encoder_hidden_states=c).sample).abs().max() < 1e-4
