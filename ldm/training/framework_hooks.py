"""Every use of a framework's private API, each with its reason. ``tests/training/test_framework_hooks.py`` fails when
Lightning or torch changes under one of them; nothing else in the project touches a private name of a framework.
"""
from __future__ import annotations

from typing import Any, List

from torch.optim.lr_scheduler import LRScheduler


def step_uncounted(optimizer: Any) -> None:
    """Step a ``LightningOptimizer`` without advancing ``trainer.global_step``.

    With manual optimization Lightning counts every ``optimizer.step()`` as a global step, so a generator and a
    discriminator optimizer would count each batch twice and shift ``disc_start``, the LR schedules and
    ``max_steps``. The manual loop injects its counter through the optimizer's private ``_on_before_step`` /
    ``_on_after_step`` hooks (Lightning 2.x); they are disabled for this one step.
    """
    before, after = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        optimizer.step()
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after


def set_last_lr(scheduler: LRScheduler, lrs: List[float]) -> None:
    """Make ``scheduler.get_last_lr()`` report ``lrs`` after the caller changed the learning rates in place
    (a schedule stretched on resume). torch keeps the value in the private ``_last_lr`` and has no setter; Lightning's
    LearningRateMonitor and our logs read it through ``get_last_lr()``."""
    scheduler._last_lr = list(lrs)


def log_batch_row(trainer: Any) -> None:
    """Write the metrics row of the batch that just ended, now, before its checkpoint: a run stopped by a signal
    after this batch saves ``last.ckpt`` and raises, so the loop's own logging of the row (Lightning's private
    ``_logger_connector.on_batch_end`` / ``update_train_step_metrics``, which follow ``on_train_batch_end``) never
    runs, and the resumed run does not redo the batch."""
    trainer._logger_connector.on_batch_end()
    trainer._logger_connector.update_train_step_metrics()
