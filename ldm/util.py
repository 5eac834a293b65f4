"""Shared by every entry point: ``target`` / ``params`` instantiation, and the rules of every write: what an
output may replace (:func:`check_output`), atomic writes (:func:`write_atomically`, :class:`WriteError`) and the
clean-up of killed writes (:func:`remove_stale_temporaries`). docs/reliability.md states the same rules."""
from __future__ import annotations

import difflib
import errno
import importlib
import inspect
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Optional, Union

# a file or folder argument: a string or anything os.fspath takes (the one definition)
PathLike = Union[str, os.PathLike]


# The name this package was imported under: ``ldm`` from a checkout or an install, another name where a host
# (ComfyUI) already has an ``ldm`` of its own and the node pack loads this one beside it. Inside the package every
# import is relative, and a config's ``ldm.*`` target resolves here, so both ways run the same code.
PACKAGE = __name__.rpartition(".")[0]


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``; ``ldm.*`` means this package, whatever its import name."""
    module, cls = string.rsplit(".", 1)
    if module == "ldm" or module.startswith("ldm."):
        module = PACKAGE + module[3:]
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def check_params(target: Callable[..., Any], params: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming every key of ``params`` that ``target`` does not take, with the keys it does take.

    A misspelt key must never be swallowed: ``conditon: true`` would otherwise build a decoder without its branch.
    Targets that take ``**kwargs`` check their own keys.
    """
    signature = inspect.signature(target)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    known = [name for name, p in signature.parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [key for key in params if key not in known]
    if unknown:
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, 1))
                 else repr(key) for key in unknown]
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                         f"the keys it takes: {', '.join(known)}")


