"""ldm.image_io: one reading rule for training, evaluation and the scripts; pairs; writes that never replace."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.inpainting import ImageNetSRValidation
from ldm.image_io import (
    InputError,
    Pair,
    find_pairs,
    read_image,
    read_pair,
    to_tensor,
    to_uint8,
    write_png,
    write_png_numbered,
)
from ldm.util import remove_stale_temporaries, write_atomically
from tests.conftest import REPO


def test_rgba_png_reads_the_same_in_training_data_and_in_inpaint_st(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[:32, :, 3] = 0  # fully transparent top half: white, as a viewer shows it
    (tmp_path / "data").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "data" / "x.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "x_mask.png")
    train = ImageNetSRValidation(root=tmp_path / "data", size=64)[0]["image"]
    script, _ = read_pair(Pair("x", tmp_path / "data" / "x.png", tmp_path / "x_mask.png"), max_size=640)
    assert torch.equal(torch.from_numpy(to_uint8(train[None])), torch.from_numpy(to_uint8(script)))
    assert torch.equal(script[0, :, :32], torch.ones(3, 32, 64))


def test_eight_bit_values_survive_the_tensor_round_trip():
    levels = np.arange(256, dtype=np.uint8)
    rgb = np.stack([levels, levels[::-1], levels], axis=-1)[None]  # (1, 256, 3)
    assert np.array_equal(to_uint8(to_tensor(rgb / 255.0))[0], rgb)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (40, 20, 3)


def test_size_limit_is_ours_and_names_the_file_and_flag(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would raise DecompressionBombError (> 2 x 1000)
    assert read_image(tmp_path / "big.png").shape == (64, 64, 3)
    with pytest.raises(InputError, match="big.png.*--max_pixels"):
        read_image(tmp_path / "big.png", max_pixels=4000)


def test_jpeg_image_with_png_mask_is_a_pair(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "a_mask.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "b.webp")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "b_mask.png")
    pairs, problems = find_pairs(tmp_path)
    assert [(p.name, p.image.name, p.mask.name) for p in pairs] == [("a", "a.jpg", "a_mask.png")]
    assert len(problems) == 2 and "two images named 'b'" in problems[0] and "b_mask.png" in problems[1]


def test_writes_never_replace_without_overwrite_and_numbers_are_claimed(tmp_path):
    array = np.zeros((4, 4, 3), np.uint8)
    write_png(array, tmp_path / "x.png")
    with pytest.raises(FileExistsError):
        write_png(array + 1, tmp_path / "x.png", overwrite=False)
    assert np.asarray(Image.open(tmp_path / "x.png")).max() == 0
    import txt2img

    for n in (99998, 99999):  # another run already wrote these; past 99999 the names grow a digit
        write_png(array, tmp_path / f"{n:05}.png")
    start = txt2img.next_index(tmp_path, r"(\d{5,})\.png")
    assert write_png_numbered(array, tmp_path, "{:05}.png".format, start).name == "100000.png"
    assert txt2img.next_index(tmp_path, r"(\d{5,})\.png") == 100001
    # a stale start (the other run wrote meanwhile) moves on instead of replacing
    assert write_png_numbered(array, tmp_path, "{:05}.png".format, 99998).name == "100001.png"
    assert not list(tmp_path.glob(".*.tmp"))


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    def killed(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "sub" / "last.ckpt", killed)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "sub" / f".last.ckpt.{dead}.abcd1234.tmp").write_text("left by a SIGKILL")
    (tmp_path / "keep.tmp").write_text("not ours")
    (tmp_path / ".last.ckpt.abcd1234.tmp").write_text("no pid: not provably ours")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [f".last.ckpt.{dead}.abcd1234.tmp"]
    assert (tmp_path / "keep.tmp").exists() and (tmp_path / ".last.ckpt.abcd1234.tmp").exists()


def test_scripts_import_no_torch_before_parsing_flags():
    code = ("import sys; import inpaint_st, txt2img; "
            "assert 'torch' not in sys.modules, 'torch imported at module level'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.slow
def test_evaluate_does_not_import_the_inpaint_script():
    code = ("import runpy, sys; sys.argv = ['evaluate.py', '--help']\n"
            "try:\n    runpy.run_path('scripts/evaluate.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'inpaint_st' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
