"""Train (and resume) the asymmetric decoder with PyTorch Lightning; the original repo's command line.

    python main.py --base configs/autoencoder/autoencoder_kl_32x32x4_train.yaml -t --gpus 0,1
    python main.py --base a.yaml b.yaml -t model.params.embed_dim=4 data.params.batch_size=2
    python main.py --resume logs/<run>            # continues from the run's newest checkpoint (by global step)
    python main.py --resume elsewhere.ckpt --base a.yaml      # its training state, in a new run folder
    python main.py --base a.yaml -t model.params.ckpt_path=larger2.ckpt   # start from weights only

Several ``--base`` files are merged left to right, then the ``key.sub=value`` overrides; an unknown key is an error
naming the closest real one, and every file the run reads is checked before anything is built. Each run claims
its own ``<logdir>/<timestamp>_<name>/`` (``<timestamp>-1_<name>`` when that name is taken) with ``configs/``
(merged project and lightning configs), ``checkpoints/`` (``last.ckpt``, refreshed at every epoch end; the
newest 3 ``periodic-*.ckpt``, one per epoch, set by
``lightning.periodic_checkpoints``; the best ones when the model has a ``monitor``), ``images/``
(PNG grids), ``csv/metrics.csv`` (after a ``--resume``: ``csv/resumed-<timestamp>/metrics.csv``) and a wandb folder
(offline unless ``--wandb online``). SIGTERM / Ctrl-C save ``last.ckpt`` after the current batch.

Config sections: ``model`` (target/params + ``base_learning_rate``), ``data`` (usually
``ldm.data.datamodule.DataModuleFromConfig``; the original configs' ``main.DataModuleFromConfig`` still works),
``lightning`` (``trainer``: Trainer kwargs incl. ``strategy``; ``callbacks``: extra/overridden callbacks;
``modelcheckpoint``: ModelCheckpoint params; ``periodic_checkpoints``: ``every_n_train_steps`` or ``every_n_epochs``
and ``keep``; ``wandb``: off / offline / online). ``trainer.accumulate_grad_batches`` is done by the model's own step.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import glob
import inspect
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: F401  (config targets)
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.model_helpers import is_overridden

from ldm.checkpoints.files import CheckpointError, verify_zip_checksums
from ldm.data.datamodule import DataModuleFromConfig  # noqa: F401  (the original configs name main.DataModuleFromConfig)
from ldm.project import resolve_config_path
from ldm.training import cluster
from ldm.training.callbacks import (  # noqa: F401
    AtomicCheckpointIO,
    EpochLastCheckpoint,
    ImageLogger,
    SetupCallback,
    StopOnSignal,
    TrainingStopped,
)
from ldm.util import WriteError, instantiate_from_config

log = logging.getLogger("main")

# Read, never set: a parent that starts main.py may choose the run's timestamp (the folder is still claimed, so a
# taken name gets a suffix).
RUN_TIMESTAMP_ENV = "LDM_RUN_TIMESTAMP"
PRECISIONS = {"32": "32-true", "32-true": "32-true", "16": "16-mixed", "16-mixed": "16-mixed",
              "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "64": "64-true"}


def str2bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--name", default="", help="run name (suffix of the log folder)")
    p.add_argument("-r", "--resume", default="",
                   help="resume from a log folder or a checkpoint inside one (or any checkpoint, with --base)")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="config.yaml",
                   help="config files, merged left to right; then key.sub=value overrides")
    p.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=None,
                   help="train (implied by --resume; -t false with --resume only tests)")
    p.add_argument("--no-test", type=str2bool, nargs="?", const=True, default=False,
                   help="skip testing after training")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything (the original's 23)")
    p.add_argument("-f", "--postfix", default="", help="post-postfix of the run name")
    p.add_argument("-l", "--logdir", default="logs", help="folder of the run folders")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="lr = accumulate_grad_batches * devices * num_nodes * batch_size * base_learning_rate")
    p.add_argument("--gpus", default=None,
                   help="GPU ids ('0,1' or '0,') or a count ('2', '-1' = all); absent = CPU")
    p.add_argument("--num_nodes", type=int, default=None, help="machines (DDP)")
    p.add_argument("--precision", default=None, choices=sorted(PRECISIONS), help="32, 16-mixed or bf16-mixed")
    p.add_argument("--fast", action="store_true",
                   help="train on the fast path of the device (ldm/fast.py): bf16 mixed precision + channels_last on "
                        "CPUs with native bf16 and on GPUs (GPUs also compile the decoder's blocks), float32 + "
                        "channels_last on other CPUs; chooses the precision, so it does not go with --precision")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (batches)")
    p.add_argument("--max_epochs", "--epoch", dest="max_epochs", type=int, default=None,
                   help="stop after this many epochs (--epoch is the original's name)")
    p.add_argument("--wandb", choices=("off", "offline", "online"), default=None,
                   help="Weights & Biases logging (default: lightning.wandb in the config, else offline)")
    p.add_argument("--wandb_online", action="store_true", help="same as --wandb online")
    p.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                   help="post-mortem debugger on errors")
    return p


BOOL_FLAGS = ("-t", "--train", "--no-test", "--scale_lr", "-d", "--debug")
BOOL_WORDS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")


def _explicit_bools(argv: Sequence[str]) -> List[str]:
    """``-t key=value``: argparse would read ``key=value`` as the optional value of ``-t``; give it ``true``."""
    out: List[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in BOOL_FLAGS and nxt is not None and not nxt.startswith("-") and nxt.lower() not in BOOL_WORDS:
            out.append("true")
    return out


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


# A run folder is claimed by the process that starts the run; the DDP processes Lightning starts during fit
# (they run this script again) find it here. Set only while main() runs, so it never leaks into a later run.
RUN_FOLDER_ENV = "LDM_RUN_FOLDER"


@dataclasses.dataclass
class RunFolder:
    """Where a run writes and what it continues: ``path`` (``<logdir>/<now>_<name>``), ``now`` (the timestamp in
    its config file names), ``resume`` (checkpoint to continue, or None), ``configs`` (YAML files to merge), and
    ``new`` (the folder is to be claimed, :func:`claim_run_folder`)."""
    path: Path
    now: str
    resume: Optional[Path]
    configs: List[str]
    new: bool


def resolve_run(opt: argparse.Namespace, now: str) -> RunFolder:
    """What the flags ask for. ``--resume`` of a run folder (or a checkpoint in its ``checkpoints/``) continues in
    that folder with its saved configs (plus ``--base`` files, merged after them), from its newest checkpoint
    (:func:`resume_run`); a checkpoint elsewhere continues in a new run folder with the ``--base`` configs."""
    base = list(opt.base)

    def new_run(ckpt: Optional[Path]) -> RunFolder:
        name = opt.name or (Path(base[0]).stem if base else "")
        return RunFolder(Path(opt.logdir) / (now + (f"_{name}" if name else "") + opt.postfix), now, ckpt, base,
                         new=True)

    if not opt.resume:
        return new_run(None)
    resume = Path(opt.resume)
    if not resume.exists():
        raise FileNotFoundError(f"--resume {resume}: no such log folder or checkpoint")
    if resume.is_file():
        logdir = resume.parent.parent  # <run>/checkpoints/<file>.ckpt
        saved = sorted(glob.glob(str(logdir / "configs" / "*.yaml"))) if resume.parent.name == "checkpoints" else []
        if not saved:
            if not base:
                raise FileNotFoundError(
                    f"--resume {resume}: not inside a run folder (<run>/checkpoints/{resume.name} next to "
                    "<run>/configs/*.yaml); give the run's configs with --base to continue it in a new run folder")
            return new_run(resume)
        _check_no_name(opt)
        refuse_going_back(resume)
        return RunFolder(logdir, now, resume, saved + base, new=False)
    _check_no_name(opt)
    ckpt, saved = resume_run(resume)
    return RunFolder(resume, now, ckpt, saved + base, new=False)


def resume_run(run: Path) -> Tuple[Path, List[str]]:
    """An existing run folder -> (its newest complete checkpoint, its saved config files): what continues it (a
    ``--resume`` of the folder; a requeued job finds its run the same way)."""
    saved = sorted(glob.glob(str(run / "configs" / "*.yaml")))
    ckptdir = run / "checkpoints"
    found = run_checkpoints(ckptdir)
    if not found:
        raise FileNotFoundError(f"--resume {run}: no complete checkpoint in {ckptdir} (expected last.ckpt or "
                                "periodic-*.ckpt)")
    if not saved:
        raise FileNotFoundError(f"--resume {run}: no configs in {run / 'configs'}; resume its checkpoint "
                                f"instead: --resume {found[0][1]} --base <the run's configs>")
    for step, ckpt in found:  # newest first; a damaged one (its zip checksums) is passed over, with a line
        try:
            verify_zip_checksums(ckpt)
        except CheckpointError as e:
            log.warning("passing over %s", e)
            continue
        others = ", ".join(f"{p.name} (step {s})" for s, p in found if p != ckpt)
        log.info("--resume %s: continuing from %s, global step %d, the newest complete checkpoint%s", run,
                 ckpt.name, step, f" (also there: {others})" if others else "")
        return ckpt, saved
    raise CheckpointError(f"--resume {run}: every checkpoint in {ckptdir} is damaged")


def checkpoint_step(path: Path) -> Optional[int]:
    """The global step stored inside a training checkpoint; None when it cannot be read (a torn write)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"])
    except Exception:  # noqa: BLE001  (anything unreadable is not a checkpoint to continue from)
        return None


