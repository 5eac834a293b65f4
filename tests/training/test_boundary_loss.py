"""The seam fix, a recipe option off by default: ``LPIPSWithDiscriminator(boundary_weight=w, boundary_px=r)`` weights
the L1 term by ``1 + w`` within ``r`` px of the mask edge. Off, the loss and a training step are those of the paper;
on, the weights are the ones a brute-force numpy band gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.mask_edges import edge_band as boundary_band


def _band_numpy(mask: np.ndarray, r: int) -> np.ndarray:
    """1 where the (2r+1)^2 window around a pixel, cut at the border, holds both mask values."""
    m = mask >= 0.5
    h, w = m.shape
    out = np.zeros((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            win = m[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
            out[y, x] = float(win.any() and not win.all())
    return out


def _data(seed=0, size=20):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    y = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, 5:12, 3:9] = 1  # a box
    mask[1, :, :, 14:] = 1  # a hole along the right border: no edge at the border itself
    post = DiagonalGaussianDistribution(torch.randn(2, 8, 2, 2, generator=g) * 0.5)
    return x, y, mask, post


@pytest.mark.parametrize("r", [1, 3])
def test_boundary_band_matches_brute_force(r):
    _, _, mask, _ = _data()
    band = boundary_band(mask, r)
    for i in range(2):
        np.testing.assert_array_equal(band[i, 0].numpy(), _band_numpy(mask[i, 0].numpy(), r))
    assert not boundary_band(torch.ones(1, 1, 8, 8), 2).any() and not boundary_band(torch.zeros(1, 1, 8, 8), 2).any()


def test_off_is_the_papers_loss_bit_for_bit():
    x, y, mask, post = _data()
    paper = LPIPSWithDiscriminator(disc_start=100, kl_weight=1e-6, perceptual_weight=0)
    off = LPIPSWithDiscriminator(disc_start=100, kl_weight=1e-6, perceptual_weight=0, boundary_weight=0.0)
    a, _ = paper.generator_loss(x, y, post, global_step=0)
    b, _ = off.generator_loss(x, y, post, global_step=0, mask=mask)
    assert a.item() == b.item() == (torch.abs(x - y).sum() / 2).item()


def test_on_weights_l1_in_the_band_only():
    x, y, mask, post = _data()
    w, r = 4.0, 2
    loss = LPIPSWithDiscriminator(disc_start=100, kl_weight=0.0, perceptual_weight=0, boundary_weight=w,
                                  boundary_px=r)
    total, logs = loss.generator_loss(x, y, post, global_step=0, mask=mask)
    band = np.stack([_band_numpy(mask[i, 0].numpy(), r) for i in range(2)])[:, None]
    expected = (np.abs((x - y).numpy().astype(np.float64)) * (1 + w * band)).sum() / 2
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # an all-ones mask (a sample without condition) has no edge: the unweighted loss
    ones, _ = loss.generator_loss(x, y, post, global_step=0, mask=torch.ones_like(mask))
    assert ones.item() == pytest.approx((torch.abs(x - y).sum() / 2).item(), rel=1e-6)
    # the gradient reaches the band pixels w + 1 times as strongly
    y = y.clone().requires_grad_()
    loss.generator_loss(x, y, post, global_step=0, mask=mask)[0].backward()
    ratio = (y.grad.abs() * 2).numpy()  # |d nll / d y| = weight / B
    np.testing.assert_allclose(ratio, np.broadcast_to(1 + w * band, ratio.shape), rtol=1e-6)


def test_on_needs_the_mask_and_checks_its_arguments():
    x, y, _, post = _data()
    loss = LPIPSWithDiscriminator(disc_start=100, perceptual_weight=0, boundary_weight=1.0)
    with pytest.raises(ValueError, match="needs the mask"):
        loss.generator_loss(x, y, post, global_step=0)
    with pytest.raises(ValueError, match="boundary_weight"):
        LPIPSWithDiscriminator(disc_start=100, perceptual_weight=0, boundary_weight=-1.0)
    with pytest.raises(ValueError, match="boundary_px"):
        LPIPSWithDiscriminator(disc_start=100, perceptual_weight=0, boundary_px=0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_model_passes_the_mask_only_when_the_option_is_on(tiny_ddconfig):
    """The model hands the batch's mask to a loss that asks for it (training_step and validation_step share
    ``_loss_mask``); with the option off the call is the paper's."""
    from ldm.models.autoencoder import AutoencoderKL

    seen = []

    def build(weight):
        lossconfig = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                      "params": {"disc_start": 100, "perceptual_weight": 0, "boundary_weight": weight}}
        model = AutoencoderKL(ddconfig=tiny_ddconfig, lossconfig=lossconfig, embed_dim=4,
                              decoder_overrides={"condition": True})
        original = model.loss.generator_loss
        model.loss.generator_loss = lambda *a, **k: seen.append(k.get("mask")) or original(*a, **k)
        return model

    x, _, mask, _ = _data(size=tiny_ddconfig["resolution"])
    for weight in (0.0, 2.0):
        model = build(weight)
        model.on_validation_epoch_start()
        with torch.no_grad():
            model.validation_step({"image": x, "mask": mask}, 0)
    assert seen[0] is None and seen[1] is mask


def test_edge_pixels_are_the_pixels_with_a_neighbour_across_the_edge():
    """The one definition of the mask edge (ldm.modules.mask_edges.edge_pixels) against a numpy loop."""
    from ldm.modules.mask_edges import edge_pixels

    _, _, mask, _ = _data()
    m = mask[:, 0].numpy() >= 0.5
    want = np.zeros_like(m)
    for b, y, x in np.ndindex(*m.shape):
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < m.shape[1] and 0 <= xx < m.shape[2] and m[b, yy, xx] != m[b, y, x]:
                want[b, y, x] = True
    np.testing.assert_array_equal(edge_pixels(mask[:, 0]).numpy(), want)
    np.testing.assert_array_equal(edge_pixels(mask)[:, 0].numpy(), want)  # (B,1,H,W) too
    assert not edge_pixels(torch.ones(1, 8, 8)).any()
