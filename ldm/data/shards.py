"""Webdataset tar shards (the format img2dataset writes: ``00000.tar`` holding ``000000001.jpg`` + ``.txt`` /
``.json``) streamed as inpainting samples, the same ``{"image", "mask", "path"}`` as an image folder.

Reading uses the webdataset library: its brace expansion of ``urls``, its URL opener (local paths, ``file:``,
``pipe:<command>``, ``http(s)``, ``gs``, ``hf``, ...; other schemes such as ``s3://`` through fsspec), its tar reader
and its shuffle buffer. Each sample goes through :class:`~ldm.data.inpainting.InpaintingTransform`, the one
per-sample recipe of every data source.

The stream of one epoch is a pure function of ``(seed, epoch, rank, worker)``:

* the shard list is shuffled by ``(seed, epoch)`` (the same order on every rank), then split between the DDP ranks
  and, within a rank, between its loader workers (``islice`` by rank as webdataset's ``split_by_node``, then its
  ``split_by_worker``): every process reads shards of its own, so ranks see disjoint samples. With fewer shards
  than ``ranks x workers`` every process reads all shards and keeps every ``ranks x workers``-th sample instead
  (still disjoint; each process then reads every shard);
* each process cycles over its shards and takes exactly ``epoch_size // (ranks x workers)`` samples per epoch, so
  every rank runs the same number of batches (a rank that ran out first would hang the others in DDP);
* a shuffle buffer of ``shuffle_buffer`` samples seeded by ``(seed, epoch, rank, worker)``, applied to each pass
  over the process's shards on its own: an epoch that fits in one pass (each process's shards hold at least its
  share, as with shards of equal size and ``epoch_size`` at most their total) sees no sample twice;
* the crop and mask of the sample at position ``p`` are drawn from ``(seed, epoch, rank, worker, p)``
  (validation, ``fixed_masks``: from ``(seed, crc32(key))``, the same in every run).

Corrupt samples (an unreadable tar member or an image that does not decode) are skipped, the first 20 of a
process logged with their shard and key, and all counted: every worker logs its count at the end of its epoch, and
``corrupt`` on the dataset holds it in the process that read it. They never stop training; a full pass over a
process's shards without a single sample that decodes does (a wrong URL pattern or ``image_key``, caption-only
shards, shards of nothing but corrupt images: not data noise). That is a :class:`StreamError`, one line naming the
process's shards and the reason (the members found, the decode errors), raised in the worker that met it; the
loader re-raises it in the main process as the same one line.

Resume (:class:`StreamLoader`): a checkpoint records the epoch and the batches this rank consumed; the resumed
loader rebuilds the same streams and each worker skips the samples it had delivered (read, not decoded). That is
exact when the shards are the same and ``ranks``, ``num_workers`` and ``batch_size`` are unchanged; corrupt samples
met before the stop point make the skip fall short by that many, so at most that many samples are seen twice.
With another layout the epoch resumes at the same batch count, but the samples of the rest of the epoch are not
those the old layout would have given.
"""
from __future__ import annotations

import itertools
import logging
import random
import zlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import fsspec
import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls, split_by_worker
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..data.inpainting import InpaintingTransform, PathLike, check_seed, sample_rng
from ..data.masks import DEFAULT_MASK_CONFIG
from ..image_io import DEFAULT_MAX_PIXELS, InputError, open_image

log = logging.getLogger(__name__)

# tar member suffixes taken as the image, in this order (img2dataset writes jpg; others write png / webp)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# corrupt samples logged one by one per process; the count goes on
_MAX_CORRUPT_WARNINGS = 20


def expand_shard_urls(urls: Union[str, Sequence[str]]) -> List[str]:
    """``urls`` as webdataset takes them: a brace pattern (``data/{00000..00099}.tar``, several joined by ``::``)
    or a list of URLs / patterns -> the list of shard URLs."""
    if isinstance(urls, str):
        out = expand_urls(urls)
    else:
        out = [u for url in urls for u in expand_urls(str(url))]
    if not out:
        raise ValueError(f"urls: no shards in {urls!r}")
    return out