def instantiate_from_config(config: Mapping[str, Any], **extra: Any) -> Any:
    """Build ``config["target"](**config["params"], **extra)``; a key the target does not take is an error that
    names it (:func:`check_params`).

    The two sentinel strings of the original code are kept: ``__is_first_stage__`` and
    ``__is_unconditional__`` return ``None``.
    """
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"config has no 'target' key: {dict(config) if isinstance(config, Mapping) else config!r}")
    params = dict(config.get("params", None) or {})
    params.update(extra)
    target = get_obj_from_str(config["target"])
    check_params(target, params, f"params of {config['target']}")
    return target(**params)


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    if exists(val):
        return val
    return d() if callable(d) else d


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file / folder under the current umask (``mkstemp`` and
    ``mkdtemp`` use 0600 / 0700, which would leave outputs unreadable by the user's group)."""
    return (0o777 if directory else 0o666) & ~_umask()


def check_output(path: Union[str, os.PathLike], *, inputs: Iterable[Union[str, os.PathLike]] = (),
                 overwrite: bool = False, folder: bool = False,
                 replaceable: Optional[Callable[[Path], bool]] = None, flag: str = "output") -> Path:
    """The rule of every writer, checked before any work starts; -> the absolute output path.

    * An input is never replaced: ``path`` may not be an input, nor a folder that contains one, nor lie inside an
      input that is a folder (``from-diffusers D D/diffusion_pytorch_model.safetensors``); paths resolved, links
      followed, ``.`` and ``../here`` included: ``ValueError``.
    * An existing ``path`` is kept unless ``overwrite`` (``FileExistsError``), and even then only what this tool
      wrote, recognisably, is replaced: a file where a file is written (a folder there is a ``ValueError``; a
      symbolic link there is replaced by the new file, its target is left alone); a folder (``folder=True``) only
      when ``replaceable(path)`` says it holds nothing but what the tool writes (a model export:
      ``ldm.checkpoints.files.is_model_export``), and never through a symbolic link (``ValueError`` naming the
      link's target); anything else is a ``ValueError``.
    """
    given = Path(path)
    out = Path(os.path.abspath(given))
    resolved = out.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if resolved == src or resolved in src.parents or (src.is_dir() and src in resolved.parents):
            where = "is" if resolved == src else "contains" if resolved in src.parents else "lies inside"
            raise ValueError(f"{flag} {given} {where} the input {item}: inputs are never replaced; choose an output "
                             "outside the inputs")
    if not os.path.lexists(out):
        return out
    if not overwrite:
        raise FileExistsError(f"{flag} {given} already exists (use --overwrite to replace it)")
    if folder:
        if out.is_symlink():
            raise ValueError(f"{flag} {given} is a symbolic link (to {os.readlink(out)}): a folder is not replaced "
                             "through a link, even with --overwrite; name the folder itself, or remove the link")
        if not out.is_dir():
            raise ValueError(f"{flag} {given} is a file, not a folder this tool wrote: not replaced, even with "
                             "--overwrite")
        if replaceable is None or not replaceable(out):
            held = sorted(p.name for p in out.iterdir())
            raise ValueError(f"{flag} {given} holds files this tool did not write ({', '.join(held[:5])}"
                             f"{' ...' if len(held) > 5 else ''}): not replaced, even with --overwrite; choose a new "
                             "folder")
    elif out.is_dir():
        raise ValueError(f"{flag} {given} is a folder: this writes a file; name the file (e.g. {given / 'model'}"
                         "...) instead")
    return out


class WriteError(OSError):
    """A write that failed (full disk, read-only or vanished folder, ...): the message names the file and says
    that nothing was left half-written (the previous file, if any, is unchanged)."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without "[Errno 28]"


def write_failed(path: Path, err: BaseException) -> WriteError:
    """The one message of a failed write (``err``) of ``path``, whose temporary file the caller has removed."""
    code = getattr(err, "errno", None)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < 1 << 20):
        why = "the disk is full"
    else:
        why = getattr(err, "strerror", None) or f"{type(err).__name__}: {err}"
    return WriteError(code or errno.EIO, f"{path}: could not be written ({why}); nothing was left half-written "
                      f"({'the previous file is unchanged' if path.exists() else 'no file was created'})")


# write_atomically's temporary files: ".<name>.<writer's pid>.<8 random characters>.tmp" next to the target; only
# this form is ever removed by remove_stale_temporaries (a name without the pid may be another tool's)
_TEMP_NAME = re.compile(r"\..+?\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")


def write_atomically(path: PathLike, write: Callable[[str], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk, then rename it over ``path``:
    ``path`` is always absent, the old file or the complete new one, never half-written. The new file gets the
    usual permissions (umask), not ``mkstemp``'s 0600. ``overwrite=False``: an existing ``path`` is never replaced,
    also one created by another process meanwhile (``FileExistsError``; the check and the rename are one step).
    A failure of the write itself (a full disk, ``torch.save``'s "unexpected pos", a ``SafetensorError``) is a
    :class:`WriteError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
    except (FileExistsError, WriteError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001  (any failure of the writer: the file system's, torch's, safetensors')
        if isinstance(e, (TypeError, AttributeError, KeyError, NameError)):
            raise  # a programming error, not a failed write
        raise write_failed(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _rename_no_clobber(tmp: str, path: Path) -> None:
    """A hard link fails if ``path`` exists, atomically; where the file system has no hard links, an exclusive
    create claims the name first."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "file exists (not replaced)", str(path)) from None
    except OSError:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)


def write_numbered(folder: PathLike, name: Callable[[int], str], start: int,
                   write: Callable[[str], None]) -> Path:
    """Write a new file ``folder/name(n)`` for the first ``n >= start`` whose name is free at the moment of
    writing (see :func:`write_atomically`): runs writing into one folder at once never replace each other's files."""
    n = start
    while True:
        try:
            return write_atomically(Path(folder) / name(n), write, overwrite=False)
        except FileExistsError:
            n += 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: PathLike, recursive: bool = True) -> List[Path]:
    """Delete the temporary files :func:`write_atomically` left in ``folder`` (recursively, unless not
    ``recursive``) when its process was killed mid-write; returns them. Only what this project provably wrote goes:
    a name of :func:`write_atomically`'s form, with the writer's pid, whose process is gone (or is this one). The
    temporaries of live processes (another run writing into the same ``--outdir`` now) and names without a pid
    (another tool's, or an old version's) are kept. The pid is this machine's: on a folder shared between hosts
    a dead local pid can be a live remote writer, so only one host should write into such a folder at a time."""
    found = Path(folder).rglob(".*.tmp") if recursive else Path(folder).glob(".*.tmp")
    stale = []
    for p in found:
        match = _TEMP_NAME.fullmatch(p.name)
        if not match or not (p.is_file() or p.is_dir()) or p.is_symlink():
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and _alive(pid):
            continue
        stale.append(p)
    for p in stale:
        if p.is_dir():  # a folder written as a whole (ldm.checkpoints.diffusers.write_diffusers_folder)
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale
