"""This project's ``ldm`` package for the nodes, under a private import name.

ComfyUI puts its ``comfy/`` folder on ``sys.path``, and ``comfy/ldm`` (no ``__init__.py``) is then found as the
namespace package ``ldm`` before an installed project's ``ldm``; another custom node may ship an ``ldm`` of its own.
So the nodes never import ``ldm`` by that name: :func:`project_ldm` finds this project's folder and loads it as
``asymmetric_vae_ldm`` (``sys.modules["ldm"]`` is left to whoever owns it). Inside the package every import is
relative and a config's ``ldm.*`` target resolves against the package's own name (``ldm.util.PACKAGE``), so the
code is the same either way.

Where the folder is looked for, in order:

1. beside this node folder: ``<checkout>/ldm`` when ``custom_nodes/<name>`` links (or is) ``<checkout>/comfyui_nodes``;
2. the installed distribution ``asymmetric-vqgan``: its ``direct_url.json`` (``pip install -e <checkout>`` or
   ``pip install <checkout>``) names the checkout, or the files it installed hold ``ldm/``.

A folder is taken only if it holds :data:`MARKER` (a file no other ``ldm`` has).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional
from urllib.parse import unquote, urlparse

DISTRIBUTION = "asymmetric-vqgan"
PRIVATE_NAME = "asymmetric_vae_ldm"
MARKER = Path("integrations") / "comfyui.py"


def is_ours(folder: Path) -> bool:
    return (folder / "__init__.py").is_file() and (folder / MARKER).is_file()


def _installed_folders() -> Iterator[Path]:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return
    direct_url = dist.read_text("direct_url.json")
    if direct_url:
        url = json.loads(direct_url).get("url", "")
        if url.startswith("file:"):
            yield Path(unquote(urlparse(url).path)) / "ldm"
    yield Path(str(dist.locate_file("ldm")))


def candidate_folders() -> Iterator[Path]:
    yield Path(__file__).resolve().parent.parent / "ldm"
    yield from _installed_folders()


def find_ldm_folder() -> Path:
    tried = []
    for folder in candidate_folders():
        if is_ours(folder):
            return folder.resolve()
        tried.append(str(folder))
    raise ImportError(f"asymmetric VAE nodes: this project's ldm package was not found (tried {', '.join(tried)}); "
                      f"install the project into ComfyUI's Python (pip install -e <repository>) or link the "
                      f"repository's comfyui_nodes folder into custom_nodes/")


def _same_folder(module: Optional[ModuleType], folder: Path) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and Path(file).resolve().parent == folder


def project_ldm() -> ModuleType:
    """The project's ``ldm`` package: ``sys.modules["ldm"]`` if that is already ours (a script or test that imported
    it), else the package loaded once under a private name."""
    folder = find_ldm_folder()
    if _same_folder(sys.modules.get("ldm"), folder):
        return sys.modules["ldm"]
    name = PRIVATE_NAME
    if name in sys.modules and not _same_folder(sys.modules[name], folder):  # a second copy of the node pack
        name = f"{PRIVATE_NAME}_{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


LDM = project_ldm()


def submodule(name: str) -> ModuleType:
    """``submodule("integrations.comfyui")``: that module of the project's ``ldm``, whatever its import name."""
    return importlib.import_module(f"{LDM.__name__}.{name}")
