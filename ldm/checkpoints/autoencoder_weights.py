"""Which weights of a checkpoint an autoencoder takes: the loading policy of ``AutoencoderKL.init_from_ckpt``.

* the file's latent space (channels, quant convs) must be the config's;
* a file without the condition branch (an SD VAE) leaves a conditioned decoder's branch fresh at the start of
  training, and is refused for a model to use (a random branch would overwrite the kept region);
* ``ignore_keys: [decoder]`` (the large ``_train`` configs, written for the SD VAE whose decoder has another width)
  leaves out only a decoder of another width: a decoder of the config's own variant (the paper's release, your own
  run) is where training starts. Either way one line says which.

It reads the model through what every ``AutoencoderKL`` has (``decoder``, ``decoder_config``, ``embed_dim``,
``use_quant_conv``, ``known_unused_keys()``), so it sits below the models and imports none of them.
"""
from __future__ import annotations

import logging
from typing import Any, List, Mapping, Optional, Sequence

import torch

from ..checkpoints.files import CheckpointError, PathLike
from ..checkpoints.keys import load_into, read_state_dict
from ..checkpoints.tensors import (
    BRANCH,
    UNUSED_PREFIXES,
    autoencoder_state_dict,
    describe_decoder_checkpoint,
    describe_state_dict,
    latent_layout,
)
from ..latent_spaces import describe_latent_layout

log = logging.getLogger(__name__)


def load_autoencoder_weights(model: Any, path: PathLike, ignore_keys: Sequence[str] = (),
                             fresh_condition: bool = True,
                             state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Load ``path`` (any format of :func:`ldm.checkpoints.keys.read_state_dict`; a full SD checkpoint gives its
    ``first_stage_model``) into ``model`` strictly, by the rules of the module docstring. ``fresh_condition``:
    the start of training (a missing condition branch starts fresh) rather than a model to use. ``state_dict``:
    the file's tensors when the caller has read them already (``read_state_dict(path)``), so the file is read
    once; ``path`` then only names it in messages."""
    state_dict = autoencoder_state_dict(read_state_dict(path) if state_dict is None else state_dict, source=path)
    check_latent_layout(model, state_dict, path)
    allow_missing = []
    if model.decoder.has_condition and not any(k.startswith(BRANCH) for k in state_dict):
        if not fresh_condition:
            raise CheckpointError(
                f"{path}: has no condition branch (decoder.encoder.*), but the config builds a decoder with "
                f"condition: true ({describe_decoder_checkpoint(state_dict)}). For a plain VAE decoder use a "
                "config with condition: false (configs/autoencoder/autoencoder_kl_woc_32x32x4*.yaml) or "
                "--vanilla_decoder; for the paper's decoder pass its checkpoint (base.ckpt, larger1.5.ckpt, "
                "larger2.ckpt or a diffusers AsymmetricAutoencoderKL folder).")
        log.info("%s: no condition branch in the checkpoint; decoder.encoder.* starts from scratch", path)
        allow_missing.append(BRANCH)
    if not any(k.startswith("loss.") for k in state_dict):
        allow_missing.append("loss.")  # a training model starting from inference weights
    # the lpips package registers lin0..lin4 a second time as lins.0..4; taming's LPIPS (the original's) does not
    allow_missing.append("loss.perceptual_loss.lins.")
    load_into(model, state_dict, source=path, ignore_keys=decoder_ignore_keys(model, state_dict, ignore_keys, path),
              known_unused=model.known_unused_keys(), allow_missing=allow_missing,
              hint=variant_hint(model, state_dict), assign=True)
    log.info("restored %s from %s", type(model).__name__, path)


def decoder_ignore_keys(model: Any, state_dict: Mapping[str, torch.Tensor], ignore_keys: Sequence[str],
                        path: PathLike) -> List[str]:
    """``ignore_keys`` without ``decoder`` when the file's decoder main path is this model's (same keys, same
    shapes): ``ignore_keys: [decoder]`` is meant for a decoder of another width. One log line says which."""
    keys = list(ignore_keys)
    whole_decoder = [k for k in keys if k.rstrip(".") == "decoder"]
    if not whole_decoder or not any(k.startswith("decoder.") for k in state_dict):
        return keys
    unused = tuple(UNUSED_PREFIXES) + (BRANCH,)
    ours = {k: v.shape for k, v in model.state_dict().items() if k.startswith("decoder.") and not k.startswith(unused)}
    theirs = {k: v.shape for k, v in state_dict.items() if k.startswith("decoder.") and not k.startswith(unused)}
    cfg = model.decoder_config
    mine = f"this config's decoder has ch={cfg['ch']}, num_res_blocks={cfg['num_res_blocks']}"
    if ours == theirs:
        log.warning("%s: its decoder is this config's variant, so training starts from it (ignore_keys: [decoder] "
                    "applies only to a decoder of another width, such as the SD VAE's)", path)
        return [k for k in keys if k not in whole_decoder]
    log.warning("%s: its decoder is not this config's variant (%s; %s): the decoder starts from random weights "
                "(ignore_keys: [decoder]); the encoder side comes from the file", path,
                describe_decoder_checkpoint(state_dict).split(";")[0], mine)
    return keys


def check_latent_layout(model: Any, state_dict: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Refuse a file of another latent space (channels, quant convs), naming the one its tensors look like."""
    theirs = latent_layout(state_dict)
    ours = (model.embed_dim, model.use_quant_conv)
    if theirs is not None and theirs != ours:
        raise CheckpointError(
            f"{path}: {describe_state_dict(state_dict)}, but this config builds "
            f"{describe_latent_layout(*ours)}: use a config of the file's latent space (embed_dim, "
            "use_quant_conv and the latent normalisation come from there)")
    # FLUX.2 normalises its latents with BatchNorm statistics held in the file (a model built with
    # latent_batch_norm has a ``bn`` module; others have none)
    has_bn, wants_bn = "bn.running_mean" in state_dict, getattr(model, "bn", None) is not None
    if has_bn and not wants_bn:
        raise CheckpointError(f"{path}: holds latent BatchNorm statistics (bn.*, FLUX.2's latent normalisation) "
                              "but this config normalises without them: use a config with latent_batch_norm "
                              "(configs/autoencoder/flux2/)")
    if wants_bn and not has_bn and theirs is not None:
        raise CheckpointError(f"{path}: has no latent BatchNorm statistics (bn.running_mean / bn.running_var), "
                              "which this config's latent_batch_norm normalises with: use FLUX.2's VAE as "
                              "released (BFL's ae.safetensors or a diffusers AutoencoderKLFlux2 vae/ folder)")


def variant_hint(model: Any, state_dict: Mapping[str, torch.Tensor]) -> str:
    """The file's decoder variant beside the model's, for the error of a checkpoint that does not fit."""
    cfg = model.decoder_config
    return (f"{describe_decoder_checkpoint(state_dict)}; this model's decoder has ch={cfg['ch']}, "
            f"num_res_blocks={cfg['num_res_blocks']}, condition={bool(cfg.get('condition', False))}, "
            f"concat_mask={bool(cfg.get('concat_mask', False))}")
