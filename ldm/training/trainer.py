"""From flags and config to a Lightning ``Trainer``: devices and precision, the model with its learning rate and the
data, checkpoints, loggers and callbacks."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from ..util import instantiate_from_config
from . import cluster
from .callbacks import AtomicCheckpointIO, EpochLastCheckpoint
from .run_folder import RunFolder

log = logging.getLogger("main")


PRECISIONS = {"32": "32-true", "32-true": "32-true", "16": "16-mixed", "16-mixed": "16-mixed",
              "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "64": "64-true"}


def parse_devices(gpus: Optional[str]) -> Tuple[str, Any, int]:
    """``--gpus`` -> (accelerator, devices, number of devices). None -> one CPU process."""
    if gpus is None or str(gpus).strip() == "":
        return "cpu", 1, 1
    text = str(gpus).strip()
    try:
        ids = [int(i) for i in text.split(",") if i.strip() != ""] if "," in text else None
        count = int(text) if ids is None else len(ids)
    except ValueError:
        raise ValueError(f"--gpus {gpus!r}: expected GPU ids ('0,1' or '0,') or a count ('2', '-1' = all)") from None
    if ids is not None:
        return "gpu", ids, len(ids)
    if count == 0:
        return "cpu", 1, 1
    if count < 0:
        return "gpu", -1, torch.cuda.device_count()
    return "gpu", count, count


def config_devices(accelerator: str, devices: Any) -> Tuple[Any, int]:
    """``lightning.trainer.devices`` -> (value for the Trainer, processes per node). Strings are parsed as
    ``--gpus`` is: ``"0,1"`` -> ``[0, 1]`` (2 devices), ``"3"`` -> ``3``; ``"auto"`` / ``-1`` count the visible
    GPUs (one process on CPU)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text != "auto":
            try:
                devices = [int(i) for i in text.split(",") if i.strip()] if "," in text else int(text)
            except ValueError:
                raise ValueError(f"lightning.trainer.devices: expected a count, 'auto' or GPU ids such as '0,1', "
                                 f"got {devices!r}") from None
    if isinstance(devices, (list, tuple)):
        return list(devices), len(devices)
    if devices in ("auto", -1):
        return devices, max(torch.cuda.device_count(), 1) if accelerator != "cpu" else 1
    return devices, int(devices)


def check_devices(opt: argparse.Namespace, trainer_kwargs: Mapping[str, Any]) -> None:
    """GPUs asked for on a machine without CUDA: a ``ValueError`` naming the flag (or config key) that asked."""
    if trainer_kwargs.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        asked = f"--gpus {opt.gpus}" if opt.gpus is not None else (
            f"lightning.trainer.accelerator={trainer_kwargs['accelerator']}")
        raise ValueError(f"{asked}: this machine has no CUDA GPU (torch.cuda.is_available() is False); leave "
                         "--gpus out (and set lightning.trainer.accelerator=cpu) to train on the CPU")


def periodic_checkpoints(ckptdir: Path, config: DictConfig) -> List[ModelCheckpoint]:
    """Checkpoints kept besides ``last.ckpt``: ``lightning.periodic_checkpoints`` = ``{every_n_train_steps: N}``
    (every N steps) or ``{every_n_epochs: N}`` (default: every epoch), keeping the newest ``keep`` (default 3;
    0 = none, -1 = all), named ``periodic-e<epoch>-s<step>.ckpt``."""
    params = OmegaConf.to_container(OmegaConf.merge({"every_n_train_steps": 0, "every_n_epochs": 1, "keep": 3},
                                                    config))
    unknown = set(params) - {"every_n_train_steps", "every_n_epochs", "keep"}
    if unknown:
        raise ValueError(f"lightning.periodic_checkpoints: unknown keys {sorted(unknown)} (every_n_train_steps, "
                         "every_n_epochs, keep)")
    keep, steps, epochs = int(params["keep"]), int(params["every_n_train_steps"]), int(params["every_n_epochs"])
    if keep == 0 or (steps <= 0 and epochs <= 0):
        return []
    when = {"every_n_train_steps": steps} if steps > 0 else {"every_n_epochs": epochs}
    # monitor "step", mode max: the newest `keep` survive (Lightning allows top-k only with a monitor)
    return [ModelCheckpoint(dirpath=str(ckptdir), filename="periodic-e{epoch:06}-s{step:09}",
                            auto_insert_metric_name=False, monitor="step", mode="max", save_top_k=keep,
                            save_last=False, enable_version_counter=False, **when)]


