"""The one Decoder: variants from config, parameter counts, the kept-region contract, input validation."""
from __future__ import annotations

import pytest
import torch

from ldm.project import load_yaml
from ldm.util import instantiate_from_config
from tests.conftest import make_autoencoder

CONFIGS = "configs/autoencoder"

# The paper's models (encoder, decoder main path, condition branch; docs/design.md); SD VAE decoder = 49,490,179.
PARAM_COUNTS = {
    "autoencoder_kl_32x32x4": (34_163_592, 49_490_179, 10_786_048),
    "autoencoder_kl_32x32x4_large": (34_163_592, 135_872_259, 24_264_576),
    "autoencoder_kl_32x32x4_large2": (34_163_592, 328_833_027, 43_133_440),
    "autoencoder_kl_woc_32x32x4": (34_163_592, 49_490_179, 0),
    "autoencoder_kl_woc_32x32x4_large": (34_163_592, 135_872_259, 0),
    "autoencoder_kl_woc_32x32x4_large2": (34_163_592, 328_833_027, 0),
}


def build_meta(name: str):
    cfg = load_yaml(f"{CONFIGS}/{name}.yaml")
    with torch.device("meta"):
        return instantiate_from_config(cfg.model)


def numel(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_full_size_parameter_counts(name):
    model = build_meta(name)
    enc, dec_main, cond = PARAM_COUNTS[name]
    assert numel(model.encoder) == enc
    assert numel(model.decoder.encoder) == cond
    assert numel(model.decoder) - numel(model.decoder.encoder) == dec_main
    assert numel(model.quant_conv) == 72 and numel(model.post_quant_conv) == 20


@pytest.mark.parametrize("name", ["autoencoder_kl_32x32x4_train", "autoencoder_kl_32x32x4_large_train",
                                  "autoencoder_kl_32x32x4_large2_train"])
def test_train_configs_describe_the_same_decoder_as_inference(name):
    train = load_yaml(f"{CONFIGS}/{name}.yaml").model.params
    infer = load_yaml(f"{CONFIGS}/{name.replace('_train', '')}.yaml").model.params
    assert train.ddconfig == infer.ddconfig
    assert train.decoder_overrides == infer.decoder_overrides


def test_released_key_layout_base():
    """Key names of the released base.ckpt (SPEC 2.1), minus the dead up_layers and the loss."""
    keys = set(build_meta("autoencoder_kl_32x32x4").state_dict())
    sd_vae = set(build_meta("autoencoder_kl_woc_32x32x4").state_dict())
    assert len(sd_vae) == 248  # keys of Stable Diffusion v1's first_stage_model
    assert keys - sd_vae == {f"decoder.encoder.layers.{i}.{p}" for i in range(5) for p in ("weight", "bias")}
    for k in ["decoder.up.0.block.2.conv2.weight", "decoder.up.3.upsample.conv.weight", "decoder.mid.attn_1.q.weight",
              "decoder.up.1.block.0.nin_shortcut.weight", "encoder.down.2.downsample.conv.weight"]:
        assert k in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys and "decoder.up.0.block.3.conv1.weight" not in keys


@pytest.mark.parametrize("overrides", [dict(condition=False), dict(condition=True),
                                       dict(condition=True, ch=64, num_res_blocks=2)])
def test_tiny_variants_decode(overrides):
    model = make_autoencoder(**overrides)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = model.encode(x).mode()
        out = model.decode(z, x, torch.ones(2, 1, 32, 32))
    assert z.shape == (2, 4, 16, 16) and out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all()


def _inputs(seed=1, b=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(b, 4, 16, 16, generator=g)
    mask = torch.zeros(b, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1.0  # a hole to generate; the rest is kept
    return z, x, mask


def test_kept_region_follows_the_image(tiny_autoencoder):
    z, x, mask = _inputs()
    x2 = x.clone()
    x2[:, :, :, 24:] = -x2[:, :, :, 24:]  # change kept pixels only (columns 24.. lie outside the hole)
    with torch.no_grad():
        a = tiny_autoencoder.decode(z, x, mask)
        b = tiny_autoencoder.decode(z, x2, mask)
    assert (a[..., 24:] - b[..., 24:]).abs().max() > 1e-3


def test_masked_pixels_of_the_image_are_never_read(tiny_autoencoder):
    z, x, mask = _inputs()
    x2 = torch.where(mask.bool(), torch.rand_like(x), x)  # change only pixels under the hole
    with torch.no_grad():
        assert torch.equal(tiny_autoencoder.decode(z, x, mask), tiny_autoencoder.decode(z, x2, mask))


def test_all_ones_mask_equals_no_prior(tiny_autoencoder):
    z, x, _ = _inputs()
    ones = torch.ones(2, 1, 32, 32)
    with torch.no_grad():
        plain = tiny_autoencoder.decode(z)
        assert torch.equal(tiny_autoencoder.decode(z, x, ones), plain)
        assert torch.equal(tiny_autoencoder.decode(z, torch.rand_like(x), ones), plain)
        unconditioned = tiny_autoencoder.decoder(tiny_autoencoder.post_quant_conv(z))
        assert torch.equal(tiny_autoencoder.decode(z, x, ones), unconditioned)


@pytest.mark.parametrize("overrides", [{}, {"concat_mask": True, "mask_resize": "area"}])
def test_cpu_decode_runs_channels_last_and_returns_the_callers_layout(overrides):
    """Decoding on the CPU, every convolution of the decoder and of the condition branch reads a channels-last
    activation (oneDNN then makes no layout reorders), also after the concatenated mask input and the blends; the
    image comes back in the latent's layout, the same values (to float32 rounding) either way."""
    model = make_autoencoder(condition=True, **overrides)
    z, x, mask = _inputs()
    seen = []
    for name, module in model.decoder.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.append(
                (name, args[0].is_contiguous(memory_format=torch.channels_last))))
    with torch.no_grad():
        out = model.decode(z, x, mask)
        assert out.is_contiguous()
        assert seen and all(cl for _, cl in seen), [name for name, cl in seen if not cl]
        assert any(name.startswith("encoder.") for name, _ in seen)
        cl = [t.contiguous(memory_format=torch.channels_last) for t in (z, x, mask)]
        out_cl = model.decode(*cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    # the decoder runs the same layout either way; post_quant_conv (a 1x1 conv outside it) sees the caller's
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=2e-5)
    # with autograd (float32 training) the layout stays as given
    seen.clear()
    model.decode(z, x, mask)
    assert seen and not any(cl for _, cl in seen)


def test_decoder_without_condition_ignores_the_prior():
    woc = make_autoencoder(condition=False)
    z, x, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(woc.decode(z, x, mask), woc.decode(z))


def test_batch_one_prior_broadcasts_over_latents(tiny_autoencoder):
    z, x, mask = _inputs(b=3)
    with torch.no_grad():
        shared = tiny_autoencoder.decode(z, x[:1], mask[:1])
        explicit = tiny_autoencoder.decode(z, x[:1].repeat(3, 1, 1, 1), mask[:1].repeat(3, 1, 1, 1))
    assert torch.equal(shared, explicit)


def test_positional_call_and_forward_pair(tiny_autoencoder):
    z, x, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(tiny_autoencoder.decode(z, x, mask), tiny_autoencoder.decode(z, image=x, mask=mask))
        rec, post = tiny_autoencoder([x, mask], sample_posterior=False)
        assert torch.equal(rec, tiny_autoencoder.decode(post.mode(), x, mask))


def test_sampling_is_deterministic_under_a_generator(tiny_autoencoder):
    _, x, mask = _inputs()
    with torch.no_grad():
        a, _ = tiny_autoencoder(x, mask, generator=torch.Generator().manual_seed(7))
        b, _ = tiny_autoencoder(x, mask, generator=torch.Generator().manual_seed(7))
        c, _ = tiny_autoencoder(x, mask, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("change, message", [
    (lambda z, x, m: (z, x[..., :16, :], m), "image is"),
    (lambda z, x, m: (z, x, m[..., :16]), "mask is"),
    (lambda z, x, m: (z, x[:, :2], m), "image must be"),
    (lambda z, x, m: (z, x, m.repeat(1, 3, 1, 1)), "mask must be"),
    (lambda z, x, m: (z, x, m * 2), r"mask values must lie in \[0, 1\]"),
    (lambda z, x, m: (z, x, m - 0.5), r"mask values must lie in \[0, 1\]"),
    (lambda z, x, m: (z, x, torch.where(m > 0, torch.nan, m)), r"mask values must lie in \[0, 1\]"),
    (lambda z, x, m: (z, x.repeat(2, 1, 1, 1)[:3], m), "batch 3 does not match"),
    (lambda z, x, m: (z[:, :3], x, m), "z must be"),
    (lambda z, x, m: (z, None, m), "needs both image and mask"),
    (lambda z, x, m: (z, x, None), "needs both image and mask"),
])
def test_bad_decode_inputs_are_refused(tiny_autoencoder, change, message):
    z, x, mask = change(*_inputs())
    with pytest.raises(ValueError, match=message):
        tiny_autoencoder.decode(z, x, mask)


@pytest.mark.parametrize("which", ["z", "image", "mask"])
def test_non_float_inputs_are_refused(tiny_autoencoder, which):
    z, x, mask = _inputs()
    args = {"z": z, "image": x, "mask": mask}
    args[which] = (args[which] > 0).to(torch.uint8)
    with pytest.raises(TypeError, match=f"{which} must be a floating-point tensor"):
        tiny_autoencoder.decode(args["z"], args["image"], args["mask"])


@pytest.mark.parametrize("which", ["z", "image"])
def test_inputs_of_another_float_dtype_are_named(tiny_autoencoder, which):
    z, x, mask = _inputs()
    args = {"z": z, "image": x, "mask": mask}
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=f"{which} is torch.float64 but the model's weights are torch.float32"):
        tiny_autoencoder.decode(args["z"], args["image"], args["mask"])
    with pytest.raises(TypeError, match="x is torch.float64"):
        tiny_autoencoder.encode(x.double())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["autoencoder_kl_32x32x4", "autoencoder_kl_woc_32x32x4"])
def test_real_base_configs_build_and_decode(name):
    """The shipped inference configs themselves (not tiny stand-ins), at 64 px: full-size random weights."""
    torch.manual_seed(0)
    model = instantiate_from_config(load_yaml(f"{CONFIGS}/{name}.yaml").model).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    with torch.no_grad():
        z = model.encode(x).mode()
        out = model.decode(z, x, mask)
        plain = model.decode(z)
    assert z.shape == (1, 4, 8, 8) and out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, plain) != model.decoder.has_condition  # the prior matters only with the branch


