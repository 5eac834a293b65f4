"""main.py end to end on a temporary folder of generated images: run folder contents, kill + resume, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.project import load_yaml
from ldm.training import config as training_config
from ldm.training import trainer as trainer_setup
from ldm.training.callbacks import AtomicCheckpointIO
from ldm.util import instantiate_from_config


class Recorder(pl.Callback):
    """Appends one JSON line per training batch (step, generator lrs, image paths); sends itself SIGTERM at
    ``kill_at`` (the way a cluster scheduler stops a job); raises at ``crash_at`` (a crash: no checkpoint on the
    way out)."""

    def __init__(self, path: str, kill_at: int = -1, crash_at: int = -1):
        self.path, self.kill_at, self.crash_at = path, kill_at, crash_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        record = {"step": trainer.global_step, "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
                  "paths": [Path(p).name for p in batch["path"]]}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if trainer.global_step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {self.crash_at}")


@pytest.fixture
def image_folder(tmp_path):
    """10 RGB images of 40x40 (random smooth colours) and 2 for validation."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 2)):
        (tmp_path / split).mkdir()
        for i in range(n):
            small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
            Image.fromarray(small).resize((40, 40), Image.BILINEAR).save(tmp_path / split / f"{i}.png")
    return tmp_path


@pytest.fixture
def config_file(image_folder, tiny_ddconfig):
    dataset = {"target": "ldm.data.inpainting.ImageFolderInpainting",
               "params": {"size": 32, "no_mask_prob": 0.25, "mask_config": "configs/autoencoder/random_thick_256.yaml"}}
    config = {
        "model": {"base_learning_rate": 1e-5, "target": "ldm.models.autoencoder.AutoencoderKL",
                  "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": tiny_ddconfig,
                             "decoder_overrides": {"condition": True}, "pretrained_lr_factor": 0.1,
                             "scheduler_config": {"target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler",
                                                  "params": {"warm_up_steps": 2, "lr_start": 0.01, "lr_max": 1.0}},
                             "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                            "params": {"disc_start": 3, "perceptual_weight": 0,
                                                       "kl_weight": 1e-6}}}},
        "data": {"target": "main.DataModuleFromConfig",
                 "params": {"batch_size": 2, "num_workers": 0,
                            "train": {**dataset, "params": {**dataset["params"],
                                                            "root": str(image_folder / "train")}},
                            "validation": {**dataset, "params": {**dataset["params"], "random_crop": False,
                                                                 "fixed_masks": True,
                                                                 "root": str(image_folder / "val")}}}},
        "lightning": {"callbacks": {"image_logger": {"params": {"batch_frequency": 2, "max_images": 2}}},
                      "trainer": {"log_every_n_steps": 1, "enable_model_summary": False,
                                  "enable_progress_bar": False}},
    }
    path = image_folder / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def _run(tmp_path, monkeypatch, name, *args):
    monkeypatch.setenv(main.RUN_TIMESTAMP_ENV, f"2020-01-01T00-00-0{len(list(tmp_path.glob('logs/*')))}")
    return main.main(["--logdir", str(tmp_path / "logs"), "--wandb", "off", *args])


@pytest.mark.slow
def test_main_trains_and_writes_the_run_folder(tmp_path, config_file, monkeypatch):
    rc = _run(tmp_path, monkeypatch, "e2e", "--base", str(config_file), "-t", "-n", "e2e", "--max_steps", "6")
    assert rc == 0
    (run,) = (tmp_path / "logs").glob("*_e2e")
    assert len(list((run / "configs").glob("*-project.yaml"))) == 1
    lightning = load_yaml(next((run / "configs").glob("*-lightning.yaml")))
    assert lightning.lightning.trainer.max_steps == 6 and lightning.lightning.trainer.accelerator == "cpu"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert any(k.startswith("decoder.encoder.") for k in ckpt["state_dict"])
    best = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert best, "a monitored metric keeps its best checkpoints"
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train/rec_loss", "train/disc_loss", "lr/decoder", "lr/condition", "val/rec_loss",
                   "val/kept_mse"):
        assert column in header
    images = {p.name.split("_gs-")[0] for p in (run / "images" / "train").glob("*.png")}
    assert images == {"inputs", "masks", "masked_inputs", "reconstructions", "samples"}
    assert list((run / "images" / "val").glob("reconstructions_*.png"))
    assert not list(run.rglob("*.tmp")), "no temporary files left behind"


