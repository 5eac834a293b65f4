"""LDM's own formulation of the generator loss, kept as the baseline that ``LPIPSWithDiscriminator`` is checked
against (tests/training/test_training.py: the same gradients) and timed against (scripts/benchmark.py's ``ldm`` training
rows). It lives in the package, not in the tests, because the benchmark runs from an installed checkout where
``tests/`` is not importable."""
from __future__ import annotations

import torch


def ldm_generator_loss(loss, x, rec, posterior, last_layer) -> torch.Tensor:
    """The generator loss as LDM's ``LPIPSWithDiscriminator`` computes it (discriminator active): ``autograd.grad``
    of nll and g down to the last layer for the adaptive weight, and the whole loss returned for a second, full
    backward (``LPIPSWithDiscriminator.generator_loss`` differentiates LPIPS and the discriminator once)."""
    rec_loss = torch.abs(x - rec) + loss.perceptual_weight * loss.perceptual_loss(x, rec)
    nll = torch.sum(rec_loss / torch.exp(loss.logvar) + loss.logvar) / rec_loss.shape[0]
    g = -torch.mean(loss.discriminator(rec))
    nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0, 1e4).detach() * loss.discriminator_weight
    kl = posterior.kl().sum() / posterior.kl().shape[0]
    return nll + loss.kl_weight * kl + d_weight * loss.disc_factor * g
