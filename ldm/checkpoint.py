"""The one checkpoint loader: every file format a user may bring, read without executing pickled code.

Formats read by :func:`read_state_dict`:

* ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: a PyTorch-Lightning checkpoint (``ckpt["state_dict"]``) or a bare state
  dict, read with ``torch.load(weights_only=True)``. Lightning/OmegaConf metadata that weights-only loading refuses
  (callback states keyed by class, hyper-parameter containers) is replaced by inert placeholders, since only
  tensors are kept; any other pickled global (``os.system`` ...) is refused with :class:`CheckpointError`.
* ``.safetensors``.
* a diffusers ``AsymmetricAutoencoderKL`` / ``AutoencoderKL`` folder (``config.json`` + weights), converted to our
  keys by :mod:`ldm.diffusers_interop`.

:func:`load_into` then checks the keys against a model and explains every mismatch.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ldm.util import write_atomically

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

TORCH_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}

# Globals found in training checkpoints that are metadata, never weights. They are replaced by `_Inert` on load.
_INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "typing.",
                          "numpy.", "argparse.", "pathlib.", "main.", "ldm.", "taming.")
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# Plain containers and value types that metadata (OmegaConf configs, hyper-parameter dicts) pickles by reference: data, not code.
_SAFE_CONTAINERS = [dict, list, set, tuple, int, float, str, bool, bytes, complex, collections.OrderedDict]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys do not fit the model."""


class _Inert:
    """Stand-in for a pickled metadata object: accepts any construction, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state


def _torch_load_weights_only(path: Path) -> Any:
    inert: list = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(_SAFE_CONTAINERS + inert):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except pickle.UnpicklingError as e:
            match = _UNSUPPORTED_GLOBAL.search(str(e))
            if match is None:
                raise CheckpointError(f"{path}: not a weights checkpoint this loader can read safely "
                                      f"({_unpickler_reason(e)})") from None
            name = match.group(1)
            if not name.startswith(_INERT_MODULE_PREFIXES) or "is blocked" in str(e):
                raise CheckpointError(
                    f"{path}: refusing to load: the file contains the pickled Python object {name!r}, which a "
                    "weights file never needs and which could run code. Only tensors (and Lightning metadata) "
                    "are accepted; re-save the weights as .safetensors from a trusted environment.") from None
            inert.append((type(name.rsplit(".", 1)[-1], (_Inert,), {}), name))
        except (RuntimeError, KeyError, EOFError, OSError) as e:  # torch's reader on a file that is no checkpoint
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    raise CheckpointError(f"{path}: too many unknown pickled globals; not a weights checkpoint")


def _unpickler_reason(error: Exception) -> str:
    """The unpickler's own reason, without torch's advice to retry with ``weights_only=False``."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            rest = line[len("WeightsUnpickler error:"):].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest or "unreadable pickle"
    return lines[-1] if lines else type(error).__name__


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_state_dict(path: PathLike, prefix: Optional[str] = None) -> StateDict:
    """Read the tensors of a checkpoint in any supported format (see module docstring).

    ``prefix`` keeps only keys that start with it, stripped (``"first_stage_model."`` takes the VAE out of a full
    Stable Diffusion checkpoint).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        from ldm.diffusers_interop import read_diffusers_folder

        state_dict, _ = read_diffusers_folder(path)
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state_dict = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
    elif path.suffix in TORCH_SUFFIXES:
        obj = _torch_load_weights_only(path)
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a state dict or a Lightning checkpoint, found {type(obj).__name__}")
        state_dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(state_dict) != len(obj):
            log.info("%s: skipped %d non-tensor entries", path, len(obj) - len(state_dict))
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected one of "
                              f"{sorted(TORCH_SUFFIXES | {'.safetensors'})} or a diffusers model folder")
    if prefix:
        stripped = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not stripped:
            sample = ", ".join(sorted(state_dict)[:5])
            raise CheckpointError(f"{path}: no key starts with {prefix!r} (first keys: {sample})")
        state_dict = stripped
    return state_dict


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                    metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write tensors atomically as ``.safetensors`` or as a Lightning-style ``.ckpt``/``.pt`` (``{"state_dict": ...}``)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors that share memory: give each its own storage
        write_atomically(path, lambda tmp: save_file({k: v.clone() for k, v in tensors.items()}, tmp,
                                                     metadata=dict(metadata or {})))
    elif path.suffix in TORCH_SUFFIXES:
        payload = {"state_dict": tensors, **({"metadata": dict(metadata)} if metadata else {})}
        write_atomically(path, lambda tmp: torch.save(payload, tmp))
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; use .safetensors or .ckpt")
    return path


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
              allow_missing: Iterable[str] = (), hint: Optional[str] = None) -> None:
    """Load ``state_dict`` into ``model`` strictly, after dropping what is known to be unused.

    ``ignore_keys``: prefixes the caller asked to skip (the original configs' ``ignore_keys: [decoder]``); the
    model keeps its own initialisation there. ``known_unused``: {prefix: reason} dropped with one log line each
    (``decoder.up_layers.`` of the original release, ``loss.`` in inference ...). ``allow_missing``: model key
    prefixes that may be absent (freshly initialised parts). Anything else missing, unexpected or mis-shaped raises
    :class:`CheckpointError` naming the keys, plus ``hint`` (e.g. which config variant the tensors look like).
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
    model.load_state_dict(sd, strict=False)


def load_model(config: Any, ckpt_path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
               eval_mode: bool = True) -> nn.Module:
    """Instantiate ``config`` (a path to a YAML, an OmegaConf/dict with ``target``, or with a ``model`` section)
    and load ``ckpt_path`` into it through the model's ``init_from_ckpt`` (or :func:`load_into`), strictly: an
    autoencoder whose config has a condition branch needs one in the file."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    if isinstance(config, (str, os.PathLike)):
        config_path = Path(config)
        if not config_path.is_file():
            raise FileNotFoundError(f"config not found: {config_path}")
        config = OmegaConf.load(config_path)
    if "model" in config:
        config = config["model"]
    model = instantiate_from_config(config)
    if ckpt_path is not None:
        from ldm.models.autoencoder import AutoencoderKL

        if isinstance(model, AutoencoderKL):
            # a model to use: every part, the condition branch included, must come from the file
            model.init_from_ckpt(ckpt_path, fresh_condition=False)
        elif hasattr(model, "init_from_ckpt"):
            model.init_from_ckpt(ckpt_path)
        else:
            load_into(model, read_state_dict(ckpt_path), source=ckpt_path)
    model = model.to(device)
    if eval_mode:
        model.eval()
    return model
