"""Training at scale: webdataset shards, Hugging Face datasets, gradient checkpointing, DDP across localhost
"nodes", Slurm preemption and requeue. Tiny model, few steps."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.data.hf_datasets import HFDatasetInpainting
from ldm.data.inpainting import ImageFolderInpainting
from ldm.data.shards import StreamLoader, WebDatasetInpainting
from ldm.modules.diffusionmodules.model import Decoder, ResnetBlock
from ldm.project import load_yaml
from tests.conftest import TINY_DDCONFIG
from tests.training.test_main import Recorder, config_file, image_folder  # noqa: F401  (fixtures)

REPO = Path(main.__file__).resolve().parent
VALIDATION = dict(size=32, random_crop=False, no_mask_prob=1.0, fixed_masks=True)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, corrupt=(), seed: int = 0) -> str:
    """``shards`` tar files of ``per_shard`` 40x48 PNGs (+ a .txt caption, as img2dataset writes); members named
    in ``corrupt`` (``(shard, index)``) hold garbage. -> the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
                img = np.asarray(Image.fromarray(small).resize((48, 40), Image.BILINEAR))
                data = b"not an image" if (s, i) in corrupt else _png(img)
                sink.write({"__key__": f"{s:05d}{i:04d}", "png": data, "txt": "a caption"})
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def _names(loader) -> list:
    return [Path(p).name for batch in loader for p in batch["path"]]


@pytest.mark.slow
def test_shard_stream_splits_between_ranks_and_workers_and_resumes_exactly(tmp_path, caplog):
    urls = write_shards(tmp_path / "shards", 4, 6, corrupt={(1, 2)})
    # two ranks x two workers: four processes with shards of their own, the same number of batches each
    per_rank = []
    for rank in range(2):
        ds = WebDatasetInpainting(urls, epoch_size=23, size=32, shuffle_buffer=4, seed=3)
        loader = StreamLoader(ds, rank=rank, world_size=2, batch_size=2, num_workers=2)
        names = _names(loader)
        assert len(loader) == 6 and len(names) == 10  # 23 // 4 = 5 per worker: a shard without its corrupt member
        per_rank.append(names)
    assert not set(per_rank[0]) & set(per_rank[1])  # disjoint ranks
    assert all(len(set(names)) == len(names) for names in per_rank)  # one pass: no sample twice in the epoch
    shards = [{n.split("#")[0] for n in names} for names in per_rank]
    assert [len(s) for s in shards] == [2, 2] and not shards[0] & shards[1]  # a shard per worker, its own
    assert not any("00001.tar#000010002" in n for n in per_rank[0] + per_rank[1])  # the corrupt member never

    # one process: the corrupt sample and a missing shard are skipped, logged and counted; the stream is a
    # function of the seed
    listed = [urls, str(tmp_path / "missing.tar")]
    ds = WebDatasetInpainting(listed, epoch_size=24, size=32, shuffle_buffer=4, seed=3)  # a whole pass and one more
    with caplog.at_level(logging.WARNING, logger="ldm.data.shards"):
        first = _names(StreamLoader(ds, batch_size=2))
    assert ds.corrupt >= 2 and "skipping corrupt sample" in caplog.text and "00001.tar#000010002" in caplog.text
    assert "missing.tar" in caplog.text
    assert len(first) == 24 and first == _names(StreamLoader(WebDatasetInpainting(
        listed, epoch_size=24, size=32, shuffle_buffer=4, seed=3), batch_size=2))

    # resume: 2 batches consumed, the state saved; a new loader gives exactly the rest (clean shards: bound 0)
    clean = write_shards(tmp_path / "clean", 3, 4)

    def loader():
        return StreamLoader(WebDatasetInpainting(clean, epoch_size=12, size=32, shuffle_buffer=5, seed=1),
                            batch_size=2, num_workers=2)

    full = [b["path"] for b in loader()]
    part = loader()
    it = iter(part)
    seen = [next(it)["path"] for _ in range(2)]
    state = part.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    assert seen + [b["path"] for b in resumed] == full


