"""``AutoencoderKL``: SD's frozen KL-f8 encoder with the paper's trainable (asymmetric) decoder.

One LightningModule for every variant. The variant lives in the config: ``ddconfig`` describes the encoder (and the
decoder, as in Stable Diffusion); ``decoder_overrides`` changes the decoder alone (``ch``, ``num_res_blocks``,
``condition``), the slot the original code lacked and filled with a copied file per variant.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
from torch import nn

from ..checkpoints.autoencoder_weights import load_autoencoder_weights
from ..checkpoints.files import PathLike
from ..checkpoints.tensors import UNUSED_PREFIXES
from ..latent_spaces import SD, patchify_latents, unpatchify_latents
from ..modules.diffusionmodules.model import ENCODER_ONLY_KEYS, Decoder, Encoder
from ..modules.diffusionmodules.tiling import tiled_decode
from ..modules.distributions.distributions import DiagonalGaussianDistribution
from ..training.recipe import TrainingRecipe
from ..util import check_params, instantiate_from_config

log = logging.getLogger(__name__)


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
                 latent_batch_norm: Optional[Mapping[str, Any]] = None):
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
        self._init_latent_normalization(scaling_factor, shift_factor, latents_mean, latents_std, latent_batch_norm)
        self.pretrained_lr_factor = float(pretrained_lr_factor)
        self.scheduler_config = scheduler_config
        self.scheduler_config_d = scheduler_config_d
        if num_gpus is not None or colorize_nlabels is not None:
            log.info("num_gpus / colorize_nlabels are accepted for old configs and ignored")

        check_params(Encoder, ddconfig, "ddconfig")
        self.encoder = Encoder(**ddconfig)
        self.decoder_config = {k: v for k, v in {**ddconfig, **dict(decoder_overrides or {})}.items()
                               if k not in ENCODER_ONLY_KEYS}
        check_params(Decoder, self.decoder_config, "decoder_overrides over ddconfig")
        self.decoder = Decoder(**self.decoder_config)
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
    def _init_latent_normalization(self, scaling_factor: Optional[float], shift_factor: Optional[float],
                                   latents_mean: Optional[Sequence[float]], latents_std: Optional[Sequence[float]],
                                   latent_batch_norm: Optional[Mapping[str, Any]]) -> None:
        """Check the normalisation arguments (see the class docstring) and set ``latent_normalization`` (one of
        :data:`ldm.latent_spaces.NORMALIZATIONS`), ``scaling_factor``, ``shift_factor`` and the statistics."""
        self.latents_mean = self.latents_std = None
        self.bn: Optional[nn.BatchNorm2d] = None
        if (latents_mean is None) != (latents_std is None):
            raise ValueError("latents_mean and latents_std come together (per-channel normalisation) or not at all")
        if latent_batch_norm is not None:
            if latents_mean is not None:
                raise ValueError("latent_batch_norm and latents_mean / latents_std are two normalisations: set one")
            if scaling_factor not in (None, 1) or shift_factor not in (None, 0):
                raise ValueError(f"latent_batch_norm normalises with its statistics alone (FLUX.2 has no scale or "
                                 f"shift): scaling_factor must be 1 and shift_factor 0, got {scaling_factor} / "
                                 f"{shift_factor}")
            options = dict(latent_batch_norm)
            unknown = sorted(set(options) - {"patch_size", "batch_norm_eps"})
            if unknown:
                raise ValueError(f"latent_batch_norm: unknown entries {unknown} (it takes patch_size, batch_norm_eps)")
            self.latent_patch_size = int(options.get("patch_size", 2))
            eps = float(options.get("batch_norm_eps", 1e-4))
            if self.latent_patch_size < 1 or not eps >= 0:
                raise ValueError(f"latent_batch_norm: patch_size must be >= 1 and batch_norm_eps >= 0, got {options}")
            # BFL's and diffusers' module and key names (bn.running_mean / running_var / num_batches_tracked); its
            # statistics come from the checkpoint and are only read (scale_latents), never updated by a forward
            self.bn = nn.BatchNorm2d(self.latent_patch_size ** 2 * self.embed_dim, eps=eps, affine=False,
                                     track_running_stats=True)
            self.bn.requires_grad_(False)
            self.latent_normalization = "batch_norm"
            scaling_factor, shift_factor = 1.0, 0.0
        elif latents_mean is not None:
            mean, std = list(map(float, latents_mean)), list(map(float, latents_std))
            if not len(mean) == len(std) == self.embed_dim:
                raise ValueError(f"latents_mean / latents_std need one value per latent channel ({self.embed_dim}), "
                                 f"got {len(mean)} / {len(std)}")
            if not all(v > 0 for v in std):
                raise ValueError(f"latents_std must be > 0, got {std}")
            if shift_factor not in (None, 0):
                raise ValueError(f"per-channel normalisation (latents_mean) has no shift_factor, got {shift_factor}")
            self.latents_mean, self.latents_std = mean, std
            self.latent_normalization = "per_channel"
        else:
            self.latent_normalization = "scale_shift"
        self.scaling_factor = float(SD.scaling_factor if scaling_factor is None else scaling_factor)
        self.shift_factor = float(0.0 if shift_factor is None else shift_factor)
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")

    def _channel_stats(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, C, 1, 1) tensors of ``like``'s device and dtype: per latent channel, or per channel
        of the patchified latents for ``batch_norm`` (std = ``sqrt(running_var + eps)``, computed in the
        statistics' dtype and then cast, as diffusers' FLUX.2 pipelines do)."""
        if self.bn is not None:
            mean = self.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps)
            return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)
        mean = torch.tensor(self.latents_mean).view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(self.latents_std).view(1, -1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def _check_latents(self, name: str, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"{name} must be (B, {self.embed_dim}, h, w) VAE-layout latents, got {tuple(z.shape)}"
                             + (" (patchified FLUX.2 latents: unpatchify_latents first)"
                                if self.bn is not None and z.ndim == 4 and z.shape[1] == self.bn.num_features
                                else ""))

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, embed_dim, h, w) -> the diffusion model's (normalised) latents, same shape.

        ``scale_shift``: ``(z - shift_factor) * scaling_factor``; ``per_channel``: ``(z - latents_mean) *
        scaling_factor / latents_std``; ``batch_norm`` (FLUX.2): patchify 2x2, ``(x - running_mean) /
        sqrt(running_var + eps)`` per patchified channel, unpatchify (``h`` and ``w`` even). The FLUX.2 pipelines'
        latents are ``ldm.latent_spaces.patchify_latents(scale_latents(z))`` (then packed into tokens)."""
        if self.latent_normalization == "scale_shift":
            return (z - self.shift_factor) * self.scaling_factor
        self._check_latents("z", z)
        if self.latent_normalization == "per_channel":
            mean, std = self._channel_stats(z)
            return (z - mean) * self.scaling_factor / std
        x = patchify_latents(z, self.latent_patch_size)
        mean, std = self._channel_stats(x)
        return unpatchify_latents((x - mean) / std, self.latent_patch_size)

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale_latents` (``latents / scaling_factor + shift_factor`` for ``scale_shift``),
        ready for :meth:`decode`."""
        if self.latent_normalization == "scale_shift":
            return latents / self.scaling_factor + self.shift_factor
        self._check_latents("latents", latents)
        if self.latent_normalization == "per_channel":
            mean, std = self._channel_stats(latents)
            return latents * std / self.scaling_factor + mean
        x = patchify_latents(latents, self.latent_patch_size)
        mean, std = self._channel_stats(x)
        return unpatchify_latents(x * std + mean, self.latent_patch_size)

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