def make_loggers(mode: str, logdir: Path, nowname: str, now: str, config: DictConfig) -> List[Any]:
    """CSV always; wandb unless ``mode == "off"``, and only if it starts (it is never required).

    CSV rows go to ``csv/metrics.csv``; a resumed run writes ``csv/resumed-<now>/metrics.csv`` instead, since
    Lightning's CSV writer deletes the metrics file of a folder it reuses.
    """
    csv_version = "csv" if not (logdir / "csv" / "metrics.csv").exists() else os.path.join("csv", f"resumed-{now}")
    loggers: List[Any] = [CSVLogger(save_dir=str(logdir), name="", version=csv_version)]
    if mode == "off":
        return loggers
    try:
        from pytorch_lightning.loggers import WandbLogger

        wandb_logger = WandbLogger(name=nowname, id=nowname, save_dir=str(logdir), offline=(mode != "online"),
                                   project=OmegaConf.select(config, "lightning.wandb_project",
                                                            default="asymmetric-vqgan"),
                                   resume="allow")
        wandb_logger.experiment  # start it now, so that a failure is seen here and not mid-training
        loggers.append(wandb_logger)
    except Exception as e:  # noqa: BLE001  (wandb is optional: any failure means no wandb, not no training)
        log.warning("wandb logging disabled (%s: %s); CSV metrics are in %s", type(e).__name__, e, logdir / "csv")
    return loggers


def build_trainer_kwargs(opt: argparse.Namespace, trainer_config: DictConfig) -> Tuple[Dict[str, Any], int]:
    """Trainer kwargs from the config's ``lightning.trainer`` and the flags; -> (kwargs, number of devices)."""
    kwargs = OmegaConf.to_container(trainer_config, resolve=True)
    gpus = opt.gpus if opt.gpus is not None else kwargs.pop("gpus", None)  # PL 1.x configs say trainer.gpus
    kwargs.pop("gpus", None)
    if kwargs.get("accelerator") in ("ddp", "dp", "ddp_spawn"):  # PL 1.x: accelerator named the strategy
        kwargs.setdefault("strategy", kwargs.pop("accelerator"))
    if gpus is not None:
        kwargs["accelerator"], kwargs["devices"], ndev = parse_devices(gpus)
    else:  # the config's accelerator and devices; no --gpus and none in the config means one CPU process
        kwargs.setdefault("accelerator", "cpu")
        kwargs["devices"], ndev = config_devices(kwargs["accelerator"], kwargs.get("devices", 1))
    for key in ("num_nodes", "max_steps", "max_epochs"):
        if getattr(opt, key) is not None:
            kwargs[key] = getattr(opt, key)
    if opt.max_steps is not None and opt.max_epochs is None:
        kwargs.pop("max_epochs", None)  # --max_steps alone decides the length
    if opt.precision is not None:
        kwargs["precision"] = PRECISIONS[opt.precision]
    elif "precision" in kwargs:
        kwargs["precision"] = PRECISIONS.get(str(kwargs["precision"]), kwargs["precision"])
    num_nodes = int(kwargs.get("num_nodes", 1))
    if (ndev > 1 or num_nodes > 1) and "strategy" not in kwargs:
        # the generator and discriminator backward passes each leave the other's parameters without gradients
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    kwargs.setdefault("num_sanity_val_steps", 0)  # as the original
    return kwargs, ndev * num_nodes


def fast_path(opt: argparse.Namespace, trainer_kwargs: Dict[str, Any]) -> Optional[Tuple[torch.device, Any]]:
    """``--fast``: (device, its fast settings), the precision set in ``trainer_kwargs``; else None."""
    if not opt.fast:
        return None
    from ..cli.common import pick_device
    from ..fast import TRAINING_PRECISION, fast_settings

    accelerator = trainer_kwargs["accelerator"]  # Lightning's name: cpu, gpu, cuda, mps or auto
    device = pick_device("auto") if accelerator == "auto" else torch.device({"gpu": "cuda"}.get(accelerator,
                                                                                               accelerator))
    fast = fast_settings(device)
    trainer_kwargs["precision"] = TRAINING_PRECISION[fast.dtype]
    return device, fast


