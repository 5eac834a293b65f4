"""The one reader of weights into our key layout, and the key check against a model.

:func:`read_state_dict` takes every format a user may bring (:mod:`ldm.checkpoints.files`: ``.ckpt``/``.pt``
weights-only, ``.safetensors``; a diffusers folder through :mod:`ldm.checkpoints.diffusers`) and returns our keys;
:func:`load_into` checks them against a model, explains every mismatch and assigns the tensors. Models call these;
:func:`ldm.loading.load_model` (config + checkpoint -> model) sits above the models.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from ..checkpoints.diffusers import read_diffusers_folder
from ..checkpoints.files import CheckpointError, PathLike, StateDict, read_weights_file
from ..checkpoints.tensors import strip_prefix

log = logging.getLogger(__name__)


def read_state_dict(path: PathLike, prefix: Optional[str] = None) -> StateDict:
    """The tensors of a checkpoint in any supported format, a diffusers folder converted to our keys.

    ``prefix`` keeps only keys that start with it, stripped (``"cond_stage_model."`` takes the text encoder out of
    a full Stable Diffusion checkpoint; for the VAE see :func:`ldm.checkpoints.tensors.autoencoder_state_dict`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state_dict = read_diffusers_folder(path)[0] if path.is_dir() else read_weights_file(path)
    if prefix:
        stripped = strip_prefix(state_dict, prefix)
        if not stripped:
            sample = ", ".join(sorted(state_dict)[:5])
            raise CheckpointError(f"{path}: no key starts with {prefix!r} (first keys: {sample})")
        state_dict = stripped
    return state_dict


def _drop(state_dict: StateDict, prefixes: Iterable[str]) -> Tuple[StateDict, int]:
    prefixes = tuple(prefixes)
    kept = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    return kept, len(state_dict) - len(kept)


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: PathLike = "<state dict>",
              ignore_keys: Iterable[str] = (), known_unused: Optional[Mapping[str, str]] = None,
              allow_missing: Iterable[str] = (), hint: Optional[str] = None, assign: bool = False) -> None:
    """Load ``state_dict`` into ``model`` strictly, after dropping what is known to be unused.

    ``ignore_keys``: prefixes the caller asked to skip (the original configs' ``ignore_keys: [decoder]``); the
    model keeps its own initialisation there. ``known_unused``: {prefix: reason} dropped with one log line each
    (``decoder.up_layers.`` of the original release, ``loss.`` in inference ...). ``allow_missing``: model key
    prefixes that may be absent (freshly initialised parts). Anything else missing, unexpected or mis-shaped raises
    :class:`CheckpointError` naming the keys, plus ``hint`` (e.g. which config variant the tensors look like).

    ``assign``: the checkpoint's tensors become the model's (cast only where dtype or device differ) instead of
    being copied into its fresh ones, so a memory-mapped file is never read in full and peak memory stays near
    the model's own size. Only for tensors nobody else holds, such as those fresh from :func:`read_state_dict`.
    """
    sd = dict(state_dict)
    ignore_keys = tuple(ignore_keys)
    sd, n_ignored = _drop(sd, ignore_keys)
    if n_ignored:
        log.info("%s: not loading %d keys under %s (ignore_keys)", source, n_ignored, list(ignore_keys))
    for prefix, reason in (known_unused or {}).items():
        sd, n = _drop(sd, [prefix])
        if n:
            log.info("%s: dropped %d keys under %r: %s", source, n, prefix, reason)

    expected = model.state_dict()
    allowed = ignore_keys + tuple(allow_missing)
    missing = [k for k in expected if k not in sd and not k.startswith(allowed)]
    unexpected = [k for k in sd if k not in expected]
    mis_shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"{source}: checkpoint does not fit {type(model).__name__}"]
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} keys with other shapes: {_listing(mis_shaped, 4)}")
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if hint:
            parts.append(hint)
        raise CheckpointError("\n  ".join(parts))
    absent = [k for k in expected if k not in sd]
    if absent:
        log.info("%s: %d model keys not in the checkpoint keep their initialisation (%s)", source, len(absent),
                 _listing(absent, 3))
    if assign:
        sd = {k: v if (v.dtype, v.device) == (expected[k].dtype, expected[k].device) else v.to(expected[k])
              for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=assign)