def open_url(url: str) -> Any:
    """A binary stream of one shard: webdataset's opener for the schemes it knows (paths, ``file:``, ``pipe:``,
    ``http(s)``, ``gs``, ``hf``, ...), fsspec for any other (``s3://``, ``gcs://``, ``az://``, ...)."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or len(scheme) == 1 or scheme in gopen_schemes:  # len 1: a Windows drive letter
        return gopen(url, "rb")
    return fsspec.open(url, "rb").open()


class StreamError(ValueError):
    """A stream that can never deliver a sample (a whole pass over a process's shards without one that decodes).

    Raised in a DataLoader worker, it comes back to the main process through torch's re-raise, which builds the
    exception anew from the worker's whole traceback text; the message is cut back to its own last line here, so
    the user sees one line wherever it was raised."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if "\nOriginal Traceback" in message and marker in message:  # torch's ExceptionWrapper.reraise
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class _Pass:
    """What one pass over a process's shards found: samples read and decoded, member suffixes, errors."""

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self.read = self.good = self.errors = 0
        self.members: set = set()
        self.first_error: Optional[str] = None

    def failed(self, what: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = what

    def error(self, where: str) -> StreamError:
        shards = ", ".join(self.urls[:3]) + (f" and {len(self.urls) - 3} more" if len(self.urls) > 3 else "")
        if self.read == 0:
            why = "no sample could be read" + (f" ({self.errors} read errors, first: {self.first_error})"
                                               if self.errors else "")
        else:
            members = ", ".join(sorted(self.members)) or "none"
            why = (f"{self.read} samples read, none decoded; members found: {members}; {self.errors} errors, "
                   f"first: {self.first_error}")
        return StreamError(f"{where}: no usable sample in a whole pass over {len(self.urls)} shard(s) ({shards}): "
                           f"{why}; check urls and image_key")


_END_OF_PASS = object()  # yielded by WebDatasetInpainting._raw_samples after each pass


class _CorruptCounter:
    """webdataset's error handler: log (the first few), count, continue."""

    def __init__(self, owner: "WebDatasetInpainting"):
        self.owner = owner

    def __call__(self, exn: Exception) -> bool:
        self.owner.note_corrupt(f"{type(exn).__name__}: {exn}")
        return True


class WebDatasetInpainting(IterableDataset):
    """Inpainting samples streamed from webdataset tar shards; see the module docstring for the splitting,
    shuffling, seeding and resume rules.

    Args:
        urls: a brace pattern (``/data/laion/{00000..01023}.tar``, ``pipe:aws s3 cp s3://b/{0..9}.tar -``) or a list
            of URLs / patterns.
        epoch_size: samples per epoch over all ranks together (usually the number of images in the shards, which
            img2dataset prints); every process takes ``epoch_size // (ranks x workers)`` of them per epoch.
        size, mask_config, no_mask_prob, random_crop, min_crop_frac: the recipe
            (:class:`~ldm.data.inpainting.InpaintingTransform`).
        shuffle_buffer: samples held by each worker's shuffle buffer (0: stream order, e.g. for validation).
        shuffle_shards: shuffle the shard order every epoch (training); False keeps the given order.
        fixed_masks: crop and mask of a sample fixed by ``(seed, its key)`` (validation).
        seed: base seed of the shard order, the shuffle buffers and the masks.
        image_key: the tar member suffix of the image; default: the first of :data:`IMAGE_KEYS` in the sample.
        max_pixels: larger images are skipped as corrupt (:mod:`ldm.image_io`).
    """

    def __init__(self, urls: Union[str, Sequence[str]], epoch_size: int, size: int = 256,
                 mask_config: Union[PathLike, Mapping[str, Any]] = DEFAULT_MASK_CONFIG, no_mask_prob: float = 0.5,
                 random_crop: bool = True, min_crop_frac: float = 0.5, shuffle_buffer: int = 1000,
                 shuffle_shards: bool = True, fixed_masks: bool = False, seed: int = 0,
                 image_key: Optional[str] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        super().__init__()
        self.transform = InpaintingTransform(size, mask_config, no_mask_prob, random_crop, min_crop_frac)
        self.urls = expand_shard_urls(urls)
        if isinstance(epoch_size, bool) or not isinstance(epoch_size, int) or epoch_size < 1:
            raise ValueError(f"epoch_size must be a positive integer (samples per epoch, all ranks together), "
                             f"got {epoch_size!r}")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an integer >= 0, got {shuffle_buffer!r}")
        self.epoch_size = epoch_size
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = bool(shuffle_shards)
        self.fixed_masks = bool(fixed_masks)
        self.seed = check_seed(seed)
        self.image_key = image_key
        self.max_pixels = max_pixels
        # set by the loader before each epoch (StreamLoader.__iter__); read in the workers
        self.epoch, self.rank, self.world_size, self.num_workers = 0, 0, 1, 0
        self.skip: List[int] = []  # samples each worker skips at the start of this epoch (resume)
        self.corrupt = 0
        self._pass: Optional[_Pass] = None  # the pass over the shards now read (in the process that reads)
        log.info("%s: %d shards from %s, %d samples per epoch", type(self).__name__, len(self.urls),
                 self.urls[0] if len(self.urls) == 1 else f"{self.urls[0]} .. {self.urls[-1]}", epoch_size)

    def configure(self, rank: int, world_size: int, num_workers: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        if self.samples_per_worker < 1:
            raise ValueError(f"epoch_size={self.epoch_size} is smaller than ranks x workers "
                             f"({self.world_size} x {max(self.num_workers, 1)}): every worker needs a sample")

    @property
    def slots(self) -> int:
        """Processes reading the stream: ranks x loader workers (an in-process loader counts as one)."""
        return self.world_size * max(self.num_workers, 1)

    @property
    def samples_per_worker(self) -> int:
        return self.epoch_size // self.slots

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        return self.samples_per_worker * max(self.num_workers, 1)

    def note_corrupt(self, what: str) -> None:
        self.corrupt += 1
        if self._pass is not None:
            self._pass.failed(what)
        if self.corrupt <= _MAX_CORRUPT_WARNINGS:
            suffix = " (further corrupt-sample warnings suppressed; the count goes on)" \
                if self.corrupt == _MAX_CORRUPT_WARNINGS else ""
            log.warning("skipping corrupt sample: %s%s", what, suffix)

    def _shard_order(self) -> List[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
        return urls

    def _raw_samples(self, worker: int) -> Iterator[Any]:
        """This process's undecoded samples, pass after pass over its shards without end; after each pass its
        :class:`_Pass` (the read errors counted in it). Each pass goes through the shuffle buffer on its own, so an
        epoch that fits in one pass sees no sample twice."""
        urls = self._shard_order()
        slot = self.rank * max(self.num_workers, 1) + worker
        split_samples = len(urls) < self.slots
        if not split_samples:
            # webdataset's split_by_node with the rank given by the loader (in a worker process neither the
            # environment nor torch.distributed need say it), then its split_by_worker
            urls = list(split_by_worker(itertools.islice(urls, self.rank, None, self.world_size)))
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        while True:
            self._pass = _Pass(urls)
            handler = _CorruptCounter(self)
            samples = group_by_keys(tar_file_expander(_opened(urls, handler), handler=handler), handler=handler)
            if split_samples:
                samples = itertools.islice(samples, slot, None, self.slots)
            if self.shuffle_buffer > 1:
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            for sample in samples:
                self._pass.read += 1
                self._pass.members.update(k for k in sample if not k.startswith("__"))
                yield sample
            yield _END_OF_PASS

    def _image_bytes(self, sample: Dict[str, Any]) -> Tuple[str, bytes]:
        keys = (self.image_key,) if self.image_key else IMAGE_KEYS
        for key in keys:
            if key in sample:
                return key, sample[key]
        raise InputError(f"no image member ({', '.join(keys)}) among {sorted(k for k in sample if k[:2] != '__')}")

    def _decode(self, sample: Dict[str, Any], position: int, worker: int) -> Optional[Dict[str, Any]]:
        name = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
        try:
            key, data = self._image_bytes(sample)
            if self.fixed_masks:
                rng = sample_rng(self.seed, zlib.crc32(str(sample.get("__key__")).encode()))
            else:
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, position])
            with open_image(f"{name}.{key}", self.max_pixels, data=data) as img:
                return self.transform(img, f"{name}.{key}", rng)
        except InputError as err:
            self.note_corrupt(str(err))
            return None

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != max(self.num_workers, 1):
            raise RuntimeError(f"{type(self).__name__} was configured for {self.num_workers} workers and runs in "
                               f"{info.num_workers}: load it with ldm.data.shards.StreamLoader")
        n = self.samples_per_worker
        skip = min(self.skip[worker] if worker < len(self.skip) else 0, n)
        raw = self._raw_samples(worker)
        where = f"{type(self).__name__} rank {self.rank} worker {worker}"
        corrupt_before = self.corrupt

        def next_sample() -> Dict[str, Any]:
            """The next raw sample; a pass that ended without one that decoded stops the stream."""
            while True:
                sample = next(raw)
                if sample is not _END_OF_PASS:
                    return sample
                if self._pass.good == 0:
                    raise self._pass.error(where)

        for _ in range(skip):  # a resumed epoch: the samples delivered before the stop, read and not decoded
            next_sample()
            self._pass.good += 1  # delivered before the stop: decoded then
        delivered, position = skip, skip
        while delivered < n:
            example = self._decode(next_sample(), position, worker)
            position += 1
            if example is not None:
                self._pass.good += 1
                delivered += 1
                yield example
        if self.corrupt > corrupt_before:
            log.warning("%s rank %d worker %d epoch %d: skipped %d corrupt samples (%d in this process)",
                        type(self).__name__, self.rank, worker, self.epoch, self.corrupt - corrupt_before,
                        self.corrupt)


def _opened(urls: Sequence[str], handler: Any) -> Iterator[Dict[str, Any]]:
    """``{"url", "stream"}`` of each shard; one that cannot be opened (a missing file, a failed pipe, a network
    error) goes to ``handler`` with its URL and the next one is tried."""
    for url in urls:
        try:
            yield {"url": url, "stream": open_url(url)}
        except Exception as exn:  # noqa: BLE001  (any opener error)
            exn.args = exn.args + (url,)
            handler(exn)


class StreamLoader(DataLoader):
    """The DataLoader of a :class:`WebDatasetInpainting`: tells the dataset its rank, world size, workers, epoch
    and resume point before each epoch, and counts the batches it handed out (Lightning saves ``state_dict`` in
    the checkpoint and calls ``load_state_dict`` on resume).

    Worker ``w`` delivers batches ``w, w + W, w + 2W, ...`` of the rank (the DataLoader's in-order round robin;
    every worker has the same number of samples, so it holds to the end of the epoch): after ``B`` batches,
    worker ``w`` had delivered ``B // W + (w < B % W)`` of its batches. Workers are not persistent, so each epoch's
    workers get the epoch and skip counts set here.
    """

    def __init__(self, dataset: WebDatasetInpainting, rank: int = 0, world_size: int = 1, **kwargs: Any):
        kwargs["persistent_workers"] = False
        kwargs.pop("shuffle", None)  # the dataset shuffles itself
        super().__init__(dataset, **kwargs)
        dataset.configure(rank, world_size, self.num_workers)
        self.epoch = 0
        self._consumed = 0
        self._resume_at = 0

    def _batches_per_worker(self) -> int:
        n, bs = self.dataset.samples_per_worker, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def __len__(self) -> int:
        return self._batches_per_worker() * max(self.num_workers, 1)

    def _worker_skips(self, batches: int) -> List[int]:
        workers = max(self.num_workers, 1)
        return [min((batches // workers + (w < batches % workers)) * self.batch_size,
                    self.dataset.samples_per_worker) for w in range(workers)]

    def __iter__(self) -> Iterator[Any]:
        # the epoch advances when the previous one was delivered whole (Lightning stops iterating after the last
        # batch it counted, so the generator may never see its own end)
        if self._resume_at == 0 and self._consumed >= len(self):
            self.epoch += 1
        start, self._resume_at = self._resume_at, 0
        self.dataset.epoch = self.epoch
        self.dataset.skip = self._worker_skips(start)
        self._consumed = start
        try:
            for batch in super().__iter__():
                self._consumed += 1
                yield batch
        finally:
            self.dataset.skip = []

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": int(self.epoch), "batches": int(self._consumed), "num_workers": int(self.num_workers),
                "batch_size": int(self.batch_size), "world_size": int(self.dataset.world_size)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        layout = (int(state.get("num_workers", self.num_workers)), int(state.get("batch_size", self.batch_size)),
                  int(state.get("world_size", self.dataset.world_size)))
        if layout != (self.num_workers, self.batch_size, self.dataset.world_size):
            log.warning("resuming a stream saved with (workers, batch size, ranks) = %s under %s: the epoch goes on "
                        "at the same batch count, but not with the samples the old layout would have given",
                        layout, (self.num_workers, self.batch_size, self.dataset.world_size))
        batches = int(state["batches"])
        if batches >= len(self):
            self.epoch, self._resume_at = int(state["epoch"]) + 1, 0
        else:
            self.epoch, self._resume_at = int(state["epoch"]), batches
        log.info("stream loader resumes at epoch %d, batch %d", self.epoch, self._resume_at)
