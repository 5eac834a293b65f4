"""The fast decode path shared by every script that decodes: bfloat16, ``channels_last`` and (on GPUs) regional
``torch.compile``, chosen for the machine it runs on.

=========================  =========  =============  ==============================================
device                     dtype      channels_last  torch.compile
=========================  =========  =============  ==============================================
CUDA with bf16 (Ampere+)   bfloat16   yes            the repeated blocks, one by one ("regional")
CPU with AVX512-BF16/AMX   bfloat16   yes            no (start-up would outweigh one decode)
other CPUs, MPS            float32    yes            no
=========================  =========  =============  ==============================================

Float32 without these (``FastDecode(..., enabled=False)``, every script's default) is the exact path that the parity
tests check against diffusers. The fast path's output differs from it by bfloat16 rounding; ``tests/test_fast.py``
bounds the difference and ``scripts/benchmark.py`` reports its PSNR on 8-bit images next to its speed.

    decoder = FastDecode(model, device, enabled=opt.fast)  # converts the decoder side in place
    image = decoder.decode(z, image, mask)                 # float32 (B,3,H,W), as model.decode
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bfloat16 arithmetic in hardware (x86 AVX512-BF16 or AMX-BF16, read from
    ``/proc/cpuinfo``; Arm ``bf16`` likewise). oneDNN *emulates* bf16 on plain AVX-512, which is slower than float32,
    so the plain ``mkldnn`` bf16 check is not enough."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.findall(r"^(?:flags|Features)\s*:\s*(.*)$", f.read(), re.M)[0].split())
    except (OSError, IndexError):
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@dataclasses.dataclass(frozen=True)
class FastSettings:
    """What the fast path does on one device (see the module's table)."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    compile: bool = False

    def describe(self) -> str:
        parts = [str(self.dtype).replace("torch.", "")]
        parts += ["channels_last"] if self.channels_last else []
        parts += ["regional torch.compile"] if self.compile else []
        return ", ".join(parts)


EXACT = FastSettings()


def fast_settings(device: torch.device, enabled: bool = True) -> FastSettings:
    """The fast settings for ``device`` (``EXACT`` float32 when not ``enabled``).

    CPU: bfloat16 only with native bf16 instructions, channels_last always (oneDNN's convolutions skip their layout
    reorders in NHWC: 1.1-1.4x faster at the decoder's full-resolution levels). CUDA: bfloat16 where the GPU supports
    it (else float16), channels_last and compile.
    """
    device = torch.device(device)
    if not enabled:
        return EXACT
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return FastSettings(dtype=dtype, channels_last=True, compile=True)
    if device.type == "cpu" and cpu_has_native_bf16():
        return FastSettings(dtype=torch.bfloat16, channels_last=True, compile=False)
    return FastSettings(dtype=torch.float32, channels_last=True, compile=False)


def apply_settings(module: nn.Module, settings: FastSettings) -> nn.Module:
    """Convert ``module``'s weights to ``settings.dtype`` and memory format, in place (returns it)."""
    module.to(dtype=settings.dtype)
    if settings.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def compile_blocks(decoder: nn.Module, **compile_kwargs) -> int:
    """Regional ``torch.compile``: compile each ResnetBlock, AttnBlock and Upsample of ``decoder`` in place (and its
    output head, GroupNorm + SiLU + conv), instead of the whole decoder. Blocks of one class share their compiled
    code, so start-up stays a few graphs long; inside each block the compiler fuses GroupNorm with SiLU and the
    residual add. State-dict keys do not change. Returns the number of regions compiled."""
    from .modules.diffusionmodules.model import AttnBlock, ResnetBlock, Upsample

    count = 0
    for module in decoder.modules():
        if isinstance(module, (ResnetBlock, AttnBlock, Upsample)):
            module.compile(**compile_kwargs)
            count += 1
    if hasattr(decoder, "head"):
        decoder.head = torch.compile(decoder.head, **compile_kwargs)  # shadows the bound method on this instance
        count += 1
    return count


# Lightning's mixed precision for a fast dtype (main.py --fast)
TRAINING_PRECISION = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed", torch.float32: "32-true"}


def fast_training(model: nn.Module, device: torch.device, settings: Optional[FastSettings] = None) -> FastSettings:
    """Put a training ``AutoencoderKL`` on the fast settings of ``device`` (``main.py --fast``), in place:
    channels_last weights and batches (``model.input_memory_format``) and, on CUDA, compiled decoder blocks. The
    dtype is not applied to the weights: training runs it as mixed precision (``TRAINING_PRECISION``), which the
    caller gives the trainer. Returns the settings."""
    settings = settings if settings is not None else fast_settings(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
        model.input_memory_format = torch.channels_last
    if settings.compile:
        n = compile_blocks(model.decoder)
        log.info("fast training: %d decoder regions compiled", n)
    log.info("training runs in %s (%s)", settings.describe(), TRAINING_PRECISION[settings.dtype])
    return settings


class FastDecode:
    """``model.decode`` on the fast path of ``device`` (``enabled=False``: exact float32, the model untouched); a
    drop-in for the model where the scripts decode.

    Converts ``model`` (an ``AutoencoderKL``) in place: the decoder side (``post_quant_conv``, ``decoder``) gets
    ``settings.dtype`` and memory format; blocks are compiled on CUDA. Calls take and return float32 tensors
    (inputs of other dtypes are cast), run outside any surrounding autocast, and give ``model.decode``'s result up to
    the rounding of ``settings.dtype``.
    """

    def __init__(self, model: nn.Module, device: torch.device, enabled: bool = True,
                 settings: Optional[FastSettings] = None):
        self.model = model
        self.device = torch.device(device)
        self.settings = settings if settings is not None else fast_settings(self.device, enabled)
        if self.settings != EXACT:
            for part in (model.post_quant_conv, model.decoder):
                if part is not None:  # latent spaces without quant convs have no post_quant_conv
                    apply_settings(part, self.settings)
            if self.settings.compile:
                n = compile_blocks(model.decoder, dynamic=False)
                log.info("fast decode: %d decoder regions compiled (the first decode of each size compiles them)", n)
        log.info("decoder runs in %s", self.settings.describe())

    def decode(self, z: torch.Tensor, image: Optional[torch.Tensor] = None,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``model.decode(z, image, mask)`` on the fast path; float32 (B,3,H,W)."""
        s = self.settings
        if s == EXACT:
            return self.model.decode(z, image, mask)
        fmt = torch.channels_last if s.channels_last else torch.contiguous_format
        z = z.to(s.dtype)
        if image is not None:
            image = image.to(s.dtype).contiguous(memory_format=fmt)
        no_autocast = torch.autocast(self.device.type, enabled=False) if self.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext()
        with no_autocast:
            return self.model.decode(z, image, mask).float()