def build_model_and_data(opt: argparse.Namespace, config: DictConfig, trainer_kwargs: Dict[str, Any], world: int,
                         fast: Optional[Tuple[torch.device, Any]]) -> Tuple[pl.LightningModule,
                                                                            pl.LightningDataModule]:
    """Step 3: the model (on the device's fast path with ``--fast``) with its learning rate, and the data, whose
    datasets are built now: an empty or missing folder fails before any training."""
    model = instantiate_from_config(config.model)
    if fast is not None:
        from ..fast import fast_training

        fast_training(model, *fast)
    data = instantiate_from_config(config.data)
    data.setup("fit")

    bs = int(config.data.params.batch_size)
    base_lr = float(config.model.base_learning_rate)
    accumulate = int(trainer_kwargs.get("accumulate_grad_batches", 1))
    if accumulate < 1:
        raise ValueError(f"lightning.trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
    if not model.automatic_optimization:
        # Lightning refuses accumulate_grad_batches with manual optimization: the model's step accumulates
        if accumulate > 1 and not hasattr(model, "accumulate_grad_batches"):
            raise ValueError(f"lightning.trainer.accumulate_grad_batches={accumulate}: {type(model).__name__} "
                             "optimizes manually and does not accumulate gradients")
        trainer_kwargs.pop("accumulate_grad_batches", None)
        if accumulate > 1:
            model.accumulate_grad_batches = accumulate
    if opt.scale_lr:
        model.learning_rate = accumulate * world * bs * base_lr
        log.info("learning rate %.2e = %d (accumulate_grad_batches) * %d (devices x nodes) * %d (batch size) "
                 "* %.2e (base_learning_rate)", model.learning_rate, accumulate, world, bs, base_lr)
    else:
        model.learning_rate = base_lr
        log.info("learning rate %.2e (not scaled)", model.learning_rate)
    return model, data


def build_trainer(opt: argparse.Namespace, folder: RunFolder, config: DictConfig, lightning_config: DictConfig,
                  trainer_kwargs: Dict[str, Any], model: pl.LightningModule) -> pl.Trainer:
    """Step 5: callbacks (setup, images, last / periodic / best checkpoints, signals), loggers and the Trainer."""
    logdir, now = folder.path, folder.now
    ckptdir, cfgdir = logdir / "checkpoints", logdir / "configs"
    wandb_mode = "online" if opt.wandb_online else opt.wandb or lightning_config.get("wandb", "offline")
    wandb_mode = {False: "off", True: "offline"}.get(wandb_mode, wandb_mode)  # YAML reads a bare off as false
    if wandb_mode not in ("off", "offline", "online"):
        raise ValueError(f"lightning.wandb must be off, offline or online, got {wandb_mode!r}")
    callbacks_config = {
        "setup_callback": {"target": "ldm.training.callbacks.SetupCallback",
                           "params": {"resume": str(opt.resume), "now": now, "logdir": str(logdir),
                                      "ckptdir": str(ckptdir), "cfgdir": str(cfgdir), "config": config,
                                      "lightning_config": lightning_config}},
        "image_logger": {"target": "ldm.training.callbacks.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True, "save_dir": str(logdir)}},
    }
    callbacks_config = OmegaConf.merge(callbacks_config, lightning_config.get("callbacks", OmegaConf.create()))
    for key, entry in callbacks_config.items():
        if not isinstance(entry, DictConfig) or "target" not in entry:
            raise ValueError(f"lightning.callbacks.{key}: needs a target (a dotted class path) and optional params, "
                             f"got {OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else entry!r}")
    # no version counter: a resumed run finds last.ckpt from before the kill and must overwrite it, not add last-v1
    checkpoint_params = {"dirpath": str(ckptdir), "filename": "{epoch:06}", "save_last": True, "save_top_k": 0,
                         "enable_version_counter": False}
    if getattr(model, "monitor", None):
        log.info("keeping the 3 best checkpoints by %s", model.monitor)
        checkpoint_params.update(monitor=model.monitor, save_top_k=3, filename="{epoch:06}-{step:09}")
    checkpoint_params = OmegaConf.merge(checkpoint_params,
                                        lightning_config.get("modelcheckpoint", {}).get("params", {}))
    callbacks = [instantiate_from_config(callbacks_config[k]) for k in callbacks_config]
    callbacks += [EpochLastCheckpoint(**checkpoint_params), cluster.stop_callback(ckptdir / "last.ckpt")]
    callbacks += periodic_checkpoints(ckptdir, lightning_config.get("periodic_checkpoints", OmegaConf.create()))
    return pl.Trainer(**trainer_kwargs, logger=make_loggers(wandb_mode, logdir, logdir.name, now, config),
                      callbacks=callbacks, plugins=[AtomicCheckpointIO(), *cluster.plugins()],
                      default_root_dir=str(logdir))
