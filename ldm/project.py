"""Where the project's own files are: the repository root, and paths the project names relative to it.

Standard library only, so that a script can resolve its defaults before torch is imported (``--help`` stays fast).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
# what --ckpt / --ckpt_c of the scripts take, for "not found" messages
DECODER_FILES = ("the paper's decoder checkpoint (base.ckpt, larger1.5.ckpt, larger2.ckpt), a .safetensors of it or "
                 "a diffusers AsymmetricAutoencoderKL folder")
# help of the --fast flag every decoding script takes (ldm.fast.FastDecode)
FAST_HELP = ("decode on the fast path of the device (ldm/fast.py): bfloat16 + channels_last on CPUs with native bf16 "
             "and on GPUs (GPUs also compile the decoder's blocks), float32 + channels_last on other CPUs; the output "
             "differs from the exact float32 decode by bf16 rounding (PSNR in docs/benchmark.md)")


def resolve_config_path(path: Union[str, os.PathLike], argument: str = "mask_config") -> Path:
    """``path`` as given if it exists, else relative to the repository root (the project's defaults and configs
    name repository-relative files, which must work from any folder). Missing: ``FileNotFoundError`` naming
    ``argument``."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    in_repo = REPO_ROOT / candidate
    if not candidate.is_absolute() and in_repo.is_file():
        return in_repo
    raise FileNotFoundError(f"{argument} {path}: not found (looked in {Path.cwd()} and {REPO_ROOT})")


def check_run_files(opt: Any, configs: Sequence[str], files: Mapping[str, str]) -> None:
    """Before anything heavy loads: each ``--flag`` in ``configs`` is resolved by :func:`resolve_config_path` (and
    replaced on ``opt``), each one in ``files`` must exist; ``files`` maps the flag to what belongs there, for the
    ``FileNotFoundError`` that names every missing one with its flag."""
    for flag in configs:
        setattr(opt, flag[2:], str(resolve_config_path(getattr(opt, flag[2:]), flag)))
    missing = [f"{flag} {getattr(opt, flag[2:])}: not found; pass {what}" for flag, what in files.items()
               if not Path(getattr(opt, flag[2:])).exists()]
    if missing:
        raise FileNotFoundError("\n".join(missing))