def _attention_input(channels=32, side=96):
    from ldm.modules.diffusionmodules.model import AttnBlock

    torch.manual_seed(0)
    return AttnBlock(channels).eval(), torch.randn(1, channels, side, side)


def test_attention_runs_the_fused_kernel_not_the_math_one():
    """q/k/v must reach SDPA with a unit stride along the channels; strided views send CPU SDPA to the math kernel,
    which builds the HW x HW matrix (the profiler names the kernel that ran)."""
    block, x = _attention_input(side=16)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        block(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops


def test_attention_peak_memory_stays_far_below_the_attention_matrix():
    """One AttnBlock call at 96 x 96 = 9216 tokens: the HW x HW float32 matrix alone is 324 MiB; with the fused
    kernel the call needs a few MiB (peak resident set over the call, reset through /proc/self/clear_refs)."""
    from ldm.measure import PeakMemory

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("peak resident set cannot be reset on this system")
    block, x = _attention_input(side=96)
    matrix_mib = (96 * 96) ** 2 * 4 / 2 ** 20
    with torch.inference_mode():
        block(x[..., :8, :8])  # first-call allocations (thread pools, kernels) outside the measurement
        with PeakMemory(torch.device("cpu")) as mem:
            out = block(x)
    assert out.shape == x.shape
    assert mem.mib < matrix_mib / 4, f"peak {mem.mib:.0f} MiB for a {matrix_mib:.0f} MiB attention matrix"


def test_attention_matches_a_plain_softmax_reference():
    """The matrix-product form of the 1x1 convs computes the original attention (softmax(q k^T / sqrt(C)) v)."""
    block, x = _attention_input(side=8)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, N)
        w = torch.softmax(q.transpose(1, 2) @ k / q.shape[1] ** 0.5, dim=-1)  # (B, N, N)
        ref = x + block.proj_out((v @ w.transpose(1, 2)).reshape(x.shape))
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)
        cl = x.contiguous(memory_format=torch.channels_last)
        assert block(cl).is_contiguous(memory_format=torch.channels_last) and block(x).is_contiguous()


# ---------------------------------------------------------------------- the last blend (decoder option last_blend)
SEAM_FREE = ("none", "feather")


def test_explicit_hard_last_blend_is_the_papers_decoder_against_diffusers(tmp_path):
    """``last_blend: hard`` (the default) computes what diffusers' AsymmetricAutoencoderKL computes on the same
    weights: the released decoders decode as before the option existed."""
    pytest.importorskip("diffusers")
    import diffusers

    from ldm.checkpoints.diffusers import write_diffusers_folder
    from tests.checkpoints.test_interop import assert_same_model, randomize_
    from tests.conftest import TINY_DDCONFIG

    overrides = {"num_res_blocks": 2, "condition": True, "last_blend": "hard"}
    torch.manual_seed(0)
    from ldm.models.autoencoder import AutoencoderKL
    ours = randomize_(AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4,
                                    decoder_overrides=overrides), 0)
    default = AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4,
                            decoder_overrides={"num_res_blocks": 2, "condition": True}).eval()
    default.load_state_dict(ours.state_dict())
    folder = write_diffusers_folder(ours.state_dict(), TINY_DDCONFIG, overrides, tmp_path / "vae")
    assert_same_model(ours, diffusers.AsymmetricAutoencoderKL.from_pretrained(folder).eval(), 32, condition=True)
    z, x, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(ours.decode(z, x, mask), default.decode(z, x, mask))


def _with_last_blend(last_blend: str, base=None):
    """The tiny autoencoder with ``last_blend``, holding ``base``'s weights (the option adds none)."""
    model = make_autoencoder(last_blend=last_blend)
    if base is not None:
        model.load_state_dict(base.state_dict())
    return model


