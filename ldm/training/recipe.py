"""The paper's training recipe, as a mixin of :class:`ldm.models.autoencoder.AutoencoderKL`: one forward per batch
feeding the generator step and (from ``disc_start``) the discriminator step, manual optimization with gradient
accumulation, the optimizers and their learning-rate schedules, validation and the image logger's grids. The
network itself (encode / decode, the latent space, checkpoints) is the model class."""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch.optim.lr_scheduler import LambdaLR

from .. import metrics
from ..modules.distributions.distributions import DiagonalGaussianDistribution
from ..util import instantiate_from_config
from .framework_hooks import set_last_lr, step_uncounted

log = logging.getLogger(__name__)
# devices where torch.optim.Adam(fused=True) runs
FUSED_ADAM_DEVICES = ("cuda", "cpu")


class TrainingRecipe:
    """Lightning hooks of the recipe. The class it is mixed into provides ``encoder``, ``decoder``, ``loss``,
    ``encode``, ``decode``, ``encoder_side()``, and the attributes ``image_key``, ``mask_key``,
    ``input_memory_format``, ``train_encoder``, ``pretrained_lr_factor``, ``scheduler_config(_d)`` and
    ``accumulate_grad_batches``."""

    def get_input(self, batch: Mapping[str, torch.Tensor],
                  k: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image (B,3,H,W) float and mask (B,1,H,W) from a batch; channel-last tensors (the original's layout)
        are permuted."""
        x = batch[k or self.image_key]
        if x.ndim == 3:
            x = x[..., None]
        if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        x = x.float().contiguous(memory_format=self.input_memory_format)
        if self.mask_key in batch:
            mask = batch[self.mask_key].float()
            if mask.ndim == 3:
                mask = mask[:, None]
            elif mask.shape[1] != 1 and mask.shape[-1] == 1:
                mask = mask.permute(0, 3, 1, 2)
        else:  # no mask in the data: generate everything
            mask = torch.ones_like(x[:, :1])
        return x, mask

    def trainable_groups(self) -> List[Dict[str, Any]]:
        """Parameter groups of the generator optimizer, each ``{"name", "params", "lr_factor"}``.

        ``decoder``: the decoder's main path (pretrained in the recipe) at ``pretrained_lr_factor``; ``condition``:
        the new condition branch at the full rate; ``encoder`` (only with ``train_encoder``): encoder, quant_conv,
        post_quant_conv at the full rate.
        """
        branch = [p for n, p in self.decoder.named_parameters() if n.startswith("encoder.")]
        main = [p for n, p in self.decoder.named_parameters() if not n.startswith("encoder.")]
        groups = [{"name": "decoder", "params": main, "lr_factor": self.pretrained_lr_factor}]
        if branch:
            groups.append({"name": "condition", "params": branch, "lr_factor": 1.0})
        if self.train_encoder:
            encoder_side = [p for m in self.encoder_side() for p in m.parameters()]
            groups.append({"name": "encoder", "params": encoder_side, "lr_factor": 1.0})
        return groups

    def configure_optimizers(self):
        """Adam(betas 0.5, 0.9) for the decoder groups of :meth:`trainable_groups` and one for the discriminator,
        each with a LambdaLR per group when ``scheduler_config`` / ``scheduler_config_d`` are set.

        Schedules get ``max_decay_steps`` from :meth:`total_steps` (optimizer steps of the run) and
        ``lr_min = 1e-6 / group lr`` (every group ends at 1e-6, as in the original) unless the config sets them; the
        discriminator's ``start_step`` defaults to the loss's ``disc_start``.
        """
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise RuntimeError("AutoencoderKL.learning_rate is not set: main.py sets it from model.base_learning_rate "
                               "(scaled by --scale_lr); set model.learning_rate yourself when training without it")
        groups = [{"params": g["params"], "lr": lr * g["lr_factor"], "name": g["name"]}
                  for g in self.trainable_groups()]
        # fused Adam (one kernel for all parameters) where torch has it: the same update, fewer passes over memory
        fused = True if self.device.type in FUSED_ADAM_DEVICES else None
        opt_g = torch.optim.Adam(groups, betas=(0.5, 0.9), fused=fused)
        opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9), fused=fused)
        if self.scheduler_config is None:
            return [opt_g, opt_d]
        total = self.total_steps()
        disc_start = int(getattr(self.loss, "discriminator_iter_start", 0))
        sched_g = LambdaLR(opt_g, [self._make_schedule(self.scheduler_config, g["lr"], total) for g in groups])
        sched_d_config = self.scheduler_config_d or self.scheduler_config
        sched_d = LambdaLR(opt_d, self._make_schedule(sched_d_config, lr, total, start_step=disc_start))
        log.info("LR schedules over %d steps (discriminator from step %d)", total, disc_start)
        return [opt_g, opt_d], [{"scheduler": sched_g, "interval": "step"}, {"scheduler": sched_d, "interval": "step"}]

    def total_steps(self) -> int:
        """Optimizer steps (= global steps) of this run. Lightning's ``estimated_stepping_batches`` counts batches
        here, since our accumulation (:meth:`training_step`) is hidden from it."""
        estimate = int(self.trainer.estimated_stepping_batches)  # min(max_steps, max_epochs x batches per epoch)
        n = int(self.accumulate_grad_batches)
        if n == 1:
            return estimate
        trainer = self.trainer
        by_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else math.inf
        by_epochs = (trainer.max_epochs * math.ceil(trainer.num_training_batches / n)
                     if trainer.max_epochs not in (None, -1) else math.inf)
        return int(min(by_steps, by_epochs))

    @staticmethod
    def _make_schedule(config: Mapping[str, Any], group_lr: float, total_steps: int, start_step: int = 0) -> Any:
        params = dict(config.get("params") or {})
        params.setdefault("lr_min", 1e-6 / group_lr)
        params.setdefault("max_decay_steps", total_steps)
        if start_step and "start_step" not in params and "LambdaWarmUpCosineScheduler" in config["target"]:
            params["start_step"] = start_step
        return instantiate_from_config({"target": config["target"], "params": params})

    def on_train_start(self) -> None:
        """Fit the schedules' length to this run's total steps after a resume.

        LambdaLR's restored state carries the length of the run that saved it (``lr_max_decay_steps``), so a run
        resumed with a larger ``--max_steps`` would hold ``lr_min`` once the old length is reached. Schedules whose
        ``max_decay_steps`` came from the trainer follow the new total; the learning rate of the next step is
        recomputed. Unchanged total (a plain resume): nothing changes.
        """
        if self.scheduler_config is None:
            return
        total = self.total_steps()
        configs = (self.scheduler_config, self.scheduler_config_d or self.scheduler_config)
        for name, config, sched in zip(("generator", "discriminator"), configs,
                                       (c.scheduler for c in self.trainer.lr_scheduler_configs)):
            if "max_decay_steps" in (config.get("params") or {}):
                continue  # the config fixed the length
            lambdas = [f for f in sched.lr_lambdas if getattr(f, "lr_max_decay_steps", total) != total]
            if not lambdas:
                continue
            log.info("%s LR schedule: length %d -> %d steps (the trainer's total for this run)", name,
                     lambdas[0].lr_max_decay_steps, total)
            for f in lambdas:
                f.lr_max_decay_steps = total
            for group, base_lr, f in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base_lr * f(sched.last_epoch)
            set_last_lr(sched, [group["lr"] for group in sched.optimizer.param_groups])

    def shared_forward(self, x: torch.Tensor, mask: torch.Tensor,
                       sample_posterior: bool = True) -> Tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Encode (without a graph when the encoder is frozen) and decode with ``x`` as the prior."""
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.encode(x)
            z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z, x, mask), posterior

    def accumulation_window(self, batch_idx: int) -> Tuple[bool, bool, int]:
        """(first micro-batch of the window, last one, window length) for ``accumulate_grad_batches``; the last
        window of an epoch may be shorter (as Lightning's own accumulation: an optimizer step at every epoch end)."""
        n = int(self.accumulate_grad_batches)
        start = batch_idx - batch_idx % n
        total = self.trainer.num_training_batches
        window = n if not math.isfinite(total) else min(n, int(total) - start)
        return batch_idx == start, batch_idx + 1 == start + window, window

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One encoder+decoder forward, then the generator step and (from ``disc_start``) the discriminator step.

        ``global_step`` counts optimizer steps, as in the original (PL 1.x stepped both optimizers per batch): the
        discriminator's step is kept out of Lightning's step counter
        (:func:`ldm.training.framework_hooks.step_uncounted`).
        With ``accumulate_grad_batches`` = N both optimizers step once per N batches, on the mean of their
        gradients, which is the update of one batch N times larger (the GAN's adaptive weight is computed per
        micro-batch).
        """
        x, mask = self.get_input(batch)
        opt_g, opt_d = self.optimizers()
        step = self.global_step
        first, last, window = self.accumulation_window(batch_idx)
        self.mid_accumulation = not last
        rec, posterior = self.shared_forward(x, mask)

        with self.toggled_optimizer(opt_g):
            g_loss, log_g = self.loss.generator_loss(x, rec, posterior, step, last_layer=self.get_last_layer(),
                                                     split="train", **self._loss_mask(mask))
            if first:
                opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss / window)
            if last:
                opt_g.step()
        logs = dict(log_g)
        if self.loss.gan_factor(step) > 0:
            with self.toggled_optimizer(opt_d):
                d_loss, log_d = self.loss.discriminator_loss(x, rec, step, split="train")
                if first:
                    opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss / window)
                if last:
                    step_uncounted(opt_d)
            logs.update(log_d)
            self.log("discloss", d_loss.detach(), prog_bar=True, on_step=True, on_epoch=False)

        for group in opt_g.param_groups:
            logs[f"lr/{group['name']}"] = torch.tensor(group["lr"])
        logs["lr/discriminator"] = torch.tensor(opt_d.param_groups[0]["lr"])
        schedulers = self.lr_schedulers()
        if schedulers is not None and last:
            with warnings.catch_warnings():
                # the discriminator's schedule advances (at lr 0) before its optimizer first steps at disc_start
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                    scheduler.step()
        self.log("aeloss", g_loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return g_loss.detach()

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Deterministic (posterior mode) reconstruction with the batch's (fixed) masks; logs ``val/*`` epoch means.
        The kept-region errors ``val/pre_error`` and ``val/kept_mse`` (:mod:`ldm.metrics`, [0, 1]) are collected
        per image and logged by :meth:`on_validation_epoch_end`."""
        x, mask = self.get_input(batch)
        rec, posterior = self.shared_forward(x, mask, sample_posterior=False)
        step = self.global_step
        _, logs = self.loss.generator_loss(x, rec, posterior, step, split="val", **self._loss_mask(mask))
        if self.loss.gan_factor(step) > 0:
            logs.update(self.loss.discriminator_loss(x, rec, step, split="val")[1])
        self._val_regions.update(metrics.to_unit(rec), metrics.to_unit(x), mask)
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def on_validation_epoch_start(self) -> None:
        self._val_regions = metrics.RegionMetricAccumulator()

    def on_validation_epoch_end(self) -> None:
        """``val/pre_error``: mean over all validation images; ``val/kept_mse``: mean over the images that have
        kept pixels (an all-ones mask has no kept region). Sums and counts are added over the epoch and over
        processes, so neither a batch without kept pixels (NaN) nor uneven batch sizes skew them."""
        values = self._val_regions.values
        kept = [v for v in values["mse_kept"] if not math.isnan(v)]
        totals = torch.tensor([sum(values["pre_error"]), len(values["pre_error"]), sum(kept), len(kept)],
                              dtype=torch.float64, device=self.device)
        totals = self.all_gather(totals).reshape(-1, 4).sum(0)
        if totals[1] == 0:
            return
        self.log("val/pre_error", (totals[0] / totals[1]).float(), sync_dist=False)
        self.log("val/kept_mse", (totals[2] / totals[3]).float() if totals[3] > 0 else torch.tensor(float("nan")),
                 sync_dist=False)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, torch.Tensor], only_inputs: bool = False,
                   **kwargs: Any) -> Dict[str, torch.Tensor]:
        """Image grids for the image logger, each (B,3,H,W) in [-1,1]: inputs, masks (white = generate), masked
        inputs (what the condition branch reads), reconstructions, and samples decoded from random latents with
        the same prior."""
        x, mask = self.get_input(batch)
        x, mask = x.to(self.device), mask.to(self.device)
        images = {"inputs": x, "masks": (mask * 2 - 1).expand_as(x), "masked_inputs": (1 - mask) * x}
        if not only_inputs:
            rec, posterior = self.shared_forward(x, mask)
            images["reconstructions"] = rec
            images["samples"] = self.decode(torch.randn_like(posterior.mean), x, mask)
        return images

    def _loss_mask(self, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The loss's extra inputs, as it declares them (``forward_keys``; a loss without the attribute, such as
        the original's, takes none)."""
        extra = {"mask": mask}
        return {key: extra[key] for key in getattr(self.loss, "forward_keys", ())}

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight
