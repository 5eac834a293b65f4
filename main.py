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
import json
import logging
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: F401  (config targets)
from pytorch_lightning.utilities.model_helpers import is_overridden

from ldm.data.datamodule import DataModuleFromConfig  # noqa: F401  (the original configs name main.DataModuleFromConfig)
from ldm.training import cluster
from ldm.training.callbacks import ImageLogger, TrainingStopped  # noqa: F401  (ImageLogger: a config target)
from ldm.training.config import check_run_inputs, load_config
from ldm.training.run_folder import (
    RUN_FOLDER_ENV,
    RUN_TIMESTAMP_ENV,
    RunFolder,
    requeued_run,
    resolve_run,
    resume_step,
    take_run_folder,
)
from ldm.training.trainer import (
    PRECISIONS,
    build_model_and_data,
    build_trainer,
    build_trainer_kwargs,
    check_devices,
    fast_path,
    release_run,
    stop_callback_of,
)
from ldm.util import WriteError

log = logging.getLogger("main")



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
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps (the global step; N batches each with "
                        "accumulate_grad_batches N)")
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




def load_run_configs(opt: argparse.Namespace, overrides: Sequence[str]) -> Tuple[RunFolder, Optional[int],
                                                                                 DictConfig, DictConfig]:
    """Step 2: which run (new or resumed) and its merged configs, every key checked and every input file there
    -> (run folder, step resumed from, project config, lightning config)."""
    # a Slurm job names its folder by its job id (the same in every task and again after a requeue)
    now = os.environ.get(RUN_TIMESTAMP_ENV) or cluster.run_timestamp(
        datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S"))
    folder = resolve_run(opt, now)
    if folder.resume is None and requeued_run(folder.path):  # a requeued Slurm job continues its run folder
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
    folder = take_run_folder(folder)  # from here on the run folder is this process's (its lock)
    trainer = build_trainer(opt, folder, config, lightning_config, trainer_kwargs, model)  # releases it on failure
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
            except RuntimeError as e:
                if ckpt is None or "Error(s) in loading state_dict" not in str(e):
                    raise
                first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
                raise ValueError(f"--resume {ckpt}: its weights do not fit the model of the configs "
                                 f"{' '.join(run.folder.configs)} ({first} ...); nothing in {run.folder.path} was "
                                 "changed") from None
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
        release_run(run.folder, stop_callback_of(trainer))
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