def test_shards_and_hf_datasets_give_the_folder_transform(tmp_path):
    """The same PNGs as a folder, as a webdataset shard, as a save_to_disk folder and as parquet: one per-sample
    transform, so the same crops (validation settings) and masks drawn from the same rule."""
    import datasets

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "folder").mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / "folder" / f"{i}.png")
    folder = ImageFolderInpainting(root=tmp_path / "folder", **VALIDATION)
    with wds.TarWriter(str(tmp_path / "one.tar")) as sink:
        for i, a in enumerate(arrays):
            sink.write({"__key__": str(i), "png": _png(a)})
    shard = WebDatasetInpainting(str(tmp_path / "one.tar"), epoch_size=3, shuffle_buffer=0, shuffle_shards=False,
                                 **VALIDATION)
    table = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays], "label": [0, 1, 2]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.Value("int32")}))
    table.save_to_disk(str(tmp_path / "hf"))
    table.to_parquet(str(tmp_path / "train.parquet"))
    saved = HFDatasetInpainting(path=tmp_path / "hf", **VALIDATION)
    parquet = HFDatasetInpainting(data_files=str(tmp_path / "*.parquet"), **VALIDATION)
    streamed = list(StreamLoader(shard, batch_size=1))
    for i in range(3):
        want = folder[i]["image"]
        for got in (streamed[i]["image"][0], saved[i]["image"], parquet[i]["image"]):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="image_column"):
        HFDatasetInpainting(path=tmp_path / "hf", image_column="picture")
    with pytest.raises(FileNotFoundError, match="data_files"):
        HFDatasetInpainting(data_files=str(tmp_path / "none-*.parquet"))
    with pytest.raises(ValueError, match="epoch_size"):
        WebDatasetInpainting(str(tmp_path / "one.tar"), epoch_size=0)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = {k: v for k, v in TINY_DDCONFIG.items() if k != "double_z"}
    decoder = Decoder(**config, condition=True)
    z = torch.randn(2, 4, 16, 16)
    image, mask = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 1, 32, 32) > 0.5).float()
    calls = []
    # a pre-hook: the recomputation stops early, after the last saved tensor, and never reaches a forward hook
    decoder.up[0].block[0].register_forward_pre_hook(lambda *a: calls.append(1))

    def grads(checkpointing: bool):
        decoder.gradient_checkpointing = checkpointing
        decoder.zero_grad()
        calls.clear()
        out = decoder(z, image, mask)
        (out.square().mean() + out.abs().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in decoder.named_parameters()}, len(calls)

    out_a, plain, calls_plain = grads(False)
    out_b, checkpointed, calls_ckpt = grads(True)
    assert calls_plain == 1 and calls_ckpt == 2  # the block ran again in the backward pass
    torch.testing.assert_close(out_b, out_a, atol=0, rtol=0)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-7, rtol=1e-5, msg=name)
    with torch.no_grad():  # inference: no recomputation, the same output
        calls.clear()
        torch.testing.assert_close(decoder(z, image, mask), out_a)
        assert len(calls) == 1
    assert isinstance(decoder.up[0].block[0], ResnetBlock)


def _data_config(base: Path, train: dict, path: Path) -> Path:
    config = load_yaml(base)
    config.data.params.train = train
    config.data.params.pop("validation")
    config.model.params.monitor = None
    OmegaConf.save(config, path)
    return path


def _shards_train(urls: str, epoch_size: int) -> dict:
    return {"target": "ldm.data.shards.WebDatasetInpainting",
            "params": {"urls": urls, "epoch_size": epoch_size, "size": 32, "shuffle_buffer": 4, "seed": 5,
                       "no_mask_prob": 0.25, "mask_config": "configs/autoencoder/random_thick_256.yaml"}}


class SignalRecorder(Recorder):
    """Recorder that sends ``signum`` (and writes one file per rank and the weights' digest at the end)."""

    def __init__(self, path: str, kill_at: int = -1, signum: int = signal.SIGTERM):
        super().__init__(path, kill_at=-1)
        self.signal_at, self.signum = kill_at, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.path = self.path.split(".rank")[0] + f".rank{trainer.global_rank}"
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, p in sorted(pl_module.state_dict().items()):
            digest.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
        Path(self.path.split(".rank")[0] + f".weights{trainer.global_rank}").write_text(digest.hexdigest())


def _steps(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_train_from_shards_and_hf_folder_sigterm_resume_within_bound(tmp_path, config_file, monkeypatch):  # noqa: F811
    """main.py from shards: killed by SIGTERM at step 2, --resume runs steps 3..5 on exactly the samples an
    uninterrupted stream gives (5 batches per epoch, into epoch 1); then a few steps from a datasets folder."""
    import datasets

    urls = write_shards(tmp_path / "shards", 2, 5)
    cfg = _data_config(config_file, _shards_train(urls, 10), tmp_path / "shards.yaml")
    record = tmp_path / "rec.jsonl"
    common = ["-t", "--max_steps", "6", "lightning.callbacks.image_logger.params.disabled=true",
              "lightning.callbacks.recorder.target=tests.training.test_scale.SignalRecorder",
              f"lightning.callbacks.recorder.params.path={record}"]
    monkeypatch.setenv(main.RUN_TIMESTAMP_ENV, "2020-01-01T00-00-00")
    rc = main.main(["--logdir", str(tmp_path / "logs"), "--wandb", "off", "--base", str(cfg), "-n", "wds", *common,
                    "lightning.callbacks.recorder.params.kill_at=2"])
    assert rc == 128 + signal.SIGTERM
    (run,) = (tmp_path / "logs").glob("*_wds")
    assert main.main(["--resume", str(run), "--wandb", "off", *common]) == 0
    records = _steps(Path(f"{record}.rank0"))
    assert [r["step"] for r in records] == list(range(6))
    ds = WebDatasetInpainting(**{k: v for k, v in _shards_train(urls, 10)["params"].items()})
    loader = StreamLoader(ds, batch_size=2)
    expected = [[Path(p).name for p in b["path"]] for _ in range(2) for b in loader][:6]
    assert [r["paths"] for r in records] == expected  # none repeated, none skipped

    table = datasets.Dataset.from_dict({"image": [Image.open(p) for p in sorted(config_file.parent.glob(
        "train/*.png"))]}, features=datasets.Features({"image": datasets.Image()}))
    table.save_to_disk(str(tmp_path / "hf"))
    hf = {"target": "ldm.data.hf_datasets.HFDatasetInpainting", "params": {"path": str(tmp_path / "hf"), "size": 32}}
    cfg = _data_config(config_file, hf, tmp_path / "hf.yaml")
    monkeypatch.setenv(main.RUN_TIMESTAMP_ENV, "2020-01-01T00-00-01")
    assert main.main(["--logdir", str(tmp_path / "logs"), "--wandb", "off", "--base", str(cfg), "-n", "hf", "-t",
                      "--max_steps", "2", "lightning.callbacks.image_logger.params.disabled=true"]) == 0
    (run,) = (tmp_path / "logs").glob("*_hf")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def slurm_job(tmp_path: Path, monkeypatch) -> Path:
    """This process inside Slurm batch job 4242 (one task, one node) with a stand-in ``scontrol`` on PATH that
    logs its arguments; -> the log file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1",
                       "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost", "SLURM_CPUS_ON_NODE": "1"}.items():
        monkeypatch.setenv(key, value)
    return calls


def test_slurm_sigusr1_checkpoints_requeues_and_the_same_command_resumes(tmp_path, config_file,  # noqa: F811
                                                                         monkeypatch):
    """Slurm's variables set and a stand-in scontrol on PATH: SIGUSR1 at step 1 -> last.ckpt after that batch ->
    `scontrol requeue 4242` -> exit 138; the requeued job (same command line, same job id) continues the same run
    folder from last.ckpt, no step repeated."""
    calls = slurm_job(tmp_path, monkeypatch)
    monkeypatch.setenv(main.RUN_TIMESTAMP_ENV, "x")
    monkeypatch.delenv(main.RUN_TIMESTAMP_ENV)  # restored (absent) afterwards; main.py sets slurm-4242
    urls = write_shards(tmp_path / "shards", 2, 4)
    cfg = _data_config(config_file, _shards_train(urls, 8), tmp_path / "slurm.yaml")
    record = tmp_path / "slurm.jsonl"
    command = ["--logdir", str(tmp_path / "logs"), "--wandb", "off", "--base", str(cfg), "-n", "job", "-t",
               "--max_steps", "4", "lightning.callbacks.image_logger.params.disabled=true",
               "lightning.callbacks.recorder.target=tests.training.test_scale.SignalRecorder",
               f"lightning.callbacks.recorder.params.path={record}",
               "lightning.callbacks.recorder.params.kill_at=1", f"lightning.callbacks.recorder.params.signum="
               f"{int(signal.SIGUSR1)}"]
    assert main.main(command) == 128 + signal.SIGUSR1
    assert calls.read_text().split() == ["requeue", "4242"]
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name == "slurm-4242_job"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert main.main(command) == 0  # the requeued job: step 1 is past, no signal this time
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["slurm-4242_job"]
    assert [r["step"] for r in _steps(Path(f"{record}.rank0"))] == list(range(4))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_localhost_nodes_train_in_step_on_disjoint_shards(tmp_path, config_file):  # noqa: F811
    """Two main.py processes as two nodes (gloo, NODE_RANK 0 / 1, one CPU process each) from 4 shards: both finish,
    hold identical weights after the same 3 steps, and saw disjoint samples."""
    urls = write_shards(tmp_path / "shards", 4, 3)
    cfg = _data_config(config_file, _shards_train(urls, 12), tmp_path / "ddp.yaml")
    record = tmp_path / "ddp.jsonl"
    port = _free_port()
    procs = []
    for node in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node),
               "LOCAL_RANK": "0", "WORLD_SIZE": "2", main.RUN_TIMESTAMP_ENV: "2020-01-01T00-00-00",
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "main.py", "--logdir", str(tmp_path / "logs"), "--wandb", "off", "--base", str(cfg),
               "-n", "ddp", "-t", "--num_nodes", "2", "--max_steps", "3",
               "lightning.callbacks.image_logger.params.disabled=true",
               "lightning.callbacks.recorder.target=tests.training.test_scale.SignalRecorder",
               f"lightning.callbacks.recorder.params.path={record}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    ranks = [_steps(Path(f"{record}.rank{r}")) for r in range(2)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [0, 1, 2]
    seen = [{n for r in recs for n in r["paths"]} for recs in ranks]
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]
    digests = {Path(f"{record}.weights{r}").read_text() for r in range(2)}
    assert len(digests) == 1, "ranks hold different weights"
    (run,) = (tmp_path / "logs").glob("*_ddp")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


_STREAM_SCRIPT = """
import sys
from ldm.data.shards import StreamError, StreamLoader, WebDatasetInpainting
urls, image_key = sys.argv[1].split(","), sys.argv[2] or None
loader = StreamLoader(WebDatasetInpainting(urls, epoch_size=8, size=32, shuffle_buffer=0, shuffle_shards=False,
                                           image_key=image_key), batch_size=2, num_workers=2)
try:
    for batch in loader:
        pass
except StreamError as err:
    print("StreamError:", err)
    sys.exit(3)
print("finished")
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["all corrupt", "captions only", "wrong image_key"])
def test_a_stream_with_no_decodable_sample_stops_with_one_line(tmp_path, case):
    """Two shards, two workers: worker 1's only shard has no sample that decodes (every image corrupt, captions
    only, or ``image_key`` naming a suffix the shards lack). The stream stops within a bounded time (it looped
    forever before) with one line naming the shard and the reason."""
    good = write_shards(tmp_path / "good", 1, 4).replace("{00000..00000}", "00000")
    bad = tmp_path / "bad.tar"
    with wds.TarWriter(str(bad)) as sink:
        for i in range(4):
            sample = {"__key__": f"b{i:04d}", "txt": "a caption"}
            if case == "all corrupt":
                sample["png"] = b"not an image"
            sink.write(sample)
    image_key = "jpg" if case == "wrong image_key" else ""
    if case == "wrong image_key":  # PNG shards read with image_key jpg: each worker's one shard
        bad = Path(good)
    urls = [good, str(bad)]
    done = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, ",".join(urls), image_key], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 3, done.stdout + done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and str(bad) in line and "no usable sample in a whole pass" in line
    assert f"members found: {'txt' if case == 'captions only' else 'png, txt'};" in line
    reason = {"all corrupt": "4 errors, first: ", "captions only": "no image member (jpg, jpeg",
              "wrong image_key": "no image member (jpg) among ['png', 'txt']"}[case]
    assert reason in line


