"""The autoencoder training loss of LDM / the paper: L1 + LPIPS, learned log-variance, KL, PatchGAN.

Images are (B,3,H,W) in [-1, 1]. Formulas (docs/design.md, *Training recipe*), computed on the whole image:

    rec = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)     # LPIPS (B,1,1,1) broadcast over C,H,W
    nll = sum(rec / exp(logvar) + logvar) / B
    kl  = sum(posterior.kl()) / B
    g   = -mean(D(x_hat))
    d_w = clamp(|grad_last nll| / (|grad_last g| + 1e-4), 0, 1e4) * disc_weight
    L_G = nll + kl_weight * kl + d_w * disc_factor * [step >= disc_start] * g
    L_D = disc_factor * [step >= disc_start] * disc_loss(D(x), D(x_hat))   # hinge or vanilla

The generator and discriminator parts are separate methods so that one encoder/decoder forward serves both
updates of a training step. In a training step the gradients of ``nll`` and ``g`` with respect to the reconstruction
are taken once each: they give ``d_w`` (carried through the last layer alone) and, summed, the gradient that the
returned loss sends into the decoder, so LPIPS and the discriminator are differentiated once per step where the
original code differentiated them twice (``autograd.grad`` down to the last layer, then the full backward again).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from taming.modules.losses.vqperceptual import hinge_d_loss, vanilla_d_loss
from torch import nn

from ...modules.mask_edges import edge_band

log = logging.getLogger(__name__)

# torchvision's ImageNet VGG16 (the LPIPS trunk); lpips/taming fetch it into torch hub's cache on first use.
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# indices of torchvision's vgg16().features that lpips groups into slice1..slice5
_LPIPS_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def default_vgg16_path() -> Path:
    """Where torchvision keeps the VGG16 weights: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def build_lpips(vgg_path: Optional[Union[str, Path]] = None) -> nn.Module:
    """LPIPS(VGG) of the ``lpips`` package, frozen, loaded without network access and with weights-only reads.

    The linear calibration layers ship inside the ``lpips`` package; the VGG16 trunk is read from ``vgg_path``
    (default :func:`default_vgg16_path`). A missing trunk file is an error naming the file and where to put it,
    instead of the silent download the upstream packages attempt.
    """
    import lpips

    vgg_path = Path(vgg_path) if vgg_path is not None else default_vgg16_path()
    if not vgg_path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs torchvision's ImageNet VGG16 weights, not found at {vgg_path}. Download {VGG16_URL} and "
            f"put it there as {VGG16_FILE} (or set lossconfig.params.vgg_path), or train without the perceptual "
            "loss with lossconfig.params.perceptual_weight: 0.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation notice for pretrained=
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    lins = torch.load(lin_path, map_location="cpu", weights_only=True)
    trunk = torch.load(vgg_path, map_location="cpu", weights_only=True)
    if isinstance(trunk, dict) and "state_dict" in trunk:
        trunk = trunk["state_dict"]
    renamed = {}
    for slice_idx, layers in _LPIPS_SLICES:
        for i in layers:
            for name in ("weight", "bias"):
                key = f"features.{i}.{name}"
                if key in trunk:
                    renamed[f"net.slice{slice_idx}.{i}.{name}"] = trunk[key]
    expected = {k for k in model.state_dict() if k.startswith("net.")}
    if set(renamed) != expected:
        raise ValueError(f"{vgg_path}: not a torchvision VGG16 state dict (missing "
                         f"{sorted(expected - set(renamed))[:4]} ...)")
    model.load_state_dict({**renamed, **lins}, strict=False)
    # lpips registers the calibration layers twice (lin0..lin4 and the list lins.*, same tensors); the file has lin*
    missing = {k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins.")} - set(lins)
    if missing:
        raise ValueError(f"{lin_path}: LPIPS linear layers incomplete, missing {sorted(missing)}")
    model.requires_grad_(False)
    return model.eval()


class LPIPSWithDiscriminator(nn.Module):
    """LDM's ``LPIPSWithDiscriminator`` with the generator / discriminator halves split.

    Args (the original names): ``disc_start`` first step of the GAN terms; ``logvar_init`` initial learned
    log-variance (a parameter that no optimizer of the paper's recipe updates); ``kl_weight``;
    ``pixelloss_weight`` accepted for old configs (the L1 term always has weight 1, as in LDM);
    ``disc_num_layers`` / ``disc_in_channels`` / ``use_actnorm`` PatchGAN shape; ``disc_factor``;
    ``disc_weight`` scale of the adaptive weight; ``perceptual_weight`` (0 skips LPIPS and needs no VGG file);
    ``disc_loss`` "hinge" or "vanilla"; ``vgg_path`` the VGG16 file for LPIPS (default in torch hub's cache).

    Not in the paper (off by default, which is the paper's loss bit for bit): ``boundary_weight`` w > 0 multiplies
    the L1 term by ``1 + w`` at the pixels within ``boundary_px`` pixels (chessboard distance) of the mask edge, on
    both sides (:func:`ldm.modules.mask_edges.edge_band`), so that training looks harder at the seam between kept
    and generated pixels, where the decoder's last layers mix the condition branch's features with its own. It needs
    the mask (``generator_loss(..., mask=)``); samples without a kept region (all-ones mask) have no edge and keep
    weight 1.
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_loss: str = "hinge", vgg_path: Optional[str] = None,
                 boundary_weight: float = 0.0, boundary_px: int = 2):
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if not boundary_weight >= 0:
            raise ValueError(f"boundary_weight must be >= 0, got {boundary_weight!r}")
        if isinstance(boundary_px, bool) or not isinstance(boundary_px, int) or boundary_px < 1:
            raise ValueError(f"boundary_px must be an integer >= 1, got {boundary_px!r}")
        self.boundary_weight = float(boundary_weight)
        self.boundary_px = boundary_px
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = build_lpips(vgg_path) if perceptual_weight > 0 else None
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def train(self, mode: bool = True) -> "LPIPSWithDiscriminator":
        super().train(mode)
        if self.perceptual_loss is not None:
            # LPIPS is a fixed metric: its dropout layers must not switch on with the model's train()
            self.perceptual_loss.eval()
        return self

    def gan_factor(self, global_step: int) -> float:
        """``disc_factor`` from ``disc_start`` on, 0 before (taming's ``adopt_weight``)."""
        return self.disc_factor if global_step >= self.discriminator_iter_start else 0.0

    def calculate_adaptive_weight(self, nll_grads: torch.Tensor, g_grads: torch.Tensor) -> torch.Tensor:
        """Balance the GAN gradient against the reconstruction gradient, both taken at the decoder's last layer."""
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    @property
    def forward_keys(self) -> Tuple[str, ...]:
        """What the training step passes besides images and posterior (as sgm's losses declare theirs): the mask
        (B,1,H,W), 1 = generate, only with ``boundary_weight`` > 0, so losses of the original signature work."""
        return ("mask",) if self.boundary_weight > 0 else ()

    def reconstruction_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``rec`` per pixel: L1 (times ``1 + boundary_weight`` in the mask edge's band, when set) plus the weighted
        LPIPS distance (B,1,1,1), broadcast."""
        rec_loss = torch.abs(inputs - reconstructions)
        if "mask" in self.forward_keys:
            if mask is None:
                raise ValueError("boundary_weight > 0 needs the mask: call generator_loss(..., mask=mask)")
            band = edge_band(mask, self.boundary_px)
            rec_loss = rec_loss * (1 + self.boundary_weight * band).to(rec_loss.dtype)
        if self.perceptual_loss is not None:
            rec_loss = rec_loss + self.perceptual_weight * self.perceptual_loss(inputs, reconstructions)
        return rec_loss

    def nll(self, rec_loss: torch.Tensor) -> torch.Tensor:
        return torch.sum(rec_loss / torch.exp(self.logvar) + self.logvar) / rec_loss.shape[0]

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors,
                       global_step: int, last_layer: Optional[torch.Tensor] = None,
                       split: str = "train", mask: Optional[torch.Tensor] = None,
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``L_G`` and its parts for logging. ``posteriors``: the encoder's DiagonalGaussianDistribution; ``mask``
        (B,1,H,W), 1 = generate, is read only with ``boundary_weight`` > 0.

        The adaptive weight needs a graph to ``last_layer``; without one (validation) it is 0, as in LDM.
        Before ``disc_start`` the discriminator is not run at all: its term is multiplied by 0 anyway.
        With the adaptive weight, the returned loss has the value of ``L_G`` and its exact gradient, but its graph
        starts at the reconstruction: what lies above it (LPIPS, the discriminator) has already been differentiated.
        """
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        disc_factor = self.gan_factor(global_step)
        zero = torch.zeros((), device=inputs.device)
        adaptive = (disc_factor > 0 and last_layer is not None and torch.is_grad_enabled()
                    and reconstructions.requires_grad)
        if adaptive:
            # d nll / d rec and d g / d rec, each through LPIPS or the discriminator once
            leaf = reconstructions.detach().requires_grad_()
            rec_loss = self.reconstruction_loss(inputs, leaf, mask)
            nll_loss = self.nll(rec_loss)
            g_loss = -torch.mean(self.discriminator(leaf))
            nll_rec_grad, = torch.autograd.grad(nll_loss, leaf)
            g_rec_grad, = torch.autograd.grad(g_loss, leaf)
            # the same gradients at the last layer: a backward through the layers between it and the output only
            nll_grads, = torch.autograd.grad(reconstructions, last_layer, nll_rec_grad, retain_graph=True)
            g_grads, = torch.autograd.grad(reconstructions, last_layer, g_rec_grad, retain_graph=True)
            d_weight = self.calculate_adaptive_weight(nll_grads, g_grads)
            rec_grad = nll_rec_grad + (d_weight * disc_factor).to(g_rec_grad.dtype) * g_rec_grad
            # value 0, gradient: rec_grad into the decoder and d nll / d logvar into the log-variance
            carrier = torch.sum(reconstructions * rec_grad, dtype=torch.float32) + self.nll(rec_loss.detach())
            loss = (nll_loss.detach() + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss.detach()
                    + (carrier - carrier.detach()))
        else:
            rec_loss = self.reconstruction_loss(inputs, reconstructions, mask)
            nll_loss = self.nll(rec_loss)
            g_loss, d_weight = zero, zero
            if disc_factor > 0:
                g_loss = -torch.mean(self.discriminator(reconstructions))
            loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log_dict = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor)),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log_dict

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           split: str = "train") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``L_D`` on the real images and the (detached) reconstructions."""
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        d_loss = self.gan_factor(global_step) * self.disc_loss(logits_real, logits_fake)
        log_dict = {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log_dict

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors, optimizer_idx: int,
                global_step: int, last_layer: Optional[torch.Tensor] = None,
                split: str = "train") -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The original call signature: ``optimizer_idx`` 0 = generator loss, 1 = discriminator loss."""
        if optimizer_idx == 0:
            return self.generator_loss(inputs, reconstructions, posteriors, global_step, last_layer, split)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step, split)
        raise ValueError(f"optimizer_idx must be 0 (generator) or 1 (discriminator), got {optimizer_idx}")
