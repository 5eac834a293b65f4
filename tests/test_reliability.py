"""What the tools promise about existing files, damaged inputs, full disks, kills and collisions
(docs/reliability.md), each tested the way a user meets it: the command, the files before and after."""
from __future__ import annotations

import json
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
    from tests.scripts.test_evaluate import TINY, write_png

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
    from tests.models.test_ddpm import TINY_INPAINT, build, original_layout
    from tests.scripts.test_sd_scripts import DECODER, decoder_original_layout, write_png

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
from tests.training.test_main import config_file, image_folder  # noqa: E402,F401  (fixtures: a tiny run on 10 images)

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


@pytest.mark.slow
def test_resume_continues_from_the_newest_checkpoint(tmp_path, config_file, caplog):  # noqa: F811
    import main
    from tests.training.test_main import Recorder  # noqa: F401  (the callback the run names)

    records = tmp_path / "steps.jsonl"
    periodic = ["lightning.periodic_checkpoints.every_n_train_steps=2", "lightning.periodic_checkpoints.keep=2"]
    recorder = ["lightning.callbacks.recorder.target=tests.training.test_main.Recorder",
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


@pytest.mark.slow
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
    from tests.scripts.test_sd_scripts import write_png

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
    from tests.scripts.test_sd_scripts import write_png

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


# ------------------------------------------------------------------ issue 27: the output rule, by any path
def test_no_output_inside_an_input_folder_by_any_path(convert, tiny_ckpt, tmp_path, capsys):
    """``from-diffusers D D/diffusion_pytorch_model.safetensors --overwrite`` replaced the input folder's own
    weights (rc 0); now refused, through a link to D and through ``..`` too, and D is unchanged."""
    export = tmp_path / "D"
    assert convert.main(["to-diffusers", str(tiny_ckpt), str(export)]) == 0
    (tmp_path / "link").symlink_to(export)
    before = snapshot(export)
    weights = "diffusion_pytorch_model.safetensors"
    for out in (export / weights, tmp_path / "link" / weights, export / ".." / "D" / "model.safetensors",
                tmp_path / "link" / "new.ckpt"):
        assert convert.main(["from-diffusers", str(export), str(out), "--overwrite"]) == 2
        assert f"output {out} lies inside the input {export}: inputs are never replaced" in capsys.readouterr().err
        assert snapshot(export) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D", "link"]


def test_overwrite_through_a_link_to_an_export_is_refused_whole(convert, tiny_ckpt, tmp_path, capsys):
    """``to-diffusers CKPT LINK --overwrite`` with LINK -> an earlier export wrote the export, then failed on
    rmtree of the link and left ``.LINK.old-PID``; now refused before any work: link, export and folder as before."""
    export = tmp_path / "vae-v1"
    assert convert.main(["to-diffusers", str(tiny_ckpt), str(export)]) == 0
    link = tmp_path / "vae"
    link.symlink_to(export)
    before = snapshot(export)
    assert convert.main(["to-diffusers", str(tiny_ckpt), str(link), "--overwrite"]) == 2
    assert f"output {link} is a symbolic link (to {export}): a folder is not replaced through a link" in \
        capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == str(export) and snapshot(export) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae", "vae-v1"]
    # a file output through a link: the link is replaced by the new file whole, its target is left alone
    target = tmp_path / "elsewhere.ckpt"
    target.write_bytes(b"someone's file")
    (tmp_path / "out.ckpt").symlink_to(target)
    assert convert.main(["reformat", str(tiny_ckpt), str(tmp_path / "out.ckpt"), "--overwrite"]) == 0
    assert not (tmp_path / "out.ckpt").is_symlink() and target.read_bytes() == b"someone's file"
    assert not list(tmp_path.glob(".*"))


def _pairs_run(tmp_path, outdir, inpaint_one, capsys):
    import argparse

    from ldm.cli.pairs import add_pair_arguments, run_pairs
    from tests.scripts.test_sd_scripts import write_png

    indir = tmp_path / "in"
    indir.mkdir(exist_ok=True)
    for name in ("a", "b"):
        write_png(indir / f"{name}.png", (64, 64))
        write_png(indir / f"{name}_mask.png", (64, 64), "L")
    p = argparse.ArgumentParser()
    add_pair_arguments(p, outdir=str(outdir))
    opt = p.parse_args(["--indir", str(indir), "--device", "cpu"])
    rc = run_pairs(opt, lambda o: None, lambda device: inpaint_one)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_inpaint_outdir_removes_only_its_own_dead_temporaries_and_says_so(tmp_path, capsys, caplog):
    """``inpaint_st.py --outdir DIR`` deleted every ``.X.<8 chars>.tmp`` in DIR, silently, also another tool's
    write in progress; now only a temporary named with a pid whose process is gone, with a line naming it."""
    import logging
    import subprocess
    import sys

    import numpy as np

    outdir = tmp_path / "out"
    outdir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    others = [outdir / ".photo.jpg.abcd1234.tmp", outdir / f".b.png.{os.getppid()}.w0rk1ng0.tmp"]
    for p in others:
        p.write_bytes(b"another tool's write in progress")
    killed = outdir / f".a.png.{dead}.k1ll3d00.tmp"
    killed.write_bytes(b"half a png")
    with caplog.at_level(logging.WARNING, logger="ldm.cli.common"):
        rc, err = _pairs_run(tmp_path, outdir, lambda image, mask: np.zeros((1, 64, 64, 3), np.uint8), capsys)
    assert rc == 0 and "2 written" in err
    assert f"removed {killed}, left by a killed write" in caplog.text
    assert sorted(p.name for p in outdir.iterdir()) == sorted(["a.png", "b.png"] + [p.name for p in others])


def test_a_concurrent_inpaint_run_does_not_count_the_other_runs_files(tmp_path, capsys):
    """Another run writes b.png while this one computes it: this run keeps theirs and says so, not "2 written"."""
    import numpy as np

    from ldm.image_io import write_png

    outdir = tmp_path / "out"
    calls = []

    def inpaint_one(image, mask):
        calls.append(1)
        if len(calls) == 2:  # the other run finishes b.png meanwhile
            write_png(np.full((64, 64, 3), 7, np.uint8), outdir / "b.png")
        return np.zeros((1, 64, 64, 3), np.uint8)

    rc, err = _pairs_run(tmp_path, outdir, inpaint_one, capsys)
    assert rc == 0
    assert "1 written, 1 already there (1 written by another run meanwhile)" in err
    assert np.asarray(__import__("PIL.Image").Image.open(outdir / "b.png")).max() == 7


def test_to_diffusers_of_a_flux2_decoder_without_its_statistics_is_refused(convert, tmp_path, capsys):
    """A FLUX.2 decoder checkpoint without bn.* was written with scaling_factor 1.0 without a word; now refused
    before anything is written, saying what is missing and how to write a plain scale on purpose."""
    import json

    from tests.models.test_flux2 import make_flux2

    sd = {k: v for k, v in make_flux2(condition=True).state_dict().items() if not k.startswith("bn.")}
    src = save_state_dict(sd, tmp_path / "flux2_decoder.ckpt")
    assert convert.main(["to-diffusers", str(src), str(tmp_path / "vae")]) == 2
    err = capsys.readouterr().err
    assert f"{src}: FLUX.2's layout (32 latent channels with quant convs) without its latent BatchNorm statistics" \
        in err and "--scaling_factor and --shift_factor" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux2_decoder.ckpt"]
    assert convert.main(["to-diffusers", str(src), str(tmp_path / "vae"), "--scaling_factor", "0.5",
                         "--shift_factor", "0.1"]) == 0  # said on purpose
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (0.5, 0.1)


# ------------------------------------------------------------------ issue 27: run folders are never ruined
def _trained_run(tmp_path, config: Path, name: str, steps: int = 2) -> Path:
    assert train(tmp_path, "--base", str(config), "-t", "-n", name, "--max_steps", str(steps), *QUIET,
                 "lightning.trainer.log_every_n_steps=1") == 0
    (run,) = (tmp_path / "logs").glob(f"*_{name}")
    return run


@pytest.mark.slow
def test_a_failed_resume_with_another_architecture_leaves_the_run_as_it_was(tmp_path, config_file,  # noqa: F811
                                                                            capsys):
    """``--resume RUN --base <another architecture>`` saved that config into RUN/configs before failing with a
    124-line traceback, and every later plain ``--resume RUN`` failed too; now one line, RUN unchanged, and the
    plain resume continues."""
    from omegaconf import OmegaConf

    import main

    run = _trained_run(tmp_path, config_file, "arch")
    other = OmegaConf.load(config_file)
    other.model.params.ddconfig.ch = 64
    OmegaConf.save(other, tmp_path / "other.yaml")
    before = snapshot(run)
    assert main.cli(["--resume", str(run), "--base", str(tmp_path / "other.yaml"), "--wandb", "off", *QUIET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --resume {run / 'checkpoints' / 'last.ckpt'}: its weights "
                                               "do not fit the model of the configs") and "size mismatch" in err[0]
    assert snapshot(run) == before
    assert train(tmp_path, "--resume", str(run), "--max_steps", "3", *QUIET) == 0
    assert run_folder.checkpoint_step(run / "checkpoints" / "last.ckpt") == 3


@pytest.mark.slow
def test_one_training_at_a_time_in_a_run_folder(tmp_path, config_file, capsys, caplog):  # noqa: F811
    """Two ``--resume RUN`` at once both trained into RUN; now the second is refused while the first's process
    lives (its pid and host in RUN/training.lock), and a lock whose holder is gone is taken over, saying so."""
    import socket
    import subprocess
    import sys

    import main

    run = _trained_run(tmp_path, config_file, "lock")
    assert not (run / "training.lock").exists()  # released at the end
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (run / "training.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                        "slurm_job": None}))
        before = snapshot(run)
        assert main.cli(["--resume", str(run), "--max_steps", "3", "--wandb", "off", *QUIET]) == 2
        err = capsys.readouterr().err
        assert f"error: {run} is in use: another training holds {run / 'training.lock'} (pid {holder.pid} on host " \
               f"{socket.gethostname()})" in err
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with caplog.at_level("WARNING"):
        assert train(tmp_path, "--resume", str(run), "--max_steps", "3", *QUIET) == 0
    assert f"taking over {run / 'training.lock'}: its holder (pid {holder.pid} on host {socket.gethostname()}) is " \
           "no longer running" in caplog.text
    assert run_folder.checkpoint_step(run / "checkpoints" / "last.ckpt") == 3
    assert not (run / "training.lock").exists()


@pytest.mark.slow
def test_full_disk_while_writing_metrics_is_one_line_and_keeps_what_was_there(tmp_path, config_file,  # noqa: F811
                                                                              monkeypatch, caplog):
    """The disk fills while csv/metrics.csv is written: raw tracebacks, no last.ckpt and a 0-byte metrics.csv
    before; now one line naming the file, last.ckpt and the earlier metrics as they were, no file half-written."""
    import csv
    import errno

    run = _trained_run(tmp_path, config_file, "disk")
    before = {name: (run / name).read_bytes() for name in ("csv/metrics.csv", "checkpoints/last.ckpt")}
    writerows = csv.DictWriter.writerows
    saves = []

    def filling_disk(self, rows):
        saves.append(1)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return writerows(self, rows)

    monkeypatch.setattr(csv.DictWriter, "writerows", filling_disk)
    with caplog.at_level("ERROR", logger="main"):
        assert train(tmp_path, "--resume", str(run), "--max_steps", "5", *QUIET,
                     "lightning.trainer.log_every_n_steps=1") == 1
    (resumed,) = (run / "csv").glob("resumed-*/metrics.csv")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"{resumed}: could not be written (the disk is full); nothing was left half-written (the "
                      "previous file is unchanged)"]
    assert {name: (run / name).read_bytes() for name in before} == before
    monkeypatch.setattr(csv.DictWriter, "writerows", writerows)
    rows = list(csv.DictReader(resumed.open()))
    assert [int(r["step"]) for r in rows] == [2]  # the one save that went through, whole
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow
def test_every_resume_appends_its_own_metrics(tmp_path, config_file):  # noqa: F811
    """Each resume writes a csv folder of its own; none replaces an earlier one's rows (a requeued Slurm job resumes
    with the same timestamp every time: ``-1``, ``-2`` are added)."""
    from ldm.training.trainer import csv_version

    run = _trained_run(tmp_path, config_file, "csv")
    assert csv_version(run, "slurm-7") == os.path.join("csv", "resumed-slurm-7")
    (run / "csv" / "resumed-slurm-7").mkdir()
    assert csv_version(run, "slurm-7") == os.path.join("csv", "resumed-slurm-7-1")


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("lightning.periodic_checkpoints.evry=3", "lightning.periodic_checkpoints: unknown keys ['evry']"),
    ("lightning.wandb=maybe", "lightning.wandb must be off, offline or online, got 'maybe'"),
    ("lightning.callbacks.extra=3", "lightning.callbacks.extra: needs a target")])