def test_a_stream_of_good_and_bad_shards_goes_on(tmp_path):
    """A pass with one sample that decodes is not stopped: corrupt samples beside good ones stay data noise."""
    urls = write_shards(tmp_path / "s", 1, 4, corrupt={(0, 0), (0, 1), (0, 2)})
    ds = WebDatasetInpainting(urls, epoch_size=5, size=32, shuffle_buffer=0, shuffle_shards=False)
    names = _names(StreamLoader(ds, batch_size=1))
    assert names == ["00000.tar#000000003.png"] * 5 and ds.corrupt == 15


def test_an_empty_or_mistyped_hf_dataset_is_named_before_the_first_batch(tmp_path):
    """An empty dataset (saved, or parquet) is named as empty, not datasets' IndexError; an image column of
    strings is refused when the dataset is built, not at the first batch."""
    import datasets

    empty = datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()}))
    empty.save_to_disk(str(tmp_path / "empty"))
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match=r"empty dataset \(saved with 0 rows\)"):
        HFDatasetInpainting(path=tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty.parquet hold an empty dataset \(0 rows\)"):
        HFDatasetInpainting(data_files=str(tmp_path / "empty.parquet"))
    datasets.Dataset.from_dict({"image": ["a.png", "b.png"]}).save_to_disk(str(tmp_path / "strings"))
    with pytest.raises(ValueError, match=r"image_column: 'image' of .*strings holds .*string.*not images"):
        HFDatasetInpainting(path=tmp_path / "strings")
    datasets.Dataset.from_dict({"image": [{"bytes": _png(np.zeros((4, 4, 3), np.uint8)), "path": "x.png"}]}
                               ).save_to_disk(str(tmp_path / "struct"))
    assert HFDatasetInpainting(path=tmp_path / "struct", **VALIDATION)[0]["image"].shape == (3, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("node_rank, missing", [("1", "MASTER_ADDR and MASTER_PORT not set"),
                                                ("2", "NODE_RANK=2 is outside the world of --num_nodes 2")])
def test_a_node_started_wrong_is_refused_at_once(tmp_path, config_file, node_rank, missing):  # noqa: F811
    """``NODE_RANK=1 --num_nodes 2`` without MASTER_ADDR waited 30 minutes at "Initializing distributed";
    ``NODE_RANK=2`` of 2 nodes was not refused. Now one line naming what is wrong, before any folder is made."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                    "LOCAL_RANK", "LDM_"))}
    env.update(NODE_RANK=node_rank, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--base", str(config_file), "-t", "--num_nodes",
                           "2", "--logdir", str(tmp_path / "logs"), "--wandb", "off"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and missing in last
    assert not (tmp_path / "logs").exists()


def test_a_bounded_wait_for_nodes_that_never_arrive(monkeypatch):
    """The process group of a run across nodes waits LDM_DIST_TIMEOUT seconds (default 600), not torch's 30
    minutes; a bad value is named."""
    from ldm.training import cluster
    from ldm.training.trainer import build_trainer_kwargs, check_devices

    opt = main.get_parser().parse_args(["--num_nodes", "2"])
    for key in ("SLURM_NTASKS", "SLURM_JOB_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "1")
    kwargs, world = build_trainer_kwargs(opt, OmegaConf.create())
    strategy = cluster.with_timeout(kwargs["strategy"])  # what the Trainer gets
    assert world == 2 and strategy._timeout.total_seconds() == cluster.DEFAULT_DIST_TIMEOUT
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}
    monkeypatch.setenv(cluster.DIST_TIMEOUT_ENV, "45")
    assert cluster.with_timeout("ddp")._timeout.total_seconds() == 45
    monkeypatch.setenv(cluster.DIST_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="LDM_DIST_TIMEOUT='soon': expected a positive number of seconds"):
        check_devices(opt, kwargs)


@pytest.mark.slow
def test_slurm_signal_during_setup_hard_kill_and_requeues_keep_one_run_and_all_metrics(
        tmp_path, config_file, monkeypatch):  # noqa: F811
    """Three incarnations of Slurm job 4242, one command line:
    1. SIGUSR1 during setup (it killed the job with nothing saved): last.ckpt after the first batch, requeued, 138;
    2. after a hard kill that left only a periodic checkpoint (it started slurm-4242-1_job from step 0): the same
       folder continues from it, and SIGUSR1 at step 2 requeues again;
    3. the last requeue finishes. One run folder, every step once, and the metrics of all three kept (the second
       requeue deleted the first one's rows)."""
    from ldm.training.callbacks import SetupCallback

    calls = slurm_job(tmp_path, monkeypatch)
    monkeypatch.delenv(main.RUN_TIMESTAMP_ENV, raising=False)
    urls = write_shards(tmp_path / "shards", 2, 4)
    cfg = _data_config(config_file, _shards_train(urls, 8), tmp_path / "slurm.yaml")
    record = tmp_path / "slurm.jsonl"
    command = ["--logdir", str(tmp_path / "logs"), "--wandb", "off", "--base", str(cfg), "-n", "job", "-t",
               "--max_steps", "5", "lightning.callbacks.image_logger.params.disabled=true",
               "lightning.trainer.log_every_n_steps=1",
               "lightning.callbacks.recorder.target=tests.training.test_scale.SignalRecorder",
               f"lightning.callbacks.recorder.params.path={record}",
               "lightning.callbacks.recorder.params.kill_at=2", f"lightning.callbacks.recorder.params.signum="
               f"{int(signal.SIGUSR1)}"]
    setup, sent = SetupCallback.setup, []

    def signal_during_setup(self, trainer, pl_module, stage):
        setup(self, trainer, pl_module, stage)
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(SetupCallback, "setup", signal_during_setup)
    swallowed = []  # without the run's handler SIGUSR1 would end pytest itself; this one only notes it
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: swallowed.append(signum))
    try:
        assert main.main(command) == 128 + signal.SIGUSR1
        assert swallowed == [] and calls.read_text().split() == ["requeue", "4242"]
        (run,) = (tmp_path / "logs").iterdir()
        ckpts = run / "checkpoints"
        assert run.name == "slurm-4242_job" and run_folder_step(ckpts / "last.ckpt") == 1
        (ckpts / "last.ckpt").rename(ckpts / "periodic-e000000-s000000001.ckpt")  # a hard kill: no last.ckpt
        assert main.main(command) == 128 + signal.SIGUSR1
        assert [p.name for p in (tmp_path / "logs").iterdir()] == ["slurm-4242_job"]
        assert run_folder_step(ckpts / "last.ckpt") == 3
        assert main.main(command) == 0
        assert signal.getsignal(signal.SIGUSR1) is not None and swallowed == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["slurm-4242_job"]
    assert [r["step"] for r in _steps(Path(f"{record}.rank0"))] == list(range(5))
    assert run_folder_step(ckpts / "last.ckpt") == 5
    import csv

    metrics = {str(p.relative_to(run)): sorted({int(row["step"]) for row in csv.DictReader(p.open())})
               for p in sorted(run.glob("csv/**/metrics.csv"))}
    # every incarnation's rows, each in a folder of its own: step 0 (the first batch), 1..2, 3..4
    assert metrics == {"csv/metrics.csv": [0], "csv/resumed-slurm-4242/metrics.csv": [1, 2],
                       "csv/resumed-slurm-4242-1/metrics.csv": [3, 4]}


def run_folder_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.mark.slow
def test_main_on_shards_without_images_stops_with_one_line(tmp_path, config_file):  # noqa: F811
    """Through main.py: caption-only shards never produced a batch and the run waited forever (SIGTERM then waited
    for that batch too); now exit status 2 with one line naming the shard, within a bounded time."""
    shard = tmp_path / "captions.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(4):
            sink.write({"__key__": f"c{i:04d}", "txt": "a caption"})
    train = _shards_train(str(shard), 4)
    train["params"]["shuffle_buffer"] = 0
    cfg = _data_config(config_file, train, tmp_path / "captions.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LDM_"))}
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--base", str(cfg), "-t", "--max_steps", "2",
                           "--logdir", str(tmp_path / "logs"), "--wandb", "off",
                           "lightning.callbacks.image_logger.params.disabled=true"], cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: WebDatasetInpainting rank 0 worker 0: no usable sample in a whole pass over 1 "
                           f"shard(s) ({shard}): 4 samples read, none decoded; members found: txt;"), last
