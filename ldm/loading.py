"""Config + checkpoint -> a model ready to use: the entry point above the models (scripts, notebooks, tests)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .checkpoints.architecture import autoencoder_config
from .checkpoints.files import CheckpointError, PathLike
from .checkpoints.keys import load_into, read_state_dict
from .models.autoencoder import AutoencoderKL
from .project import load_yaml, resolve_config_path
from .util import instantiate_from_config


def load_model(config: Any, ckpt_path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
               eval_mode: bool = True, state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """Instantiate ``config`` (a path to a YAML, an OmegaConf/dict with ``target``, or with a ``model`` section)
    and load ``ckpt_path`` into it through the model's ``init_from_ckpt`` (or :func:`load_into`), strictly: an
    autoencoder whose config has a condition branch needs one in the file. ``state_dict``: the file's tensors
    when the caller has read them (the file is then not read again)."""
    if isinstance(config, (str, os.PathLike)):
        # as given, else the project's own (``configs/...`` works from any working folder, as in the scripts)
        config = load_yaml(resolve_config_path(config, "config"))
    if "model" in config:
        config = config["model"]
    model = instantiate_from_config(config)
    if ckpt_path is not None:
        if isinstance(model, AutoencoderKL):
            # a model to use: every part, the condition branch included, must come from the file
            model.init_from_ckpt(ckpt_path, fresh_condition=False, state_dict=state_dict)
        elif hasattr(model, "init_from_ckpt"):
            model.init_from_ckpt(ckpt_path)
        else:
            tensors = read_state_dict(ckpt_path) if state_dict is None else state_dict
            load_into(model, tensors, source=ckpt_path, assign=True)
    model = model.to(device)
    if eval_mode:
        model.eval()
    return model


def load_autoencoder(ckpt_path: PathLike, config: Optional[Any] = None, latent_space: Optional[str] = None,
                     device: Union[str, torch.device] = "cpu") -> AutoencoderKL:
    """An ``AutoencoderKL`` ready to use from a file in any format we read (the original ``.ckpt``, our
    ``.safetensors``, a diffusers folder, ASUKA's checkpoint), its config read from the tensors
    (:func:`ldm.checkpoints.architecture.autoencoder_config`; ``latent_space`` names the space where the tensors do
    not tell) unless ``config`` is given (then :func:`load_model` of it)."""
    state_dict = None
    if config is None:  # the file is read once: its tensors tell the config, then load into the model
        state_dict = read_state_dict(ckpt_path)
        config = autoencoder_config(state_dict, latent_space=latent_space, source=ckpt_path)
    model = load_model(config, ckpt_path, device=device, state_dict=state_dict)
    if not isinstance(model, AutoencoderKL):
        raise CheckpointError(f"config {config}: builds a {type(model).__name__}, not an AutoencoderKL")
    return model