def test_a_late_config_error_leaves_no_empty_run_folder(tmp_path, config_file, capsys, override,  # noqa: F811
                                                        message):
    """Errors found while the Trainer is built (after the run folder was claimed) left an empty folder behind."""
    import main

    rc = main.cli(["--logdir", str(tmp_path / "logs"), "--base", str(config_file), "-t", "--max_steps", "1", *QUIET,
                   override])
    assert rc == 2 and message in capsys.readouterr().err
    assert list((tmp_path / "logs").iterdir()) == []


def test_the_decoder_refuses_a_non_finite_image_naming_it(tiny_autoencoder):
    """One NaN or inf pixel, even under the mask, made every output pixel NaN without a word ((1 - mask) * image
    keeps 0 * NaN); now the decoder's own argument check names the image."""
    from ldm.image_io import NonFiniteError

    model = tiny_autoencoder
    f = model.downsample_factor
    z = torch.zeros(1, model.embed_dim, 32 // f, 32 // f)
    image = torch.zeros(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16, :] = 1
    for bad in (float("nan"), float("inf")):
        image[0, 0, 3, 3] = bad  # under the mask: a pixel to be generated
        with pytest.raises(NonFiniteError, match=r"^image: 1 of 3072 values are NaN or infinite"):
            model.decode(z, image, mask)
    image[0, 0, 3, 3] = 0
    with torch.no_grad():
        assert torch.isfinite(model.decode(z, image, mask)).all()
