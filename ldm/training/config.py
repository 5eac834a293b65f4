"""The run's configuration: YAML files and ``key.sub=value`` overrides merged and checked (an unknown key names the
closest real one), and every file the run reads checked before anything is built."""
from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path
from typing import List, Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from ..project import load_yaml, merge_configs, resolve_config_path

log = logging.getLogger("main")


def load_config(files: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """Merge YAML files left to right (a relative path not found in the working folder is looked up in the
    project; a section whose ``target`` a later file changes is replaced whole: :func:`ldm.project.merge_configs`),
    then dot-list overrides (``key.sub=value``); every section is checked by :func:`check_config_keys`."""
    files = [resolve_config_path(f, "--base") for f in files]  # the project's configs work from any folder
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        raise ValueError(f"unrecognised arguments {bad}: use the flags of `python main.py --help` or "
                         "key.sub=value config overrides")
    config = merge_configs(*[load_yaml(f) for f in files], OmegaConf.from_dotlist(list(overrides)))
    check_config_keys(config)
    return config


# The keys of the fixed sections (``target`` / ``params`` sections are checked against what their target takes
# when they are built: ldm.util.check_params).
CONFIG_KEYS = {"": ("model", "data", "lightning"), "model": ("target", "params", "base_learning_rate"),
               "data": ("target", "params"),
               "lightning": ("trainer", "callbacks", "modelcheckpoint", "periodic_checkpoints", "wandb",
                             "wandb_project"),
               "lightning.modelcheckpoint": ("params",)}


def _unknown_keys(where: str, keys: Sequence[str], known: Sequence[str]) -> List[str]:
    out = []
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), 1)
            out.append(f"{where + '.' if where else ''}{key}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return out


def check_config_keys(config: DictConfig) -> None:
    """An unknown key of a fixed section (a misspelt ``lightning.trainr``, ``model.base_learning_rat``), of
    ``lightning.trainer`` (the Trainer's arguments), ``lightning.modelcheckpoint.params`` (ModelCheckpoint's) or
    a ``lightning.callbacks.<name>`` entry is a ``ValueError`` naming every one with the closest real key; a
    misspelt key would otherwise be ignored and the run would train with the config's values."""
    unknown = []
    for where, known in CONFIG_KEYS.items():
        section = OmegaConf.select(config, where) if where else config
        if isinstance(section, DictConfig):
            unknown += _unknown_keys(where, list(section.keys()), known)
    trainer = OmegaConf.select(config, "lightning.trainer")
    if isinstance(trainer, DictConfig):
        known = [k for k in inspect.signature(pl.Trainer.__init__).parameters if k != "self"] + ["gpus"]
        unknown += _unknown_keys("lightning.trainer", list(trainer.keys()), known)
    params = OmegaConf.select(config, "lightning.modelcheckpoint.params")
    if isinstance(params, DictConfig):
        known = [k for k in inspect.signature(ModelCheckpoint.__init__).parameters if k != "self"]
        unknown += _unknown_keys("lightning.modelcheckpoint.params", list(params.keys()), known)
    callbacks = OmegaConf.select(config, "lightning.callbacks")
    if isinstance(callbacks, DictConfig):
        for name, entry in callbacks.items():
            if isinstance(entry, DictConfig):
                unknown += _unknown_keys(f"lightning.callbacks.{name}", list(entry.keys()), ("target", "params"))
    if unknown:
        raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''}: {'; '.join(unknown)}")


def check_run_inputs(config: DictConfig) -> None:
    """Every file and folder the run reads, checked before any model is built: the starting weights
    (``model.params.ckpt_path``), the VGG16 weights of the LPIPS loss, the data folders and file lists; one
    ``FileNotFoundError`` names every missing one."""
    missing = []
    ckpt = OmegaConf.select(config, "model.params.ckpt_path")
    if ckpt is not None and not Path(ckpt).exists():
        missing.append(f"model.params.ckpt_path={ckpt}: not found (the starting weights; see docs/training.md)")
    loss = OmegaConf.select(config, "model.params.lossconfig")
    if isinstance(loss, DictConfig) and str(loss.get("target", "")).endswith("LPIPSWithDiscriminator"):
        from ..modules.losses.contperceptual import VGG16_URL, LPIPSWithDiscriminator, default_vgg16_path

        params = loss.get("params") or {}
        weight = params.get("perceptual_weight", inspect.signature(LPIPSWithDiscriminator).parameters[
            "perceptual_weight"].default)
        vgg = Path(params.get("vgg_path") or default_vgg16_path())
        if float(weight) > 0 and not vgg.is_file():
            missing.append(f"{vgg}: not found (the VGG16 weights of the LPIPS loss: download {VGG16_URL}, or set "
                           "model.params.lossconfig.params.vgg_path)")
    for split in ("train", "validation", "test", "predict"):
        params = OmegaConf.select(config, f"data.params.{split}.params")
        for key in ("root", "file_list"):
            value = params.get(key) if isinstance(params, DictConfig) else None
            if value is not None and not Path(str(value)).expanduser().exists():
                missing.append(f"data.params.{split}.params.{key}={value}: not found")
    if missing:
        raise FileNotFoundError("the run needs files that are missing: " + "; ".join(missing))
