"""``DataModuleFromConfig``: datasets named in the config, loaders that resume mid-epoch.

The training loader is *stateful* in Lightning's sense (``state_dict`` / ``load_state_dict``): a checkpoint records
the epoch and how many batches of it were consumed, and a resumed run continues with the next batch of the same
shuffled order. Sharding across DDP processes is done by the sampler itself (a ``DistributedSampler``, so Lightning
leaves it in place). Streamed datasets (:class:`~ldm.data.shards.WebDatasetInpainting`) get a
:class:`~ldm.data.shards.StreamLoader` instead, which splits the shards between ranks and workers and resumes the
same way.
"""
from __future__ import annotations

import logging
import os
import signal
from functools import partial
from typing import Any, Dict, Iterator, Mapping, Optional

import pytorch_lightning as pl
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.shards import StreamLoader, WebDatasetInpainting
from ..util import instantiate_from_config

log = logging.getLogger(__name__)


def worker_init_fn(worker_id: int, rank: int = 0) -> None:
    """DataLoader workers ignore SIGTERM, then seed as Lightning would have.

    A cluster scheduler (Slurm's ``scancel``) signals every process of the job: a worker that dies of it makes
    the main process fail with "DataLoader worker ... killed by signal" before it can save ``last.ckpt``. The main
    process handles the signal (:class:`~ldm.training.callbacks.StopOnSignal`) and shuts its workers down as usual.
    Setting a ``worker_init_fn`` stops Lightning from adding its own, so its per-worker seeding
    (``seed_everything(workers=True)`` sets ``PL_SEED_WORKERS``) is done here.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle per epoch, one shard per process) that can start an epoch at an
    offset: the first ``skip`` indices of this process's shard are dropped once, for a resumed run."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that counts the batches it handed out this epoch."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._consumed = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        start, self._resume_at = self._resume_at, 0
        self.sampler.skip = start * self.batch_size
        self._consumed = start
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._consumed)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        batches = int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            self.sampler.set_epoch(int(state["epoch"]) + 1)
            self._resume_at = 0
        else:
            self.sampler.set_epoch(int(state["epoch"]))
            self._resume_at = batches
        log.info("data loader resumes at epoch %d, batch %d", self.sampler.epoch, self._resume_at)


class DataModuleFromConfig(pl.LightningDataModule):
    """Datasets from ``target``/``params`` configs (the original's ``main.DataModuleFromConfig`` interface).

    Args:
        batch_size: per process.
        train / validation / test / predict: dataset configs.
        num_workers: loader workers per process (default: min(2 * batch_size, CPU count)).
        seed: seed of the training shuffle order (epoch e uses seed + e); main.py passes ``--seed``.
        wrap, use_worker_init_fn, shuffle_test_loader, shuffle_val_dataloader: the original's options. ``wrap``
            is accepted and has no effect (streamed datasets get a :class:`~ldm.data.shards.StreamLoader`); workers
            are seeded by PyTorch (distinct ``random``/``numpy``/``torch`` seeds per worker and epoch) and Lightning,
            and ignore SIGTERM (:func:`worker_init_fn`) whatever ``use_worker_init_fn`` says.
    """

    def __init__(self, batch_size: int, train: Optional[Mapping] = None, validation: Optional[Mapping] = None,
                 test: Optional[Mapping] = None, predict: Optional[Mapping] = None, wrap: bool = False,
                 num_workers: Optional[int] = None, shuffle_test_loader: bool = False,
                 use_worker_init_fn: bool = False, shuffle_val_dataloader: bool = False, seed: int = 23):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.params.batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.num_workers = num_workers if num_workers is not None else min(2 * batch_size, os.cpu_count() or 1)
        self.seed = int(seed)
        self.shuffle_val = shuffle_val_dataloader
        self.shuffle_test = shuffle_test_loader
        self.dataset_configs = {k: v for k, v in
                                (("train", train), ("validation", validation), ("test", test), ("predict", predict))
                                if v is not None}
        self.datasets: Dict[str, Dataset] = {}
        # Lightning decides which loops run from which *_dataloader hooks exist
        if train is None:
            self.train_dataloader = None
        if validation is None:
            self.val_dataloader = None
        if test is None:
            self.test_dataloader = None
        if predict is None:
            self.predict_dataloader = None

    def setup(self, stage: Optional[str] = None) -> None:
        for name, config in self.dataset_configs.items():
            if name not in self.datasets:
                self.datasets[name] = instantiate_from_config(config)
                log.info("%s data: %s, %d items", name, type(self.datasets[name]).__name__,
                         len(self.datasets[name]))
                if len(self.datasets[name]) == 0:
                    raise ValueError(f"data.params.{name}: the dataset is empty ({config.get('target')})")

    def _loader_kwargs(self) -> Dict[str, Any]:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return dict(batch_size=self.batch_size, num_workers=self.num_workers,
                    persistent_workers=self.num_workers > 0, pin_memory=False,
                    worker_init_fn=partial(worker_init_fn, rank=rank))

    def _rank_world(self) -> tuple:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[name]
        if isinstance(dataset, WebDatasetInpainting):
            rank, world = self._rank_world()
            return StreamLoader(dataset, rank=rank, world_size=world, **self._loader_kwargs())
        return DataLoader(dataset, shuffle=shuffle, **self._loader_kwargs())

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = self.datasets["train"]
        if isinstance(dataset, WebDatasetInpainting):
            return self._loader("train", shuffle=True)
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                                   drop_last=False)
        return ResumableDataLoader(dataset, sampler, drop_last=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.shuffle_val)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.shuffle_test)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False)
