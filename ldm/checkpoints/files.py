"""Checkpoint files, the bottom layer of checkpoint handling: bytes on disk -> tensors, read without executing
pickled code; nothing here knows a key layout or a model.

* ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: a file written by ``torch.save`` holding a PyTorch-Lightning checkpoint
  (``ckpt["state_dict"]``) or a bare state dict, memory-mapped and read with ``torch.load(weights_only=True)``. One
  rule: tensors and plain containers are accepted, and beside the weights Lightning's metadata
  (:data:`LIGHTNING_METADATA`, by exact name, read as inert stand-ins and dropped); anything else is refused with
  :class:`CheckpointError` before any of it is unpickled.
* ``.safetensors`` (memory-mapped).
* a diffusers model folder's files (``config.json`` + weights), still in diffusers' keys.

The layers above: :mod:`ldm.latent_spaces` (what the tensors are), :mod:`ldm.checkpoints.diffusers` and
:mod:`ldm.checkpoints.keys` (key layouts; any format into our keys, checked against a model), the models, and
:mod:`ldm.loading` (config + checkpoint -> model).
"""
from __future__ import annotations

import collections
import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from ..util import PathLike, check_output, write_atomically

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"
TORCH_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
# the files of a model export (save_pretrained / write_diffusers_folder), shards included
_EXPORT_FILE = re.compile(r"config\.json|diffusion_pytorch_model(-\d+-of-\d+)?\.(safetensors|bin)"
                          r"|diffusion_pytorch_model\.(safetensors|bin)\.index\.json")

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


def is_model_export(folder: Path) -> bool:
    """True when ``folder`` holds a model export and nothing else (``config.json`` + weights files, no
    sub-folders), or nothing at all: the only folders a converter may replace (``ldm.util.check_output``)."""
    entries = list(Path(folder).iterdir())
    if not entries:
        return True
    names = {p.name for p in entries}
    return CONFIG_NAME in names and all(p.is_file() and _EXPORT_FILE.fullmatch(p.name) for p in entries)


_CRC_CHUNK = 1 << 22


def verify_zip_checksums(path: PathLike) -> None:
    """Read every member of a zip-format ``torch.save`` file once, in chunks (``zipfile`` checks each member's
    CRC-32 as it reads it to the end): a damaged file is a :class:`CheckpointError` naming it and the member, where
    memory-mapped loading would give wrong weights without a word."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    while member.read(_CRC_CHUNK):
                        pass
    except zipfile.BadZipFile as e:
        if "CRC" not in str(e):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (BadZipFile: {e})") from None
        raise CheckpointError(f"{path}: damaged checkpoint ({e}): its bytes changed after it was written (a "
                              "failed copy or download, a bad disk); copy it again") from None
    except (OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


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
    if zipped:
        verify_zip_checksums(path)
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


def read_weights_file(path: PathLike) -> StateDict:
    """The tensors of one ``.safetensors`` or ``torch.save`` file (a Lightning checkpoint gives its
    ``state_dict``), keys as stored in the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
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
            raise CheckpointError(f"{path}: expected a state dict or a Lightning checkpoint, "
                                  f"found {type(obj).__name__}")
        if _holds_stand_in(obj):  # Lightning's metadata is accepted beside the weights, never among them
            raise _refused(path, {type(v).__name__ for v in obj.values() if _holds_stand_in(v)})
        state_dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(state_dict) != len(obj):
            log.info("%s: skipped %d non-tensor entries", path, len(obj) - len(state_dict))
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected one of "
                              f"{sorted(TORCH_SUFFIXES | {'.safetensors'})} or a diffusers model folder")
    return state_dict


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                    metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write tensors atomically as ``.safetensors`` or as a Lightning-style ``.ckpt``/``.pt``
    (``{"state_dict": ...}``)."""
    path = Path(path)
    check_output(path, overwrite=True)  # never onto a folder
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


def _weights_file(folder: Path) -> List[Path]:
    for name in (WEIGHTS_NAME, WEIGHTS_NAME_BIN):
        if (folder / name).is_file():
            return [folder / name]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a diffusers weight index ({e})") from None
        return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no weights: expected {WEIGHTS_NAME} (or {WEIGHTS_NAME_BIN}, or sharded "
                          f"{WEIGHTS_INDEX_NAME}) next to {CONFIG_NAME}")


def read_diffusers_config(folder: PathLike) -> Dict[str, Any]:
    """``config.json`` of a diffusers model folder (a pipeline folder's ``vae/`` is used when given the pipeline)."""
    return json.loads(_model_folder(Path(folder)).joinpath(CONFIG_NAME).read_text())


def _model_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers model folder not found: {folder}")
    if not (folder / CONFIG_NAME).is_file() and (folder / "vae" / CONFIG_NAME).is_file():
        log.info("%s is a pipeline folder: reading its vae/", folder)
        folder = folder / "vae"
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder}: not a diffusers model folder: {CONFIG_NAME} is missing (expected "
                              f"{CONFIG_NAME} + {WEIGHTS_NAME}, as written by save_pretrained)")
    return folder


def read_diffusers_files(folder: PathLike) -> Tuple[Path, StateDict, Dict[str, Any]]:
    """A diffusers model folder (``config.json`` + ``.safetensors``, sharded or not, or a ``.bin`` read weights-only;
    a pipeline folder's ``vae/``) -> ``(model folder, tensors in diffusers' keys, config)``."""
    folder = _model_folder(Path(folder))
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except ValueError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: not valid JSON ({e})") from None
    state_dict: StateDict = {}
    for path in _weights_file(folder):
        state_dict.update(read_weights_file(path))
    return folder, state_dict, config
