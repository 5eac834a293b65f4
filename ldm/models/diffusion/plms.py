"""PLMS sampler (pseudo linear multistep, Liu et al. 2022) with the original ``PLMSSampler.sample`` interface.

The first step is a pseudo improved Euler (2nd order) step, the next ones Adams-Bashforth of order 2, 3 and 4 on
the noise predictions, each applied through the deterministic DDIM update of
:mod:`ldm.models.diffusion.sampling_common`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ...models.diffusion.sampling_common import Conditioning, ScheduledSampler

# Adams-Bashforth weights for the newest eps first, by number of previous eps (1, 2, 3).
_AB_WEIGHTS = {1: (3 / 2, -1 / 2), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PLMSSampler(ScheduledSampler):
    """``PLMSSampler(model).sample(S, batch_size, shape, conditioning, ...)``; eta must be 0."""

    progress_desc = "PLMS Sampler"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS, got {ddim_eta}")
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=0.0, verbose=verbose)

    @torch.no_grad()
    def p_sample_plms(self, x: torch.Tensor, c: Optional[Conditioning], t: torch.Tensor, index: int,
                      old_eps: List[torch.Tensor], t_next: torch.Tensor,
                      **opts: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PLMS step. ``old_eps``: the eps of the previous steps, oldest first (at most 3 are used).

        Returns ``(x_prev, pred_x0, e_t)``; the caller appends ``e_t`` to ``old_eps``.
        """
        e_t = self.guided_eps(x, t, c, **opts)
        if not old_eps:
            # No history yet: average the eps at both ends of the step (costs one more model call).
            x_prev, _ = self.ddim_update(x, e_t, index, **opts)
            e_t_prime = (e_t + self.guided_eps(x_prev, t_next, c, **opts)) / 2
        else:
            history = old_eps[-3:]
            weights = _AB_WEIGHTS[len(history)]
            e_t_prime = weights[0] * e_t
            for w, e in zip(weights[1:], reversed(history)):
                e_t_prime = e_t_prime + w * e
        x_prev, pred_x0 = self.ddim_update(x, e_t_prime, index, **opts)
        return x_prev, pred_x0, e_t

    def _step(self, x: torch.Tensor, c: Optional[Conditioning], t: torch.Tensor, t_next: torch.Tensor, index: int,
              state: Dict[str, Any], **opts: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        old_eps = state.setdefault("old_eps", [])
        x_prev, pred_x0, e_t = self.p_sample_plms(x, c, t, index, old_eps, t_next, **opts)
        old_eps.append(e_t)
        if len(old_eps) > 3:
            old_eps.pop(0)
        return x_prev, pred_x0
