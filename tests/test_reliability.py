"""What the tools promise about existing files, damaged inputs, full disks, kills and collisions
(docs/reliability.md), each tested the way a user meets it: the command, the files before and after."""
from __future__ import annotations

from pathlib import Path

import pytest

from ldm.checkpoints.files import save_state_dict
from tests.conftest import make_autoencoder


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
