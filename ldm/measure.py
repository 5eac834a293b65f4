"""Measurements the benchmark reports and the tests check: the peak memory of a block of code, and PSNR of two
images as the scripts write them (8 bit)."""
from __future__ import annotations

import re
from typing import Optional

import torch

from . import metrics
from .image_io import to_uint8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


class PeakMemory:
    """Peak memory of a block of code, in MiB above what was in use when it started (CUDA: allocator; CPU: RSS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.mib = (peak - self.start) / 2 ** 20


def psnr_8bit(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1,1] after quantising both to 8 bits as the scripts write them."""
    qa, qb = (torch.from_numpy(to_uint8(t)).double() for t in (a, b))
    return float(metrics.psnr_from_mse(((qa - qb) ** 2).mean(), data_range=255.0))
