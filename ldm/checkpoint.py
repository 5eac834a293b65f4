"""The one checkpoint loader: every file format a user may bring, read without executing pickled code.

Formats read by :func:`read_state_dict`:

* ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: a file written by ``torch.save`` holding a PyTorch-Lightning checkpoint
  (``ckpt["state_dict"]``) or a bare state dict, memory-mapped and read with ``torch.load(weights_only=True)``. One
  rule: tensors and plain containers are accepted, and beside the weights Lightning's metadata
  (:data:`LIGHTNING_METADATA`, by exact name, read as inert stand-ins and dropped); anything else is refused with
  :class:`CheckpointError` before any of it is unpickled.
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
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ldm.util import write_atomically

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

TORCH_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}

# Types that pickles name by reference although they are plain data (container types, a defaultdict's factory).
_PLAIN_TYPES = (dict, list, set, frozenset, tuple, int, float, str, bool, bytes, complex, collections.OrderedDict,
                collections.defaultdict)
# What Lightning checkpoints carry beside the weights, by exact name: PL 1.x keys callback states by the callback
# class (the paper's release, SD 1.x), callback states hold numpy scalars and paths, ``save_hyperparameters``
# stores OmegaConf / argparse / AttributeDict containers. They are read as inert stand-ins, so their code never
# runs, and dropped: only the weights are kept, and a stand-in among them is refused.
LIGHTNING_METADATA = frozenset({
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "typing.Any",
    "argparse.Namespace",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "pathlib.PosixPath", "pathlib.WindowsPath",
})
# torch.save's legacy (pre-zip) format opens with this pickled magic number; anything else that is not a zip archive
# is not a PyTorch checkpoint (a plain pickle, say) and is never unpickled.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys do not fit the model."""


class _Inert:
    """Stand-in for a pickled metadata object: accepts any construction, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state


def _refused(path: Path, names: Iterable[str] = ()) -> CheckpointError:
    """The one message for every file that holds more than tensors, plain containers and Lightning's metadata."""
    named = f" ({', '.join(sorted(names))})" if names else ""
    return CheckpointError(
        f"{path}: refusing to load: the file holds pickled Python objects{named} where only tensors and plain "
        "containers (and Lightning's metadata beside the weights) are accepted; such objects can run code when "
        "loaded. Re-save the weights as .safetensors from a trusted environment.")


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a ``torch.save`` file (memory-mapped when zip), after torch's own static
    list of the file's globals (:func:`torch.serialization.get_unsafe_globals_in_checkpoint`) shows nothing but
    plain types and :data:`LIGHTNING_METADATA`."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    zipped = head.startswith(b"PK\x03\x04")
    if not zipped and head != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (a file written by torch.save); other pickles "
                              "are never loaded")
    stand_ins = [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name) for name in sorted(LIGHTNING_METADATA)]
    try:
        with torch.serialization.safe_globals(list(_PLAIN_TYPES)):
            # the legacy format has no static listing: torch.load's own refusal below covers it
            unknown = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) if zipped else set()
        if unknown - LIGHTNING_METADATA:
            raise _refused(path, unknown - LIGHTNING_METADATA)
        with torch.serialization.safe_globals(list(_PLAIN_TYPES) + stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError:
        raise _refused(path) from None
    except (RuntimeError, KeyError, EOFError, OSError, ValueError) as e:  # torch's reader on a damaged file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _holds_stand_in(value: Any) -> bool:
    if isinstance(value, _Inert):
        return True
    if isinstance(value, Mapping):
        return any(_holds_stand_in(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_stand_in(v) for v in value)
    return False


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
        if _holds_stand_in(obj):  # Lightning's metadata is accepted beside the weights, never among them
            raise _refused(path, {type(v).__name__ for v in obj.values() if _holds_stand_in(v)})
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
            load_into(model, read_state_dict(ckpt_path), source=ckpt_path, assign=True)
    model = model.to(device)
    if eval_mode:
        model.eval()
    return model
