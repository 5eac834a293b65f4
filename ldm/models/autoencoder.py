"""``AutoencoderKL``: SD's frozen KL-f8 encoder with the paper's trainable (asymmetric) decoder.

One LightningModule for every variant. The variant lives in the config: ``ddconfig`` describes the encoder (and the
decoder, as in Stable Diffusion); ``decoder_overrides`` changes the decoder alone (``ch``, ``num_res_blocks``,
``condition``), the slot the original code lacked and filled with a copied file per variant.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
from torch import nn

from ..checkpoints.autoencoder_weights import load_autoencoder_weights
from ..checkpoints.files import PathLike
from ..checkpoints.tensors import UNUSED_PREFIXES
from ..image_io import check_finite
from ..latent_spaces import PatchBatchNorm, PerChannel, ScaleShift, normalization_from_params
from ..modules.diffusionmodules.model import ENCODER_ONLY_KEYS, Decoder, Encoder
from ..modules.diffusionmodules.qwenimage import QwenImageDecoder, QwenImageEncoder
from ..modules.diffusionmodules.tiling import tiled_decode
from ..modules.distributions.distributions import DiagonalGaussianDistribution
from ..training.recipe import TrainingRecipe
from ..util import check_params, instantiate_from_config

log = logging.getLogger(__name__)
# the networks of ldm.latent_spaces.ARCHITECTURES: (encoder, decoder)
NETWORKS = {"kl": (Encoder, Decoder), "qwenimage": (QwenImageEncoder, QwenImageDecoder)}
NOT_A_DIFFUSERS_VAE = ("this AutoencoderKL is not a diffusers VAE (pipe.vae = decoder): keep the pipeline's own VAE "
                       "and call ldm.integrations.diffusers_pipelines.inpaint(pipe, decoder, image, mask_image, ...), "
                       "which decodes the pipeline's latents with the image and mask (docs/pipelines.md)")


class AutoencoderKL(TrainingRecipe, pl.LightningModule):
    """Frozen encoder + trainable decoder.

    Args:
        ddconfig: encoder/decoder hyper-parameters of SD's ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``,
            ``z_channels``, ``double_z``, ...).
        lossconfig: ``target``/``params`` of the training loss; ``torch.nn.Identity`` for inference.
        embed_dim: latent channels (4 for SD).
        decoder_overrides: merged over ``ddconfig`` for the decoder only, e.g. ``{ch: 256, num_res_blocks: 5,
            condition: true}`` for large 2x. ``condition`` switches the condition branch.
        pretrained_lr_factor: learning-rate factor of the decoder's pretrained part (the condition branch trains
            at the full rate). The paper's base recipe uses 0.1, the large ones 1.0.
        ckpt_path / ignore_keys: weights to start from (any format of :mod:`ldm.checkpoints.keys`; a full SD checkpoint
            gives its ``first_stage_model``); key prefixes in ``ignore_keys`` keep their fresh initialisation.
        image_key / mask_key: batch entries of the image (B,3,H,W) in [-1,1] and the mask (B,1,H,W), 1 = generate.
        scheduler_config / scheduler_config_d: LR schedules of the decoder and discriminator optimizers.
        num_gpus, colorize_nlabels: accepted for the original configs and ignored (the schedule length comes from
            the trainer).
        train_encoder: also train encoder, ``quant_conv`` and ``post_quant_conv`` (a plain KL autoencoder trained
            from scratch, e.g. stage 1 of the demo); the paper's recipe keeps them frozen (default).
        use_quant_conv: build the 1x1 ``quant_conv`` / ``post_quant_conv`` around the latent (SD 1.x/2.x, SDXL).
            SD 3.x and FLUX.1 VAEs have neither: their latent is the encoder's output itself (then ``embed_dim``
            must equal ``z_channels``), and their checkpoints carry no such keys.
        scaling_factor / shift_factor: the latent space's normalisation used by the diffusion model, see
            :meth:`scale_latents`. SD 1.x/2.x 0.18215 / 0 (the default), SDXL 0.13025 / 0, SD 3.x 1.5305 / 0.0609,
            FLUX.1 0.3611 / 0.1159.
        latents_mean / latents_std: one mean and std per latent channel (a diffusers VAE config's entries of these
            names, e.g. Playground v2.5): normalisation ``(z - mean) * scaling_factor / std``; ``shift_factor`` 0.
        architecture: ``kl`` (SD's KL-f8 encoder / decoder, the default) or ``qwenimage`` (Qwen-Image's / Wan-2.1's VAE
            at T = 1, :mod:`ldm.modules.diffusionmodules.qwenimage`; ``ddconfig`` with the same keys).
        latent_batch_norm: ``{patch_size: 2, batch_norm_eps: 1e-4}`` for FLUX.2: the model holds a ``bn``
            BatchNorm2d over the ``patch_size**2 * embed_dim`` channels of patchified latents whose running
            statistics (``bn.running_mean`` / ``bn.running_var``, from the checkpoint) normalise the latents; no
            scale or shift (``scaling_factor`` 1, ``shift_factor`` 0). See :mod:`ldm.latent_spaces`.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: int,
                 decoder_overrides: Optional[Mapping[str, Any]] = None, pretrained_lr_factor: float = 1.0,
                 ckpt_path: Optional[PathLike] = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 mask_key: str = "mask", monitor: Optional[str] = None,
                 scheduler_config: Optional[Mapping[str, Any]] = None,
                 scheduler_config_d: Optional[Mapping[str, Any]] = None,
                 num_gpus: Optional[int] = None, colorize_nlabels: Optional[int] = None,
                 train_encoder: bool = False, use_quant_conv: bool = True,
                 scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None,
                 latents_mean: Optional[Sequence[float]] = None, latents_std: Optional[Sequence[float]] = None,
                 latent_batch_norm: Optional[Mapping[str, Any]] = None, architecture: str = "kl"):
        super().__init__()
        # one forward per step feeds both the decoder and the discriminator update (see training_step)
        self.automatic_optimization = False
        # micro-batches per optimizer step; Lightning refuses its own accumulation with manual optimization, so
        # main.py moves lightning.trainer.accumulate_grad_batches here (see training_step)
        self.accumulate_grad_batches = 1
        self.train_encoder = bool(train_encoder)
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("ddconfig.double_z must be true: the KL autoencoder predicts mean and log-variance")
        self.image_key = image_key
        self.mask_key = mask_key
        self.input_memory_format = torch.contiguous_format  # ldm.fast.fast_training sets channels_last
        self.embed_dim = embed_dim
        self._init_latent_normalization(dict(scaling_factor=scaling_factor, shift_factor=shift_factor,
                                             latents_mean=latents_mean, latents_std=latents_std,
                                             latent_batch_norm=latent_batch_norm))
        self.pretrained_lr_factor = float(pretrained_lr_factor)
        self.scheduler_config = scheduler_config
        self.scheduler_config_d = scheduler_config_d
        if num_gpus is not None or colorize_nlabels is not None:
            log.info("num_gpus / colorize_nlabels are accepted for old configs and ignored")

        if architecture not in NETWORKS:
            raise ValueError(f"architecture must be one of {', '.join(NETWORKS)}, got {architecture!r}")
        self.architecture = architecture
        encoder_cls, decoder_cls = NETWORKS[architecture]
        check_params(encoder_cls, ddconfig, "ddconfig")
        self.encoder = encoder_cls(**ddconfig)
        self.decoder_config = {k: v for k, v in {**ddconfig, **dict(decoder_overrides or {})}.items()
                               if k not in ENCODER_ONLY_KEYS}
        check_params(decoder_cls, self.decoder_config, "decoder_overrides over ddconfig")
        self.decoder = decoder_cls(**self.decoder_config)
        self.loss = instantiate_from_config(lossconfig)
        self.use_quant_conv = bool(use_quant_conv)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(embed_dim, self.decoder_config["z_channels"], 1)
        else:
            z_dec = self.decoder_config["z_channels"]
            if not embed_dim == ddconfig["z_channels"] == z_dec:
                raise ValueError(f"use_quant_conv false: embed_dim ({embed_dim}) must equal ddconfig.z_channels "
                                 f"({ddconfig['z_channels']}) and the decoder's z_channels ({z_dec}), since no 1x1 "
                                 "conv maps between them")
            self.quant_conv = self.post_quant_conv = None
        # pixels per latent pixel along each side
        self.downsample_factor = 2 ** (len(self.decoder_config["ch_mult"]) - 1)
        self._tiling: Optional[Tuple[int, int]] = None  # (tile, overlap) in image pixels; see enable_tiling
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

        # The paper's recipe: SD's encoder side stays frozen, only the decoder (and discriminator) train.
        for module in self.encoder_side():
            module.requires_grad_(self.train_encoder)

    def encoder_side(self) -> List[nn.Module]:
        """The modules before the latent (frozen in the paper's recipe): encoder and, if built, both quant convs."""
        return [m for m in (self.encoder, self.quant_conv, self.post_quant_conv) if m is not None]

    # ------------------------------------------------------------------ latent space
    def _init_latent_normalization(self, params: Mapping[str, Any]) -> None:
        """``latent_norm``: the one normalisation object the params describe (:mod:`ldm.latent_spaces`), and for
        FLUX.2's a ``bn`` BatchNorm2d that holds its statistics."""
        norm = normalization_from_params(params)
        if isinstance(norm, PerChannel) and len(norm.mean) != self.embed_dim:
            raise ValueError(f"latents_mean / latents_std need one value per latent channel ({self.embed_dim}), "
                             f"got {len(norm.mean)} / {len(norm.std)}")
        self.latent_norm = norm
        self.bn: Optional[nn.BatchNorm2d] = None
        if isinstance(norm, PatchBatchNorm):
            # BFL's and diffusers' module and key names (bn.running_mean / running_var / num_batches_tracked); its
            # statistics come from the checkpoint and are only read (scale_latents), never updated by a forward
            self.bn = nn.BatchNorm2d(norm.patch_size ** 2 * self.embed_dim, eps=norm.eps, affine=False,
                                     track_running_stats=True)
            self.bn.requires_grad_(False)

    @property
    def latent_normalization(self) -> str:
        """The kind of :attr:`latent_norm`: one of :data:`ldm.latent_spaces.NORMALIZATIONS`."""
        return self.latent_norm.kind

    @property
    def scaling_factor(self) -> float:
        return self.latent_norm.scale

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        """A diffusion model's ``scale_factor`` overrides the scale (``ldm.models.diffusion.ddpm``)."""
        if isinstance(self.latent_norm, PatchBatchNorm):
            raise ValueError("FLUX.2's latent normalisation has no scale to set")
        self.latent_norm = dataclasses.replace(self.latent_norm, scale=float(value))

    @property
    def shift_factor(self) -> float:
        return self.latent_norm.shift

    def _check_latents(self, name: str, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"{name} must be (B, {self.embed_dim}, h, w) VAE-layout latents, got {tuple(z.shape)}"
                             + (" (patchified FLUX.2 latents: unpatchify_latents first)"
                                if self.bn is not None and z.ndim == 4 and z.shape[1] == self.bn.num_features
                                else ""))

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, embed_dim, h, w) -> the diffusion model's (normalised) latents, same shape:
        ``latent_norm.normalize`` (:mod:`ldm.latent_spaces`). The FLUX.2 pipelines' latents are
        ``ldm.latent_spaces.patchify_latents(scale_latents(z))`` (then packed into tokens)."""
        if not isinstance(self.latent_norm, ScaleShift):
            self._check_latents("z", z)
        return self.latent_norm.normalize(z, self.bn)

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale_latents`, ready for :meth:`decode`."""
        if not isinstance(self.latent_norm, ScaleShift):
            self._check_latents("latents", latents)
        return self.latent_norm.denormalize(latents, self.bn)

    # ------------------------------------------------------------------ checkpoints
    def known_unused_keys(self) -> Dict[str, str]:
        """Checkpoint key prefixes this model drops on load, with the reason logged."""
        has_loss = any(k.startswith("loss.") for k in self.state_dict())
        unused = {prefix: reason for prefix, reason in UNUSED_PREFIXES.items() if not (prefix == "loss." and has_loss)}
        if not self.decoder.has_condition:
            unused["decoder.encoder."] = "condition branch; this decoder is configured with condition: false"
        return unused

    def init_from_ckpt(self, path: PathLike, ignore_keys: Sequence[str] = (), fresh_condition: bool = True,
                       state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """Load weights from any supported checkpoint (configs pass ``ckpt_path``; ``state_dict``: its tensors
        when already read). The rules (latent space, condition branch, ``ignore_keys: [decoder]``):
        :mod:`ldm.checkpoints.autoencoder_weights`."""
        load_autoencoder_weights(self, path, ignore_keys=ignore_keys, fresh_condition=fresh_condition,
                                 state_dict=state_dict)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image (B,3,H,W) in [-1,1] -> posterior over latents (B,embed_dim,H/f,W/f)."""
        _check_float("x", x)
        self._check_dtype("x", x, self.encoder.conv_in.weight)
        moments = self.encoder(x)
        return DiagonalGaussianDistribution(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, z: torch.Tensor, image: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latents (B,embed_dim,h,w) -> image (B,3,f*h,f*w).

        ``image`` (B or 1, 3, f*h, f*w) in [-1,1] and ``mask`` (B or 1, 1, f*h, f*w) in [0,1], 1 = generate,
        0 = keep: the prior the condition branch reads. Both ``None`` means no prior, which gives the same result
        as an all-ones mask. A batch-1 image/mask serves every latent of the batch (several samples of one
        inpainting). A decoder without condition branch ignores them.
        """
        image, mask = self.check_decode_inputs(z, image, mask)
        if self._tiling is not None:
            f = self.downsample_factor
            return tiled_decode(self.decode_untiled, z, image, mask,
                                tile=self._tiling[0] // f, overlap=self._tiling[1] // f, scale=f)
        return self.decode_untiled(z, image, mask)

    def decode_untiled(self, z: torch.Tensor, image: Optional[torch.Tensor] = None,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`decode` in one piece and without input checks (the caller has run :meth:`check_decode_inputs`)."""
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z), image, mask)

    def enable_tiling(self, tile_sample_size: int = 512, overlap: int = 128) -> None:
        """Decode latents larger than ``tile_sample_size`` image pixels in overlapping tiles (see
        :mod:`ldm.modules.diffusionmodules.tiling`): peak memory stays that of one tile; results differ slightly
        from an untiled decode (per-tile GroupNorm statistics). Sizes in image pixels, multiples of the
        downsampling factor, ``0 <= overlap < tile_sample_size``."""
        f = self.downsample_factor
        if tile_sample_size % f or overlap % f or not 0 <= overlap < tile_sample_size:
            raise ValueError(f"tile_sample_size ({tile_sample_size}) and overlap ({overlap}) must be multiples of {f} "
                             "with 0 <= overlap < tile_sample_size")
        self._tiling = (int(tile_sample_size), int(overlap))

    def disable_tiling(self) -> None:
        """Decode in one piece again (the default)."""
        self._tiling = None

    def __getattr__(self, name: str) -> Any:
        # diffusers' pipelines read ``pipe.vae.config`` before anything else: ``pipe.vae = model`` fails there with
        # what to call instead (an AttributeError still, so ``hasattr(model, "config")`` stays False)
        if name == "config":
            raise AttributeError(NOT_A_DIFFUSERS_VAE)
        return super().__getattr__(name)

    @property
    def tiling(self) -> Optional[Tuple[int, int]]:
        """``(tile_sample_size, overlap)`` in image pixels while tiling is on (:meth:`enable_tiling`), else None."""
        return self._tiling

    def _check_dtype(self, name: str, t: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        """Outside autocast, inputs must have the dtype of the weights that read them (default: the decoder's,
        which ``ldm.fast`` may convert apart from the encoder), else the first conv fails with a message that names
        no argument."""
        weight = self.decoder.conv_in.weight if weight is None else weight
        if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(f"{name} is {t.dtype} but the model's weights are {weight.dtype}: convert one to the "
                            "other (or run under torch.autocast)")

    def check_decode_inputs(self, z: torch.Tensor, image: Optional[torch.Tensor],
                            mask: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Validate the arguments of :meth:`decode`; returns image and mask expanded to the latent batch."""
        _check_float("z", z)
        self._check_dtype("z", z)
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"z must be (B, {self.embed_dim}, h, w), got {tuple(z.shape)}")
        if image is None and mask is None:
            return None, None
        if image is None or mask is None:
            raise ValueError("decode needs both image and mask (or neither, for no prior); got only "
                             f"{'mask' if image is None else 'image'}")
        _check_float("image", image)
        _check_float("mask", mask)
        self._check_dtype("image", image)
        f = self.downsample_factor
        size = (z.shape[-2] * f, z.shape[-1] * f)
        for name, t, channels in (("image", image, self.decoder_config["out_ch"]), ("mask", mask, 1)):
            if t.ndim != 4 or t.shape[1] != channels:
                raise ValueError(f"{name} must be (B, {channels}, H, W), got {tuple(t.shape)}")
            if tuple(t.shape[-2:]) != size:
                raise ValueError(f"{name} is {tuple(t.shape[-2:])} but latents {tuple(z.shape[-2:])} decode to "
                                 f"{size} (image size = {f} x latent size)")
            if t.shape[0] not in (1, z.shape[0]):
                raise ValueError(f"{name} batch {t.shape[0]} does not match the latent batch {z.shape[0]} "
                                 "(use batch 1 to share one image/mask across all latents)")
        lo, hi = torch.aminmax(mask.detach())
        if not (lo >= 0 and hi <= 1):  # written so that NaN fails too
            raise ValueError(f"mask values must lie in [0, 1] (1 = generate, 0 = keep), got [{lo:.3g}, {hi:.3g}]")
        # one NaN pixel, even under the mask, would make every output pixel NaN: (1 - mask) * image keeps 0 * NaN
        check_finite(image, "image")
        if not self.decoder.has_condition:
            return None, None
        b = z.shape[0]
        return image.expand(b, -1, -1, -1), mask.to(image.dtype).expand(b, -1, -1, -1)

    def forward(self, input: Union[torch.Tensor, Sequence[torch.Tensor]], mask: Optional[torch.Tensor] = None,
                sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Encode ``input`` and decode it with itself as the prior. ``input`` may be the original's
        ``[image, mask]`` pair. Returns ``(reconstruction, posterior)``."""
        if isinstance(input, (list, tuple)):
            input, mask = input
        posterior = self.encode(input)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        if mask is None:
            return self.decode(z), posterior
        return self.decode(z, input, mask), posterior


def _check_float(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
