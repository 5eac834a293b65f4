"""DDIM sampler (Song et al. 2021) with the original ``DDIMSampler.sample`` interface.

Schedule, guidance and the loop live in :mod:`ldm.models.diffusion.sampling_common`; this file is the DDIM rule.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ...models.diffusion.sampling_common import Conditioning, ScheduledSampler


class DDIMSampler(ScheduledSampler):
    """``DDIMSampler(model).sample(S, batch_size, shape, conditioning, eta=..., ...)``.

    ``eta = 0`` is deterministic DDIM; ``eta = 1`` adds DDPM-like noise (the inpainting script's default).
    """

    progress_desc = "DDIM Sampler"

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Optional[Conditioning], t: torch.Tensor, index: int,
                      **opts: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from timestep ``t`` (ddim index ``index``): returns ``(x_prev, pred_x0)``."""
        e_t = self.guided_eps(x, t, c, **opts)
        return self.ddim_update(x, e_t, index, **opts)

    def _step(self, x: torch.Tensor, c: Optional[Conditioning], t: torch.Tensor, t_next: torch.Tensor, index: int,
              state: Dict[str, Any], **opts: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.p_sample_ddim(x, c, t, index, **opts)
