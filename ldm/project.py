"""Where the project's own files are: the repository root, and paths the project names relative to it.

Standard library only at import, so that a script can resolve its defaults before torch is imported (``--help``
stays fast); :func:`load_yaml` imports OmegaConf when called.
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


# A config's top-level list of the configs it extends (merged first, left to right, then the config over them).
DEFAULTS_KEY = "defaults"


def load_yaml(path: Union[str, os.PathLike], _seen: Sequence[Path] = ()) -> Any:
    """A config file as an OmegaConf ``DictConfig``, with the configs its ``defaults:`` list names merged under
    it (each path relative to the naming file's folder, else as :func:`resolve_config_path` finds it), so that
    the ``_train`` configs share one recipe (``configs/autoencoder/recipe/``). Every config of the project is
    read through here; one without ``defaults`` is ``OmegaConf.load`` of it."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    path = Path(path)
    config = OmegaConf.load(path)
    if not isinstance(config, DictConfig) or DEFAULTS_KEY not in config:
        return config
    names = config.pop(DEFAULTS_KEY)
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, ListConfig)):
        raise ValueError(f"{path}: {DEFAULTS_KEY} must be a list of config files, got {names!r}")
    seen = (*_seen, path.resolve())
    bases = []
    for name in names:
        beside = path.parent / str(name)
        base = beside if beside.is_file() else resolve_config_path(str(name), f"{path}: {DEFAULTS_KEY}")
        if base.resolve() in seen:
            raise ValueError(f"{path}: {DEFAULTS_KEY} names {name}, which extends {path.name} itself")
        bases.append(load_yaml(base, seen))
    return merge_configs(*bases, config)


def merge_configs(*configs: Any) -> Any:
    """OmegaConf's merge, left to right, with one rule of ours: where a later config names another ``target`` for
    a section, that section is replaced whole, not merged key by key, since the earlier ``params`` belong to
    another class (``--base train.yaml shards.yaml``: the shards' ``WebDatasetInpainting`` params replace the image
    folder's ``root`` instead of keeping it beside them)."""
    import copy

    from omegaconf import DictConfig, OmegaConf

    def drop_replaced(base: Any, new: Any) -> None:
        for key in list(new.keys()) if isinstance(new, DictConfig) else []:
            old, nxt = base.get(key) if isinstance(base, DictConfig) else None, new[key]
            if not (isinstance(old, DictConfig) and isinstance(nxt, DictConfig)):
                continue
            if "target" in nxt and "target" in old and nxt["target"] != old["target"]:
                del base[key]
            else:
                drop_replaced(old, nxt)

    merged = copy.deepcopy(configs[0])
    for config in configs[1:]:
        drop_replaced(merged, config)
        merged = OmegaConf.merge(merged, config)
    return merged
