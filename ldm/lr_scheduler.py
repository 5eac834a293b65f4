"""Learning-rate multipliers for ``torch.optim.lr_scheduler.LambdaLR`` (use with each group's base lr).

One warm-up + cosine schedule serves both optimizers of the paper's recipe: the decoder's (``start_step=0``) and
the discriminator's, which stays at 0 until the GAN loss starts (``start_step = disc_start``). The original code had
a second, copied class for the latter; its name is kept below as an alias so old configs still load.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


class LambdaWarmUpCosineScheduler:
    """Multiplier at optimizer step ``n``, with ``m = n - start_step``:

    * ``m <= 0`` (only when ``start_step > 0``): 0, the optimizer is off;
    * ``m < warm_up_steps``: linear from ``lr_start`` to ``lr_max``;
    * then cosine from ``lr_max`` down to ``lr_min``, reached at ``n = max_decay_steps`` and held afterwards.

    ``max_decay_steps`` is the total number of training steps; :class:`~ldm.models.autoencoder.AutoencoderKL`
    fills it (and ``lr_min`` = 1e-6 / group lr, as the original did) from the trainer when the config leaves them
    out. The object is picklable with plain attributes only, so LambdaLR's state dict stays weights-only loadable.
    """

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 start_step: int = 0, verbosity_interval: int = 0):
        if warm_up_steps < 0 or max_decay_steps <= 0 or start_step < 0:
            raise ValueError(f"LambdaWarmUpCosineScheduler: need warm_up_steps >= 0, max_decay_steps > 0, "
                             f"start_step >= 0; got {warm_up_steps}, {max_decay_steps}, {start_step}")
        self.lr_warm_up_steps = int(warm_up_steps)
        self.lr_min = float(lr_min)
        self.lr_max = float(lr_max)
        self.lr_start = float(lr_start)
        self.lr_max_decay_steps = int(max_decay_steps)
        self.start_step = int(start_step)
        self.verbosity_interval = int(verbosity_interval)
        self.last_lr = 0.0

    def schedule(self, n: int, **kwargs) -> float:
        if self.start_step > 0:
            # the original's discriminator schedule: off up to and including start_step
            if n <= self.start_step:
                self.last_lr = 0.0
                return 0.0
            n = n - self.start_step
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            log.info("step %d, previous lr multiplier %.4g", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            decay_steps = max(self.lr_max_decay_steps - self.start_step - self.lr_warm_up_steps, 1)
            t = min((n - self.lr_warm_up_steps) / decay_steps, 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1.0 + math.cos(t * math.pi))
        self.last_lr = float(lr)
        return self.last_lr

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


# The original's discriminator class (a copy with start_step); configs that name it keep working.
LambdaWarmUpCosineScheduler_D = LambdaWarmUpCosineScheduler
