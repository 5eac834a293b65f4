"""Shared by every entry point: ``target`` / ``params`` instantiation and atomic file writes."""
from __future__ import annotations

import difflib
import errno
import importlib
import inspect
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Mapping, Union

# a file or folder argument: a string or anything os.fspath takes (the one definition)
PathLike = Union[str, os.PathLike]


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``."""
    module, cls = string.rsplit(".", 1)
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


# write_atomically's temporary files: ".<name>.<8 random characters>.tmp" next to the target
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def write_atomically(path: PathLike, write: Callable[[str], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, flush it to disk, then rename it over ``path``:
    ``path`` is always absent, the old file or the complete new one, never half-written. The new file gets the
    usual permissions (umask), not ``mkstemp``'s 0600. ``overwrite=False``: an existing ``path`` is never replaced,
    also one created by another process meanwhile (``FileExistsError``; the check and the rename are one step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
    finally:
        if os.path.exists(tmp):
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


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Delete the temporary files :func:`write_atomically` left in ``folder`` (recursively) when its process was
    killed mid-write; returns them. Only for folders no other process is writing to."""
    stale = [p for p in Path(folder).rglob(".*.tmp") if p.is_file() and _TEMP_NAME.fullmatch(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