def test_last_blend_options_load_the_same_weights_and_change_only_the_last_level(tiny_autoencoder):
    z, x, mask = _inputs()
    with torch.no_grad():
        hard = tiny_autoencoder.decode(z, x, mask)
        outs = {lb: _with_last_blend(lb, tiny_autoencoder).decode(z, x, mask) for lb in SEAM_FREE}
    assert (outs["none"] - hard).abs().max() > 1e-3 and (outs["feather"] - outs["none"]).abs().max() > 1e-3


@pytest.mark.parametrize("last_blend", SEAM_FREE)
def test_seam_free_all_ones_mask_equals_no_prior(last_blend):
    model = _with_last_blend(last_blend)
    z, x, _ = _inputs()
    ones = torch.ones(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.decode(z, x, ones), model.decode(z))


@pytest.mark.parametrize("last_blend", SEAM_FREE)
def test_seam_free_never_reads_the_hole_and_is_deterministic(last_blend):
    model = _with_last_blend(last_blend)
    again = _with_last_blend(last_blend)  # the same seed: the same weights
    z, x, mask = _inputs()
    x2 = torch.where(mask.bool(), torch.rand_like(x), x)  # change only pixels under the hole
    with torch.no_grad():
        out = model.decode(z, x, mask)
        assert torch.equal(out, model.decode(z, x2, mask))
        assert torch.equal(out, again.decode(z, x, mask))


def test_feather_kept_region_invariant(tiny_autoencoder):
    """``feather``: a kept pixel farther than ``feather_px`` from the hole is the branch's alone (it does not depend
    on the latent); the hole and the kept pixels next to it are the decoder's own output (``last_blend: none``)
    exactly; in between, a blend of the two."""
    from ldm.modules.diffusionmodules.condition import feather_mask

    feather = _with_last_blend("feather", tiny_autoencoder)
    none = _with_last_blend("none", tiny_autoencoder)
    z, x, mask = _inputs()
    px = feather.decoder.feather_px
    w = feather_mask(mask, px).expand(-1, 3, -1, -1)
    with torch.no_grad():
        out = feather.decode(z, x, mask)
        other_z = feather.decode(torch.randn_like(z), x, mask)
        own = none.decode(z, x, mask)
    far = w == 0
    assert far.any() and torch.equal(out[far], other_z[far])
    assert (out[~far] - other_z[~far]).abs().max() > 1e-3
    near = w == 1  # the hole and its 1 px kept rim
    assert near.sum() > mask.sum() * 3 and torch.equal(out[near], own[near])
    ramp = (w > 0) & (w < 1)
    assert ramp.any() and (out[ramp] - own[ramp]).abs().max() > 1e-4


def test_feather_mask_ramp_against_a_distance_transform():
    """The ramp (px - d + 1) / px over the chessboard distance d to the hole, against OpenCV's distance
    transform."""
    import cv2
    import numpy as np

    from ldm.modules.diffusionmodules.condition import feather_mask

    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(1, 1, 40, 48, generator=g) > 0.97).float()
    mask[..., 10:20, 5:30] = 1
    d = cv2.distanceTransform((1 - mask[0, 0].numpy()).astype(np.uint8), cv2.DIST_C, 3)
    for px in (1, 3, 6):
        expected = np.clip((px - d + 1) / px, 0, 1)
        expected[mask[0, 0].numpy() == 1] = 1
        np.testing.assert_allclose(feather_mask(mask, px)[0, 0].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("last_blend", SEAM_FREE)
def test_seam_free_gradients_reach_every_decoder_weight(last_blend):
    model = _with_last_blend(last_blend)
    model.train()
    z, x, mask = _inputs()
    model.decode(z, x, mask).square().mean().backward()
    missing = [n for n, p in model.decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("overrides, message", [({"last_blend": "soft"}, "last_blend must be one of"),
                                                ({"last_blend": "feather", "feather_px": 0}, "feather_px")])
def test_bad_last_blend_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_autoencoder(**overrides)


def test_a_seam_free_decoder_is_not_converted_to_diffusers(tmp_path):
    """diffusers' MaskConditionDecoder has only the paper's last level: a converted ``feather`` decoder would decode
    otherwise there, so the conversion is refused, naming the option."""
    from ldm.checkpoints.diffusers import write_diffusers_folder
    from ldm.checkpoints.files import CheckpointError
    from tests.conftest import TINY_DDCONFIG

    model = _with_last_blend("feather")
    with pytest.raises(CheckpointError, match="last_blend"):
        write_diffusers_folder(model.state_dict(), TINY_DDCONFIG, {"condition": True, "last_blend": "feather"},
                               tmp_path / "vae")
    assert not (tmp_path / "vae").exists()
