"""Lightning callbacks and plugins of main.py: run directory, image grids, stop-on-signal, atomic checkpoints."""
from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from ..image_io import NonFiniteError, to_uint8, write_png
from ..util import PathLike, remove_stale_temporaries, write_atomically
from .framework_hooks import log_batch_row

log = logging.getLogger(__name__)



class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written to a temporary file in the same folder and renamed: a killed run never leaves a
    half-written ``last.ckpt`` (Lightning's own writer stages the file in ``/tmp`` and *moves* it, which is a
    non-atomic copy when /tmp is another file system). Loading is always weights-only."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: PathLike,
                        storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        write_atomically(Path(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: PathLike, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class SetupCallback(Callback):
    """Creates the run directory (at setup) and writes the merged configs (``configs/<now>-project.yaml``,
    ``configs/<now>-lightning.yaml``) when training starts, after the model and its checkpoint loaded; rank 0."""

    def __init__(self, resume: Any, now: str, logdir: PathLike, ckptdir: PathLike, cfgdir: PathLike,
                 config: Union[DictConfig, Mapping], lightning_config: Union[DictConfig, Mapping]):
        super().__init__()
        self.resume = resume
        self.now = now
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config = config
        self.lightning_config = lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank != 0 or stage != "fit":
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir, self.logdir / "images"):
            d.mkdir(parents=True, exist_ok=True)
        # a run killed while writing (e.g. a 5 GB checkpoint) leaves its temporary file; the run folder's lock
        # keeps other trainings out
        for path in remove_stale_temporaries(self.logdir):
            log.info("removed %s, left by an interrupted write", path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The configs are written only now, when the model and the checkpoint it resumes from have loaded: a
        ``--resume RUN --base other.yaml`` that does not fit the run leaves ``RUN/configs`` as it was."""
        if trainer.global_rank != 0:
            return
        project = OmegaConf.create(self.config)
        lightning = OmegaConf.create({"lightning": self.lightning_config})
        for name, cfg in (("project", project), ("lightning", lightning)):
            path = self.cfgdir / f"{self.now}-{name}.yaml"
            write_atomically(path, lambda tmp, cfg=cfg: OmegaConf.save(cfg, tmp))
            log.info("config written to %s", path)


class EpochLastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also refreshes ``last.ckpt`` at the end of every training epoch.

    Lightning (2.6) writes "last" only next to a top-k save or when training ends: a run without a monitor
    (``save_top_k=0``) and without ``every_n_train_steps`` would have no checkpoint until its very end. Uses
    ModelCheckpoint's own save helpers, so ``last_model_path`` and its state stay consistent.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # skipped when this step was saved already (e.g. a top-k save at the epoch's validation wrote last too)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TrainingStopped(Exception):
    """Raised out of ``trainer.fit`` after :class:`StopOnSignal` saved ``last.ckpt``; ``signum`` says why."""

    def __init__(self, signum: int, ckpt_path: PathLike):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume from {ckpt_path}")
        self.signum = signum


class StopOnSignal(Callback):
    """SIGTERM or Ctrl-C (SIGINT) end the run cleanly: after the current training batch ``last.ckpt`` is written
    (atomically, through the trainer's checkpoint IO) and :class:`TrainingStopped` leaves ``trainer.fit``. A second
    Ctrl-C aborts at once.

    The run stops by an exception, not ``trainer.should_stop``: the latter would finish the epoch and let the
    epoch-end checkpoint overwrite this one with a state that resumes at the *next* epoch.

    Checkpointing between batches (not inside the handler) keeps model, optimizer, scheduler and data-loader
    states consistent, so ``--resume`` continues exactly where the run stopped. Under DDP the request is shared
    between processes so that all of them stop at the same batch.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ckpt_path: PathLike):
        super().__init__()
        self.ckpt_path = Path(ckpt_path)
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}  # Lightning's handlers, replaced during training
        self._original: Dict[int, Any] = {}  # the process's own, before install()

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: saving %s after the %s batch and stopping (Ctrl-C again to abort)",
                    signal.Signals(signum).name, self.ckpt_path,
                    "current" if self._previous else "first")

    def _install(self, store: Dict[int, Any]) -> None:
        for signum in self.signals:
            try:
                store[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they are
                log.info("%s: cannot install signal handlers outside the main thread", type(self).__name__)
                return

    def install(self) -> None:
        """Answer the signals from now on, before training starts (main.py: as soon as the run folder exists). A
        signal that comes during setup is kept, and the run stops after its first batch with ``last.ckpt``;
        :meth:`release` puts the process's handlers back."""
        if not self._original:
            self._install(self._original)

    def release(self) -> None:
        """The handlers from before :meth:`install` (main.py, when the run is over)."""
        self._restore_handlers()
        for signum, handler in self._original.items():
            signal.signal(signum, handler)
        self._original.clear()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed after Lightning's own SIGTERM handler, which would only stop the run without saving
        self._install(self._previous)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self.received is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        # inside a gradient-accumulation window the summed gradients are in no checkpoint: stop after its last batch
        if requested and not getattr(pl_module, "mid_accumulation", False):
            for callback in trainer.checkpoint_callbacks:
                # the saved state (and a resumed run) must know that this file is the newest "last" checkpoint
                if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath is not None \
                        and Path(callback.dirpath).resolve() == self.ckpt_path.parent.resolve():
                    callback.last_model_path = str(self.ckpt_path)
            log_batch_row(trainer)  # this batch's metrics row, which the loop would log after this hook
            trainer.save_checkpoint(self.ckpt_path)
            log.warning("saved %s at global step %d; stopping", self.ckpt_path, trainer.global_step)
            if self.received is None:
                self.received = signal.SIGTERM  # another process got the signal
            raise TrainingStopped(self.received, self.ckpt_path)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    # Handlers go back in on_train_end / on_exception, i.e. before Lightning restores its own: `teardown` runs
    # after that, and restoring there would reinstall Lightning's handler of the finished run for good (a later
    # SIGTERM would then only set a flag on a dead trainer).
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()  # normally a no-op: already restored by one of the two hooks above


class ImageLogger(Callback):
    """Writes PNG grids of ``pl_module.log_images(batch)`` to ``<save_dir>/images/<split>/`` (and to the wandb
    logger when there is one): every ``batch_frequency`` steps, at steps 1, 2, 4, ... below it when
    ``increase_log_steps``, and for the first validation batch of each validation run.

    File names are the original's: ``<key>_gs-<global step>_e-<epoch>_b-<batch>.png``. Images are (B,3,H,W) in
    [-1,1]; at most ``max_images`` per grid, 4 per row.
    """

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: Optional[Mapping[str, Any]] = None,
                 save_dir: Optional[PathLike] = None):
        super().__init__()
        if batch_frequency < 1:
            raise ValueError(f"ImageLogger batch_frequency must be >= 1, got {batch_frequency}")
        self.batch_freq = int(batch_frequency)
        self.max_images = int(max_images)
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.log_steps = {2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)} if increase_log_steps else set()

    def check_frequency(self, check_idx: int) -> bool:
        if check_idx == 0 and not self.log_first_step:
            return False
        return check_idx % self.batch_freq == 0 or check_idx in self.log_steps

    def _root(self, trainer: pl.Trainer) -> Path:
        return (self.save_dir or Path(trainer.default_root_dir)) / "images"

    @rank_zero_only
    def log_local(self, root: Path, split: str, images: Mapping[str, torch.Tensor], global_step: int,
                  current_epoch: int, batch_idx: int) -> None:
        for key, batch in images.items():
            grid = torchvision.utils.make_grid(batch, nrow=4)
            if not self.rescale:  # the images are in [0, 1]
                grid = grid * 2.0 - 1.0
            path = root / split / f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            try:
                array = to_uint8(grid[None], f"{key} at step {global_step}")[0]
            except NonFiniteError as e:  # training goes on (the loss decides); no black grid is written
                log.warning("not writing %s: %s", path, e)
                continue
            write_png(array, path)

    @rank_zero_only
    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str) -> None:
        if not callable(getattr(pl_module, "log_images", None)) or self.max_images <= 0:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        if was_training:
            pl_module.train()
        images = {k: v[: self.max_images].detach().float().cpu() for k, v in images.items()
                  if isinstance(v, torch.Tensor)}
        if self.clamp:
            images = {k: v.clamp(-1.0, 1.0) for k, v in images.items()}
        self.log_local(self._root(trainer), split, images, pl_module.global_step, pl_module.current_epoch,
                       batch_idx)
        for logger in trainer.loggers:
            if isinstance(logger, pl.loggers.WandbLogger):
                grids = [torchvision.utils.make_grid((v + 1) / 2 if self.rescale else v, nrow=4)
                         for v in images.values()]
                logger.log_image(key=f"{split}/images", images=grids, caption=list(images),
                                 step=pl_module.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if not self.disabled and self.check_frequency(check_idx):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.disabled and batch_idx == 0 and not trainer.sanity_checking:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")
