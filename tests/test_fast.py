"""ldm.fast: the fast decode path stays within a stated bound of the exact float32 decode (bfloat16 and
channels_last on CPU, on the tiny model), leaves the exact path untouched, and picks its settings by device."""
from __future__ import annotations

import pytest
import torch

from ldm import fast
from ldm.fast import EXACT, FastDecode, FastSettings
from ldm.measure import psnr_8bit
from tests.conftest import make_autoencoder

# Stated bounds of the fast path against float32 (tiny model, random weights, outputs of magnitude ~1): bfloat16
# keeps 8 significant bits, so an 8-bit image may move by a level or two in places.
BF16_MIN_PSNR_DB = 40.0
BF16_MAX_ABS = 0.05
FP32_CHANNELS_LAST_MAX_ABS = 1e-5


def inputs(model, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = model.downsample_factor
    z = torch.randn(2, 4, size // f, size // f, generator=g)
    image = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, size, size)
    mask[..., size // 4: 3 * size // 4, : size // 2] = 1
    return z, image, mask


@pytest.mark.parametrize("settings, min_psnr, max_abs", [
    (FastSettings(torch.bfloat16, channels_last=True), BF16_MIN_PSNR_DB, BF16_MAX_ABS),
    (FastSettings(torch.bfloat16, channels_last=False), BF16_MIN_PSNR_DB, BF16_MAX_ABS),
    (FastSettings(torch.float32, channels_last=True), 60.0, FP32_CHANNELS_LAST_MAX_ABS),
])
def test_fast_path_stays_within_its_bound_of_float32(settings, min_psnr, max_abs):
    model = make_autoencoder(condition=True)
    z, image, mask = inputs(model)
    with torch.inference_mode():
        exact = model.decode(z, image, mask)
    fd = FastDecode(model, "cpu", settings=settings)
    assert model.decoder.conv_in.weight.dtype == settings.dtype
    assert model.encoder.conv_in.weight.dtype == torch.float32  # only the decoder side is converted
    with torch.inference_mode():
        out = fd.decode(z, image, mask)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert (out - exact).abs().max() <= max_abs * exact.abs().max()
    assert psnr_8bit(out, exact) >= min_psnr
    # kept pixels still come from the image path: a change in the generated region's input leaves them alone
    changed = image.clone()
    changed[mask.expand_as(image) == 1] = 0.5
    with torch.inference_mode():
        assert torch.equal(fd.decode(z, changed, mask), out)


def test_encode_works_beside_a_bf16_decoder():
    """The encoder stays float32 when the decoder side is converted: encode checks its input against its own
    weights (it checked against the decoder's and refused float32 images)."""
    model = make_autoencoder(condition=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        reference = model.encode(x).mean
        fd = FastDecode(model, "cpu", settings=FastSettings(torch.bfloat16, channels_last=True))
        posterior = model.encode(x)
        assert torch.equal(posterior.mean, reference)
        assert fd.decode(posterior.mode(), x, torch.ones(1, 1, 32, 32)).shape == x.shape


def test_exact_path_leaves_the_model_untouched():
    model = make_autoencoder(condition=True)
    z, image, mask = inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fd = FastDecode(model, "cpu", enabled=False)
    assert fd.settings == EXACT
    with torch.inference_mode():
        assert torch.equal(fd.decode(z, image, mask), model.decode(z, image, mask))
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and after[k].is_contiguous() and torch.equal(after[k], v)
               for k, v in before.items())


def test_settings_follow_the_cpu(monkeypatch):
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: True)
    assert fast.fast_settings(torch.device("cpu")) == FastSettings(torch.bfloat16, channels_last=True)
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: False)
    assert fast.fast_settings(torch.device("cpu")) == FastSettings(torch.float32, channels_last=True)
    assert fast.fast_settings(torch.device("cpu"), enabled=False) == EXACT


def test_regional_compile_keeps_keys_and_outputs():
    """compile_blocks wraps each block (and the head) in place: same state-dict keys, same outputs. The "eager"
    backend checks the wrapping without paying for code generation on CPU."""
    model = make_autoencoder(condition=True)
    z, image, mask = inputs(model)
    keys = list(model.state_dict())
    with torch.inference_mode():
        exact = model.decode(z, image, mask)
    regions = fast.compile_blocks(model.decoder, backend="eager")
    assert regions == 2 * 2 + 2 + 1 + 1 + 1  # up blocks (2 per level), mid blocks, mid attention, upsample, head
    assert list(model.state_dict()) == keys
    with torch.inference_mode():
        assert torch.allclose(model.decode(z, image, mask), exact, atol=1e-6)