def test_fast_training_runs_the_device_fast_path_and_saves_ordinary_weights(tmp_path, config_file, monkeypatch):
    """--fast: the fast path's mixed precision and channels_last batches in every step; the checkpoint's weights load
    into a model built the ordinary way."""
    from ldm.fast import TRAINING_PRECISION, fast_settings
    from ldm.models.autoencoder import AutoencoderKL

    seen = []
    real_get_input = AutoencoderKL.get_input

    def get_input(self, batch, k=None):
        x, mask = real_get_input(self, batch, k)
        seen.append((x.is_contiguous(memory_format=torch.channels_last), self.decoder.conv_out.weight.dtype,
                     torch.is_autocast_enabled("cpu")))
        return x, mask

    monkeypatch.setattr(AutoencoderKL, "get_input", get_input)
    assert _run(tmp_path, monkeypatch, "fast", "--base", str(config_file), "-t", "-n", "fast", "--max_steps", "2",
                "--fast") == 0
    expected = fast_settings(torch.device("cpu"))
    (run,) = (tmp_path / "logs").glob("*_fast")
    lightning = load_yaml(next((run / "configs").glob("*-lightning.yaml")))
    assert lightning.lightning.trainer.precision == TRAINING_PRECISION[expected.dtype]
    # every batch channels_last, weights kept float32; the training steps autocast (the image logger's calls do not)
    assert seen and all(s[:2] == (True, torch.float32) for s in seen)
    assert any(s[2] for s in seen) == (expected.dtype == torch.bfloat16)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    config = load_yaml(config_file).model
    config.params.lossconfig = {"target": "torch.nn.Identity"}
    # mixed precision keeps float32 master weights, and compiled blocks would show as renamed keys (strict load)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    instantiate_from_config(config).load_state_dict({k: v for k, v in state.items() if not k.startswith("loss.")})
    with pytest.raises(ValueError, match="--fast chooses the precision"):
        _run(tmp_path, monkeypatch, "x", "--base", str(config_file), "-t", "--fast", "--precision", "32")


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_and_resume_continues_exactly(tmp_path, config_file, monkeypatch):
    common = ["--base", str(config_file), "-t", "--max_steps", "9",
              "lightning.callbacks.image_logger.params.disabled=true",
              "lightning.callbacks.recorder.target=tests.training.test_main.Recorder"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert _run(tmp_path, monkeypatch, "full", *common, "-n", "full",
                f"lightning.callbacks.recorder.params.path={full}") == 0
    rc = _run(tmp_path, monkeypatch, "part", *common, "-n", "part",
              f"lightning.callbacks.recorder.params.path={part}", "lightning.callbacks.recorder.params.kill_at=6")
    assert rc == 128 + signal.SIGTERM
    (run,) = (tmp_path / "logs").glob("*_part")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # handlers restored, pytest keeps working

    # the resumed run reads its saved configs (with the recorder, still writing part.jsonl)
    assert main.main(["--resume", str(run), "--wandb", "off", "-t", "--max_steps", "9"]) == 0
    full_lines = [json.loads(line) for line in full.read_text().splitlines()]
    part_lines = [json.loads(line) for line in part.read_text().splitlines()]
    assert [r["step"] for r in part_lines] == list(range(9))
    # same global steps, same learning rates, same images in the same order (mid-epoch: 5 batches per epoch)
    for a, b in zip(full_lines, part_lines):
        assert a["step"] == b["step"] and a["paths"] == b["paths"]
        assert a["lr"] == pytest.approx(b["lr"])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9


def test_bad_command_lines(tmp_path, config_file, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        _run(tmp_path, monkeypatch, "x", "--base", str(tmp_path / "nope.yaml"), "-t")
    with pytest.raises(ValueError, match="--frobnicate"):
        _run(tmp_path, monkeypatch, "x", "--base", str(config_file), "-t", "--frobnicate")
    with pytest.raises(FileNotFoundError, match="no such log folder"):
        _run(tmp_path, monkeypatch, "x", "--resume", str(tmp_path / "missing_run"))
    with pytest.raises(ValueError, match="cannot be given together"):
        _run(tmp_path, monkeypatch, "x", "--resume", str(tmp_path), "-n", "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="empty"):
        _run(tmp_path, monkeypatch, "x", "--base", str(config_file), "-t",
             f"data.params.train.params.root={tmp_path / 'empty'}")
    assert not list((tmp_path / "logs").glob("*/checkpoints/*.ckpt"))


def test_device_flags():
    assert trainer_setup.parse_devices(None) == ("cpu", 1, 1)
    assert trainer_setup.parse_devices("0,1") == ("gpu", [0, 1], 2)
    assert trainer_setup.parse_devices("0,") == ("gpu", [0], 1)
    assert trainer_setup.parse_devices("3") == ("gpu", 3, 3)
    opt = main.get_parser().parse_args(["--gpus", "0,1", "--num_nodes", "2", "--precision", "16"])
    kwargs, world = trainer_setup.build_trainer_kwargs(opt, OmegaConf.create({"max_epochs": 12}))
    assert world == 4 and kwargs["strategy"] == "ddp_find_unused_parameters_true"
    assert kwargs["precision"] == "16-mixed" and kwargs["devices"] == [0, 1] and kwargs["max_epochs"] == 12
    # PL 1.x config keys of the original
    opt = main.get_parser().parse_args(["--max_steps", "5"])
    kwargs, world = trainer_setup.build_trainer_kwargs(opt, OmegaConf.create({"gpus": "0,", "accelerator": "ddp",
                                                                      "max_epochs": 12}))
    assert kwargs["accelerator"] == "gpu" and kwargs["strategy"] == "ddp" and "max_epochs" not in kwargs
    assert world == 1 and kwargs["max_steps"] == 5


def test_checkpoint_io_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _kill_and_resume(tmp_path, config_file, monkeypatch, name, kill_at, steps, *extra):
    """Run ``name`` until SIGTERM at ``kill_at``, then resume it to ``steps``; -> the run folder."""
    common = ["-t", "--max_steps", str(steps), "lightning.callbacks.image_logger.params.disabled=true", *extra]
    rc = _run(tmp_path, monkeypatch, name, "--base", str(config_file), "-n", name, *common,
              "lightning.callbacks.recorder.target=tests.training.test_main.Recorder",
              f"lightning.callbacks.recorder.params.path={tmp_path / (name + '.jsonl')}",
              f"lightning.callbacks.recorder.params.kill_at={kill_at}")
    assert rc == 128 + signal.SIGTERM
    (run,) = (tmp_path / "logs").glob(f"*_{name}")
    assert main.main(["--resume", str(run), "--wandb", "off", *common]) == 0
    return run


@pytest.mark.slow
def test_resume_without_monitor_keeps_writing_last_ckpt(tmp_path, config_file, monkeypatch):
    """Killed in epoch 0 before any checkpoint, resumed: the newest state goes to last.ckpt, not last-v1.ckpt."""
    run = _kill_and_resume(tmp_path, config_file, monkeypatch, "nomon", 2, 4, "model.params.monitor=null")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert [n for n in names if not n.startswith("periodic-")] == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_last_ckpt_written_at_every_epoch_end_without_monitor(tmp_path, config_file, monkeypatch):
    """5 batches per epoch; a crash in epoch 1 (no save on the way out) still leaves epoch 0's last.ckpt."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, monkeypatch, "crash", "--base", str(config_file), "-t", "-n", "crash", "--max_steps", "9",
             "model.params.monitor=null", "lightning.callbacks.image_logger.params.disabled=true",
             "lightning.callbacks.recorder.target=tests.training.test_main.Recorder",
             f"lightning.callbacks.recorder.params.path={tmp_path / 'crash.jsonl'}",
             "lightning.callbacks.recorder.params.crash_at=7")
    (run,) = (tmp_path / "logs").glob("*_crash")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves_last_ckpt(tmp_path, config_file):
    """Slurm's scancel signals every process of the job, DataLoader workers included."""
    records = tmp_path / "group.jsonl"
    cmd = [sys.executable, "main.py", "--base", str(config_file), "-t", "-n", "group", "--max_steps", "1000",
           "--logdir", str(tmp_path / "logs"), "--wandb", "off", "data.params.num_workers=1",
           "lightning.callbacks.image_logger.params.disabled=true",
           "lightning.callbacks.recorder.target=tests.training.test_main.Recorder",
           f"lightning.callbacks.recorder.params.path={records}"]
    proc = subprocess.Popen(cmd, cwd=Path(main.__file__).parent, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (records.exists() and len(records.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # the workers ignored SIGTERM but did not outlive the run
        os.killpg(proc.pid, 0)
    (run,) = (tmp_path / "logs").glob("*_group")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] >= 1


@pytest.mark.slow
def test_resume_keeps_the_csv_metrics_from_before_the_kill(tmp_path, config_file, monkeypatch):
    run = _kill_and_resume(tmp_path, config_file, monkeypatch, "csv", 2, 4)

    def steps(path):
        return {int(row.split(",")[header.index("step")]) for row in path.read_text().splitlines()[1:]
                if row.split(",")[header.index("train/rec_loss")]}

    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    # the stopped batch (step 2) trained and is in last.ckpt; Lightning logs a batch's metrics only after
    # on_train_batch_end, where StopOnSignal leaves the loop, so StopOnSignal logs its row first: none is missing
    assert steps(run / "csv" / "metrics.csv") == {0, 1, 2}
    (resumed,) = (run / "csv").glob("resumed-*/metrics.csv")
    header = resumed.read_text().splitlines()[0].split(",")
    assert steps(resumed) == {3}


def test_config_devices_kept_without_gpus_flag():
    no_flag = main.get_parser().parse_args([])
    kwargs, world = trainer_setup.build_trainer_kwargs(no_flag, OmegaConf.create({"devices": 2}))
    assert (kwargs["accelerator"], kwargs["devices"], world) == ("cpu", 2, 2)  # two CPU processes
    assert kwargs["strategy"] == "ddp_find_unused_parameters_true"
    gpu = {"accelerator": "gpu"}
    kwargs, world = trainer_setup.build_trainer_kwargs(no_flag, OmegaConf.create({**gpu, "devices": "0,1"}))
    assert (kwargs["accelerator"], kwargs["devices"], world) == ("gpu", [0, 1], 2)
    kwargs, world = trainer_setup.build_trainer_kwargs(no_flag, OmegaConf.create({**gpu, "devices": "3"}))
    assert (kwargs["devices"], world) == (3, 3)
    flag = main.get_parser().parse_args(["--gpus", "0,"])
    kwargs, world = trainer_setup.build_trainer_kwargs(flag, OmegaConf.create({"accelerator": "cpu", "devices": 4}))
    assert (kwargs["accelerator"], kwargs["devices"], world) == ("gpu", [0], 1)  # --gpus wins
    with pytest.raises(ValueError, match="lightning.trainer.devices"):
        trainer_setup.build_trainer_kwargs(no_flag, OmegaConf.create({"devices": "two"}))


def test_clear_errors_name_the_argument(tmp_path, config_file, monkeypatch):
    with pytest.raises(ValueError, match="--gpus 'abc'"):
        trainer_setup.parse_devices("abc")
    with pytest.raises(ValueError, match="lightning.callbacks.mine"):
        _run(tmp_path, monkeypatch, "x", "--base", str(config_file), "-t", "lightning.callbacks.mine.params.x=1")


@pytest.mark.slow
def test_resume_a_checkpoint_outside_a_run_folder(tmp_path, config_file, monkeypatch):
    """A loose checkpoint and the configs given with --base: its training state continues in a new run folder."""
    assert _run(tmp_path, monkeypatch, "first", "--base", str(config_file), "-t", "-n", "first",
                "--max_steps", "2", "lightning.callbacks.image_logger.params.disabled=true") == 0
    (tmp_path / "loose").mkdir()
    loose = tmp_path / "loose" / "some.ckpt"
    loose.write_bytes(next((tmp_path / "logs").glob("*_first/checkpoints/last.ckpt")).read_bytes())
    with pytest.raises(FileNotFoundError, match="--base"):
        _run(tmp_path, monkeypatch, "x", "--resume", str(loose), "-t")
    assert _run(tmp_path, monkeypatch, "second", "--resume", str(loose), "--base", str(config_file), "-t",
                "-n", "second", "--max_steps", "3", "lightning.callbacks.image_logger.params.disabled=true") == 0
    (run,) = (tmp_path / "logs").glob("*_second")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.slow
def test_readme_resume_command_trains_and_periodic_checkpoints_are_kept(tmp_path, config_file, monkeypatch):
    """`python main.py --resume logs/<run>` as README writes it: training continues (no -t needed); 5 batches per
    epoch, a periodic checkpoint every 2 steps, the newest 2 kept; a stale temporary file of a killed write goes."""
    common = ["lightning.callbacks.image_logger.params.disabled=true", "model.params.monitor=null",
              "lightning.periodic_checkpoints.every_n_train_steps=2", "lightning.periodic_checkpoints.keep=2",
              "lightning.wandb=off"]
    assert _run(tmp_path, monkeypatch, "r", "--base", str(config_file), "-t", "-n", "r", "--max_steps", "4",
                *common) == 0
    (run,) = (tmp_path / "logs").glob("*_r")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a killed writer's pid, in the name as write_atomically puts it
    (run / "checkpoints" / f".last.ckpt.{dead}.k1ll3d00.tmp").write_bytes(b"half a checkpoint")
    cfg = next((run / "configs").glob("*-lightning.yaml"))
    OmegaConf.save(OmegaConf.merge(load_yaml(cfg), {"lightning": {"trainer": {"max_steps": 8}}}), cfg)
    assert main.main(["--resume", str(run)]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "periodic-e000001-s000000006.ckpt", "periodic-e000001-s000000008.ckpt"]


def test_resume_of_weights_only_names_ckpt_path(tmp_path, config_file, monkeypatch):
    weights = tmp_path / "larger2.ckpt"
    torch.save({"state_dict": {"decoder.conv_in.weight": torch.zeros(1)}}, weights)
    with pytest.raises(ValueError, match=r"model\.params\.ckpt_path=.*larger2\.ckpt"):
        _run(tmp_path, monkeypatch, "x", "--resume", str(weights), "--base", str(config_file))


@pytest.mark.slow
def test_accumulate_grad_batches_in_the_config_trains(tmp_path, config_file, monkeypatch):
    assert _run(tmp_path, monkeypatch, "acc", "--base", str(config_file), "-t", "-n", "acc", "--max_steps", "2",
                "lightning.trainer.accumulate_grad_batches=2",
                "lightning.callbacks.image_logger.params.disabled=true") == 0
    (run,) = (tmp_path / "logs").glob("*_acc")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_project_configs_are_found_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = training_config.load_config(["configs/tiny/autoencoder_kl_tiny.yaml"], ["model.params.embed_dim=4"])
    assert config.model.params.embed_dim == 4
    with pytest.raises(FileNotFoundError, match="--base configs/nope.yaml"):
        training_config.load_config(["configs/nope.yaml"], [])
