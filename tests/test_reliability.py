"""What the tools promise about existing files, damaged inputs, full disks, kills and collisions
(docs/reliability.md), each tested the way a user meets it: the command, the files before and after."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ldm.checkpoints.files import save_state_dict
from ldm.project import load_yaml
from tests.conftest import REPO, make_autoencoder


@pytest.fixture(scope="module")
def convert():
    from scripts import convert_checkpoint

    return convert_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save_state_dict(make_autoencoder().state_dict(), path)
    return path


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. data loss: what --overwrite may replace
def test_overwrite_never_replaces_a_folder_of_the_users_files(convert, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg bytes")
    (out / "notes.txt").write_text("do not lose")
    before = snapshot(out)
    assert convert.main(["to-diffusers", str(tiny_ckpt), str(out), "--overwrite"]) == 2
    assert "holds files this tool did not write (holiday.jpg, notes.txt)" in capsys.readouterr().err
    assert snapshot(out) == before


def test_overwrite_never_replaces_a_folder_holding_the_input(convert, tiny_ckpt, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    ckpt = here / "model.ckpt"
    ckpt.write_bytes(tiny_ckpt.read_bytes())
    monkeypatch.chdir(here)
    for out in (".", "../here", str(here)):
        assert convert.main(["to-diffusers", "model.ckpt", out, "--overwrite"]) == 2
        assert "contains the input model.ckpt" in capsys.readouterr().err
        assert ckpt.read_bytes() == tiny_ckpt.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_overwrite_replaces_an_earlier_export(convert, tiny_ckpt, tmp_path):
    out = tmp_path / "vae"
    assert convert.main(["to-diffusers", str(tiny_ckpt), str(out)]) == 0
    first = snapshot(out)
    assert convert.main(["to-diffusers", str(tiny_ckpt), str(out)]) == 2  # kept without --overwrite
    assert convert.main(["to-diffusers", str(tiny_ckpt), str(out), "--overwrite"]) == 0
    assert snapshot(out).keys() == first.keys() == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_reformat_overwrite_onto_a_folder_is_a_clear_error(convert, tiny_ckpt, tmp_path, capsys):
    (tmp_path / "out.safetensors").mkdir()
    assert convert.main(["reformat", str(tiny_ckpt), str(tmp_path / "out.safetensors"), "--overwrite"]) == 2
    assert "out.safetensors is a folder" in capsys.readouterr().err
    assert list((tmp_path / "out.safetensors").iterdir()) == []


# ------------------------------------------------------------------ 2. silent wrong results
def damage_one_tensor(src: Path, dst: Path, n: int = 4096) -> None:
    """Copy ``src`` with ``n`` bytes of its largest tensor overwritten in place (the zip's CRC no longer fits)."""
    import struct
    import zipfile

    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    assert info.file_size >= n
    data[start: start + n] = bytes(255 - b for b in data[start: start + n])
    dst.write_bytes(bytes(data))


def test_a_damaged_ckpt_is_refused_naming_the_file(convert, tiny_ckpt, tmp_path, capsys):
    damaged = tmp_path / "damaged.ckpt"
    damage_one_tensor(tiny_ckpt, damaged)
    assert convert.main(["reformat", str(damaged), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{damaged}: damaged checkpoint (Bad CRC-32 for file" in err and "copy it again" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.ckpt"]


def nan_decoder(path: Path, **overrides) -> Path:
    sd = make_autoencoder(**overrides).state_dict()
    sd["decoder.conv_out.bias"][0] = float("nan")
    return save_state_dict(sd, path)


def test_evaluate_writes_no_report_from_nan_outputs(tmp_path, capsys):
    from scripts import evaluate
    from tests.test_evaluate import TINY, write_png

    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", (32, 32))
    ckpt = nan_decoder(tmp_path / "nan.ckpt", num_res_blocks=2)
    out = tmp_path / "report"
    rc = evaluate.main(["reconstruction", "--images", str(images), "--size", "32", "--outdir", str(out),
                        "--decoder", f"asym={TINY}:{ckpt}", "--no_lpips", "--no_fid", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--decoder asym ({ckpt}) on a: the decoded images: 1024 of 3072 values are NaN or infinite" in err
    assert not out.exists() or not list(out.iterdir())


def test_inpaint_st_writes_no_black_images_from_nan_outputs(tmp_path, capsys):
    import inpaint_st
    from tests.test_ddpm import TINY_INPAINT, build, original_layout
    from tests.test_sd_scripts import DECODER, decoder_original_layout, write_png

    sd = save_state_dict(original_layout(build(TINY_INPAINT)), tmp_path / "sd-inpaint.ckpt")
    decoder = decoder_original_layout()
    decoder["decoder.conv_out.bias"][0] = float("nan")
    ckpt = save_state_dict(decoder, tmp_path / "nan.ckpt")
    indir, out = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    write_png(indir / "a.png", (64, 64))
    write_png(indir / "a_mask.png", (64, 64), "L")
    rc = inpaint_st.main(["--indir", str(indir), "--outdir", str(out), "--config", str(DECODER), "--ckpt", str(ckpt),
                          "--config_d", str(TINY_INPAINT), "--ckpt_d", str(sd), "--steps", "1", "--device", "cpu"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"error: {indir / 'a.png'} with --ckpt_d {sd}, --ckpt {ckpt}: the image: " in err
    assert "values are NaN or infinite" in err and "stopped" in err
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ 3.-7. main.py: configs, run folders, resume
from ldm.training import config as training_config  # noqa: E402
from ldm.training import run_folder  # noqa: E402
from tests.test_main import config_file, image_folder  # noqa: E402,F401  (fixtures: a tiny run on 10 images)

QUIET = ["lightning.callbacks.image_logger.params.disabled=true", "model.params.monitor=null"]


def train(tmp_path, *args):
    import main

    return main.main(["--logdir", str(tmp_path / "logs"), "--wandb", "off", *args])


def test_misspelt_config_keys_are_errors_naming_the_closest_key(tmp_path, config_file):  # noqa: F811
    with pytest.raises(ValueError, match=r"lightning\.trainr \(did you mean 'trainer'\?\)"):
        train(tmp_path, "--base", str(config_file), "-t", "lightning.trainr.max_steps=3")
    with pytest.raises(ValueError, match=r"model\.base_learning_rat \(did you mean 'base_learning_rate'\?\)"):
        train(tmp_path, "--base", str(config_file), "-t", "model.base_learning_rat=5.0")
    with pytest.raises(ValueError, match=r"lightning\.trainer\.max_step \(did you mean 'max_steps'\?\)"):
        train(tmp_path, "--base", str(config_file), "-t", "lightning.trainer.max_step=3")
    assert not (tmp_path / "logs").exists()


def test_every_project_training_config_passes_the_key_check():
    import glob



    configs = [f for f in glob.glob(str(REPO / "configs/**/*.yaml"), recursive=True)
               if "lightning" in load_yaml(f)]
    assert configs
    for f in configs:
        training_config.check_config_keys(load_yaml(f))


def test_missing_inputs_are_named_all_at_once_before_anything_is_built(tmp_path, config_file):  # noqa: F811
    with pytest.raises(FileNotFoundError) as err:
        train(tmp_path, "--base", str(config_file), "-t", f"model.params.ckpt_path={tmp_path / 'sd_vae.ckpt'}",
              f"data.params.train.params.root={tmp_path / 'imagenet'}",
              "model.params.lossconfig.params.perceptual_weight=1.0",
              f"model.params.lossconfig.params.vgg_path={tmp_path / 'vgg16.pth'}")
    for name in ("sd_vae.ckpt", "imagenet", "vgg16.pth"):
        assert str(tmp_path / name) in str(err.value)
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_without_cuda_names_the_flag(tmp_path, config_file):  # noqa: F811
    with pytest.raises(ValueError, match=r"--gpus 0,: this machine has no CUDA GPU"):
        train(tmp_path, "--base", str(config_file), "-t", "--gpus", "0,")
    assert not (tmp_path / "logs").exists()


def test_weights_only_resume_is_one_line(tmp_path, config_file, capsys):  # noqa: F811
    import main

    weights = save_state_dict(make_autoencoder().state_dict(), tmp_path / "larger2.ckpt")
    assert main.cli(["--resume", str(weights), "--base", str(config_file), "--logdir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume {weights}: holds weights without") and "\n" not in err
    assert f"model.params.ckpt_path={weights}" in err


def test_same_name_in_the_same_second_gets_its_own_folder(tmp_path, config_file, monkeypatch):  # noqa: F811
    import main

    taken = tmp_path / "logs" / "2020-01-01T00-00-00_twin"
    (taken / "csv").mkdir(parents=True)
    (taken / "csv" / "metrics.csv").write_text("the other run's rows\n")
    monkeypatch.setenv(main.RUN_TIMESTAMP_ENV, "2020-01-01T00-00-00")
    monkeypatch.delenv(main.RUN_FOLDER_ENV, raising=False)
    assert train(tmp_path, "--base", str(config_file), "-t", "-n", "twin", "--max_steps", "1", *QUIET) == 0
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["2020-01-01T00-00-00-1_twin",
                                                                       "2020-01-01T00-00-00_twin"]
    assert snapshot(taken) == {"csv/metrics.csv": b"the other run's rows\n"}
    assert (tmp_path / "logs" / "2020-01-01T00-00-00-1_twin" / "checkpoints" / "last.ckpt").is_file()
    assert main.RUN_FOLDER_ENV not in os.environ  # nothing left for the next main() or its children
    assert run_folder.claim_run_folder(taken, "2020-01-01T00-00-00")[0].name == "2020-01-01T00-00-00-2_twin"


def test_resume_continues_from_the_newest_checkpoint(tmp_path, config_file, caplog):  # noqa: F811
    import main
    from tests.test_main import Recorder  # noqa: F401  (the callback the run names)

    records = tmp_path / "steps.jsonl"
    periodic = ["lightning.periodic_checkpoints.every_n_train_steps=2", "lightning.periodic_checkpoints.keep=2"]
    recorder = ["lightning.callbacks.recorder.target=tests.test_main.Recorder",
                f"lightning.callbacks.recorder.params.path={records}"]
    with pytest.raises(RuntimeError, match="simulated crash"):  # killed hard at step 9: no save on the way out
        train(tmp_path, "--base", str(config_file), "-t", "-n", "oom", "--max_steps", "10", *QUIET, *periodic,
              *recorder, "lightning.callbacks.recorder.params.crash_at=9")
    (run,) = (tmp_path / "logs").glob("*_oom")
    ckpts = run / "checkpoints"
    assert {p.name: run_folder.checkpoint_step(p) for p in ckpts.iterdir()} == {
        "last.ckpt": 5, "periodic-e000001-s000000006.ckpt": 6, "periodic-e000001-s000000008.ckpt": 8}
    with pytest.raises(ValueError, match="newer checkpoints .periodic-e000001-s000000008.ckpt at global step 8"):
        train(tmp_path, "--resume", str(ckpts / "last.ckpt"))
    records.write_text("")
    with caplog.at_level("INFO", logger="main"):
        assert main.main(["--resume", str(run), "--wandb", "off", *recorder,
                          "lightning.callbacks.recorder.params.crash_at=-1"]) == 0
    assert "continuing from periodic-e000001-s000000008.ckpt, global step 8" in caplog.text
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in records.read_text().splitlines()]
    assert steps == [8, 9]  # not 5, 6, 7, ... again
    assert {p.name: run_folder.checkpoint_step(p) for p in ckpts.iterdir()} == {
        "last.ckpt": 10, "periodic-e000001-s000000008.ckpt": 8, "periodic-e000001-s000000010.ckpt": 10}


def test_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, config_file, monkeypatch, caplog):  # noqa: F811
    import errno

    save = torch.save

    def filling_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step", 0) >= 6:
            Path(f).write_bytes(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_disk)
    with caplog.at_level("ERROR", logger="main"):
        assert train(tmp_path, "--base", str(config_file), "-t", "-n", "full", "--max_steps", "6", *QUIET) == 1
    (run,) = (tmp_path / "logs").glob("*_full")
    assert "last.ckpt: could not be written (the disk is full); nothing was left half-written (the previous " \
           "file is unchanged)" in caplog.text
    monkeypatch.undo()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert not list(run.rglob("*.tmp"))


def test_full_disk_while_converting_is_one_line(convert, tiny_ckpt, tmp_path, monkeypatch, capsys):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert convert.main(["to-diffusers", str(tiny_ckpt), str(tmp_path / "vae")]) == 2
    assert convert.main(["reformat", str(tiny_ckpt), str(tmp_path / "vae.safetensors")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {tmp_path / name}: could not be written (the disk is full); nothing was left "
                     "half-written (no file was created)" for name in ("vae", "vae.safetensors")]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 5.-6. litter, read-only folders, link loops
def test_a_killed_writes_temporary_file_goes_on_the_next_run(convert, tiny_ckpt, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.safetensors.{dead}.k1ll3d00.tmp"  # as ldm.util.write_atomically names them
    stale.write_bytes(b"half a file")
    writing = tmp_path / f".other.png.{os.getppid()}.w0rk1ng0.tmp"  # a live process's write in progress
    writing.write_bytes(b"being written")
    assert convert.main(["reformat", str(tiny_ckpt), str(tmp_path / "out.safetensors")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.safetensors", writing.name])


def test_a_read_only_outdir_is_found_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import argparse
    import errno
    import tempfile

    from ldm.cli.pairs import add_pair_arguments, run_pairs
    from tests.test_sd_scripts import write_png

    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    outdir.mkdir()
    write_png(indir / "a.png", (64, 64))
    write_png(indir / "a_mask.png", (64, 64), "L")
    mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # outdir on a read-only mount (a chmod does not stop root)
        if dir is not None and Path(dir).resolve() == outdir.resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    p = argparse.ArgumentParser()
    add_pair_arguments(p, outdir=str(outdir))
    opt = p.parse_args(["--indir", str(indir), "--device", "cpu"])
    loaded = []
    assert run_pairs(opt, lambda o: None, lambda device: loaded.append(device)) == 2
    assert loaded == []
    assert f"--outdir {outdir}: cannot write there: Read-only file system" in capsys.readouterr().err


def test_a_link_loop_in_a_data_folder_counts_each_image_once(tmp_path):
    from ldm.data.inpainting import find_images
    from tests.test_sd_scripts import write_png

    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    write_png(root / "a.png", (8, 8))
    write_png(root / "cats" / "b.png", (8, 8))
    (root / "cats" / "loop").symlink_to(root, target_is_directory=True)
    (root / "up").symlink_to(tmp_path, target_is_directory=True)
    (root / "again").symlink_to(root / "cats", target_is_directory=True)
    write_png(tmp_path / "outside.png", (8, 8))
    found = find_images(root)
    assert sorted(os.path.realpath(p) for p in found) == [str((root / "a.png").resolve()),
                                                          str((root / "cats" / "b.png").resolve())]