def run_checkpoints(ckptdir: Path) -> List[Tuple[int, Path]]:
    """The readable training checkpoints of a run as (global step, path), newest first by the step stored inside
    (``last.ckpt`` first among equals: it also holds the state at an epoch's end)."""
    found = [(step, p) for p in ckptdir.glob("*.ckpt") if (step := checkpoint_step(p)) is not None]
    return sorted(found, key=lambda sp: (-sp[0], sp[1].name != "last.ckpt", sp[1].name))


def refuse_going_back(ckpt: Path) -> None:
    """A checkpoint of a run folder resumed while the run holds newer ones would redo those steps and let the
    checkpoint rotation replace the newer files: refused, naming the newest."""
    step = resume_step(ckpt)
    newer = [(s, p) for s, p in run_checkpoints(ckpt.parent) if s > step]
    if newer:
        raise ValueError(f"--resume {ckpt}: the run has newer checkpoints ({newer[0][1].name} at global step "
                         f"{newer[0][0]}, this one is at {step}); resume the run folder {ckpt.parent.parent} to "
                         "continue from the newest, or move the newer ones out of checkpoints/ first")


def claim_run_folder(path: Path, now: str) -> Tuple[Path, str]:
    """Create the new run folder ``path`` (``<logdir>/<now>_<name>``) atomically; if it exists (another run of
    the same name started in the same second), ``<now>-1_<name>``, ``<now>-2_<name>`` ... -> (folder, its
    timestamp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rest = path.name[len(now):]
    for n in itertools.count():
        stamp = now if n == 0 else f"{now}-{n}"
        try:
            os.mkdir(path.parent / (stamp + rest))
        except FileExistsError:
            continue
        return path.parent / (stamp + rest), stamp
    raise AssertionError("unreachable")


def _check_no_name(opt: argparse.Namespace) -> None:
    if opt.name:
        raise ValueError("-n/--name and -r/--resume of a run folder cannot be given together: a resumed run keeps "
                         "its folder")


def resume_step(ckpt: Path) -> int:
    """The global step of a checkpoint ``--resume`` can continue; anything else (e.g. the paper's released
    weights, a state dict) is a ``ValueError`` saying how to start from its weights instead; a damaged file is a
    ``CheckpointError`` naming it."""
    verify_zip_checksums(ckpt)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file gets the same advice)
        state = e
    if not isinstance(state, dict) or not {"state_dict", "optimizer_states", "loops", "global_step"} <= set(state):
        why = (f"cannot be read weights-only ({type(state).__name__}: {state})" if isinstance(state, Exception)
               else "holds weights without this project's training state (optimizers, loops)")
        raise ValueError(f"--resume {ckpt}: {why}, so training cannot continue from it. To start a new run from its "
                         f"weights: python main.py --base <config.yaml> -t model.params.ckpt_path={ckpt}")
    return int(state["global_step"])


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


def check_devices(opt: argparse.Namespace, trainer_kwargs: Mapping[str, Any]) -> None:
    """GPUs asked for on a machine without CUDA: a ``ValueError`` naming the flag (or config key) that asked."""
    if trainer_kwargs.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        asked = f"--gpus {opt.gpus}" if opt.gpus is not None else (
            f"lightning.trainer.accelerator={trainer_kwargs['accelerator']}")
        raise ValueError(f"{asked}: this machine has no CUDA GPU (torch.cuda.is_available() is False); leave "
                         "--gpus out (and set lightning.trainer.accelerator=cpu) to train on the CPU")


def load_config(files: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """Merge YAML files left to right (a relative path not found in the working folder is looked up in the
    project), then dot-list overrides (``key.sub=value``); every section is checked by :func:`check_config_keys`."""
    files = [resolve_config_path(f, "--base") for f in files]  # the project's configs work from any folder
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        raise ValueError(f"unrecognised arguments {bad}: use the flags of `python main.py --help` or "
                         "key.sub=value config overrides")
    config = OmegaConf.merge(*[OmegaConf.load(f) for f in files], OmegaConf.from_dotlist(list(overrides)))
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
        from ldm.modules.losses.contperceptual import VGG16_URL, LPIPSWithDiscriminator, default_vgg16_path

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


@dataclasses.dataclass
class Run:
    """Everything :func:`fit` needs, made by :func:`prepare`."""
    opt: argparse.Namespace
    folder: RunFolder
    start_step: Optional[int]
    config: DictConfig
    model: pl.LightningModule
    data: pl.LightningDataModule
    trainer: pl.Trainer
    train: bool


def parse_command_line(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, List[str]]:
    """Step 1: the flags and the ``key.sub=value`` overrides."""
    opt, overrides = get_parser().parse_known_args(_explicit_bools(sys.argv[1:] if argv is None else list(argv)))
    if opt.fast and opt.precision is not None:
        raise ValueError(f"--fast chooses the precision itself; drop --precision {opt.precision} or --fast")
    return opt, overrides


def launched_run() -> Optional[Tuple[Path, str]]:
    """(folder, timestamp) of the run whose rank-0 process started this one (DDP), else None."""
    shared = os.environ.get(RUN_FOLDER_ENV)
    if not shared:
        return None
    info = json.loads(shared)
    return Path(info["path"]), info["now"]


def load_run_configs(opt: argparse.Namespace, overrides: Sequence[str]) -> Tuple[RunFolder, Optional[int],
                                                                                 DictConfig, DictConfig]:
    """Step 2: which run (new or resumed) and its merged configs, every key checked and every input file there
    -> (run folder, step resumed from, project config, lightning config)."""
    # a Slurm job names its folder by its job id (the same in every task and again after a requeue)
    now = os.environ.get(RUN_TIMESTAMP_ENV) or cluster.run_timestamp(
        datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S"))
    folder = resolve_run(opt, now)
    if folder.resume is None and cluster.requeued_run(folder.path):  # a requeued Slurm job continues its run folder
        opt.resume, opt.name = str(folder.path), ""
        folder = resolve_run(opt, now)
    start_step = resume_step(folder.resume) if folder.resume is not None else None  # before anything heavy
    if not folder.configs:
        raise ValueError("no config: give --base config.yaml (or --resume a log folder)")
    config = load_config(folder.configs, overrides)
    if folder.resume is not None and OmegaConf.select(config, "model.params.ckpt_path") is not None:
        # every weight comes back from the checkpoint; the starting weights file need not exist any more
        log.info("resuming: not loading model.params.ckpt_path=%s", config.model.params.ckpt_path)
        config.model.params.ckpt_path = None
    check_run_inputs(config)
    lightning_config = config.pop("lightning", OmegaConf.create())
    if "data" in config and "seed" not in config.data.get("params", {}) and \
            config.data.get("target", "").endswith("DataModuleFromConfig"):
        config.data.params.seed = opt.seed
    return folder, start_step, config, lightning_config


def fast_path(opt: argparse.Namespace, trainer_kwargs: Dict[str, Any]) -> Optional[Tuple[torch.device, Any]]:
    """``--fast``: (device, its fast settings), the precision set in ``trainer_kwargs``; else None."""
    if not opt.fast:
        return None
    from ldm.cli.common import pick_device
    from ldm.fast import TRAINING_PRECISION, fast_settings

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
        from ldm.fast import fast_training

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


def _external_rank() -> int:
    """This process's global rank when a launcher outside Lightning started it (torchrun, srun), or > 0 on every
    machine but the first of a multi-node run started by hand (``NODE_RANK``, Lightning's variable), else 0."""
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return int(os.environ.get("NODE_RANK", "0") or 0)


def take_run_folder(folder: RunFolder) -> RunFolder:
    """Step 4: a new run claims its folder (:func:`claim_run_folder`), unless this process was started by the
    run's rank-0 process, which claimed it; a resumed run keeps its folder."""
    launched = launched_run()
    if launched is not None:
        return dataclasses.replace(folder, path=launched[0], now=launched[1], new=False)
    if folder.new and _external_rank() > 0:
        # started by srun / torchrun beside rank 0, which claims the folder; Lightning gives every rank rank 0's
        # checkpoint folder, and only rank 0 writes configs, logs and images
        return dataclasses.replace(folder, new=False)
    if folder.new:
        path, now = claim_run_folder(folder.path, folder.now)
        log.info("run folder %s", path)
        return dataclasses.replace(folder, path=path, now=now, new=False)
    return folder


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


def prepare(argv: Optional[Sequence[str]] = None) -> Run:
    """Steps 1-5, everything before training: a bad flag, config key or missing file ends here, before any
    folder is made (a ``ValueError`` / ``FileNotFoundError`` / ``CheckpointError`` naming it)."""
    opt, overrides = parse_command_line(argv)
    folder, start_step, config, lightning_config = load_run_configs(opt, overrides)
    trainer_kwargs, world = build_trainer_kwargs(opt, lightning_config.get("trainer", OmegaConf.create()))
    check_devices(opt, trainer_kwargs)
    fast = fast_path(opt, trainer_kwargs)
    lightning_config.trainer = trainer_kwargs  # as saved in configs/ (a copy: the model's step may take some out)
    train = opt.train if opt.train is not None else bool(opt.resume)
    if not train and (opt.no_test or "test" not in config.data.get("params", {})):
        raise ValueError("nothing to do: add -t to train (without -t only the test stage runs, and this config has "
                         "no test data)")
    pl.seed_everything(opt.seed, workers=True)
    model, data = build_model_and_data(opt, config, trainer_kwargs, world, fast)
    if not train and not is_overridden("test_step", model):
        raise ValueError(f"nothing to do: add -t to train (without -t only the test stage runs, and "
                         f"{type(model).__name__} has no test_step)")
    folder = take_run_folder(folder)
    trainer = build_trainer(opt, folder, config, lightning_config, trainer_kwargs, model)
    return Run(opt, folder, start_step, config, model, data, trainer, train)


def fit(run: Run) -> int:
    """Step 6: train (and test); -> the exit status. The DDP processes Lightning starts find the run folder in
    ``LDM_RUN_FOLDER``, set only while this runs. A failed checkpoint write (a full disk) ends in one line."""
    opt, trainer, model, data = run.opt, run.trainer, run.model, run.data
    ckpt = run.folder.resume
    if opt.resume and opt.train is None:
        log.info("--resume: training continues (-t is implied)")
    previous = os.environ.get(RUN_FOLDER_ENV)
    os.environ[RUN_FOLDER_ENV] = json.dumps({"path": str(run.folder.path), "now": run.folder.now})
    try:
        if run.train:
            try:
                trainer.fit(model, data, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
            except TrainingStopped as stopped:
                log.warning("%s", stopped)
                return 128 + int(stopped.signum)  # the shell's exit status for death by that signal
            if run.start_step is not None and trainer.global_step == run.start_step and not trainer.interrupted:
                log.warning("nothing trained: %s is at global step %d, where this run ends (max_steps %s, max_epochs "
                            "%s); pass a larger --max_steps / --max_epochs to continue", ckpt, run.start_step,
                            trainer.max_steps, trainer.max_epochs)
        if not opt.no_test and "test" in run.config.data.get("params", {}) and not trainer.interrupted:
            if is_overridden("test_step", model):
                trainer.test(model, data, weights_only=True)
            else:
                log.info("%s has no test_step; skipping the test stage", type(model).__name__)
    except WriteError as e:
        log.error("%s", e)
        return 1
    except Exception:
        if opt.debug and trainer.global_rank == 0:
            import pdb

            pdb.post_mortem()
        raise
    finally:
        if previous is None:
            os.environ.pop(RUN_FOLDER_ENV, None)
        else:
            os.environ[RUN_FOLDER_ENV] = previous
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train as the command line says (:func:`prepare`, then :func:`fit`); -> the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return fit(prepare(argv))


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``python main.py``: what goes wrong before training (a flag, a config key, a missing or unusable file) is
    one line on stderr and exit status 2, not a traceback."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
