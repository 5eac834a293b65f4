"""Where the project's own files are: the repository root, and paths the project names relative to it.

Standard library only, so that a script can resolve its defaults before torch is imported (``--help`` stays fast).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_config_path(path: Union[str, os.PathLike], argument: str = "mask_config") -> Path:
    """``path`` as given if it exists, else relative to the repository root (the project's defaults and configs
    name repository-relative files, which must work from any folder). Missing: ``FileNotFoundError`` naming
    ``argument``."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    in_repo = REPO_ROOT / candidate
    if not candidate.is_absolute() and in_repo.exists():
        return in_repo
    raise FileNotFoundError(f"{argument} {path}: not found (looked in {Path.cwd()} and {REPO_ROOT})")
