"""Masks (ldm/data/masks.py) and image-folder datasets (ldm/data/inpainting.py) on generated files, CPU, seconds."""
from __future__ import annotations

import logging
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from ldm.data.inpainting import ImageFolderInpainting, ImageNetSRTrain, ImageNetSRValidation
from ldm.data.masks import DEFAULT_MASK_CONFIG, MaskGenerator
from ldm.image_io import InputError as UnreadableImageError
from ldm.image_io import read_image as load_image
from ldm.project import load_yaml

P_BOX = 0.3 / 1.3


@pytest.fixture(scope="module")
def generator() -> MaskGenerator:
    return MaskGenerator.from_config(DEFAULT_MASK_CONFIG)


def lama_reference(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """random_thick_256 written out literally from LaMa's formulas at full ramp (SPEC section 3), no scaling."""
    mask = np.zeros((height, width), np.float32)
    if rng.choice(2, p=[1 / 1.3, 0.3 / 1.3]) == 0:
        for stroke in range(rng.integers(1, 5 + 2)):  # LaMa: randint(min_times, (max_times + 1) + 1)
            x, y = rng.integers(width), rng.integers(height)
            for _ in range(1 + rng.integers(5)):
                angle = 0.01 + rng.integers(4)
                if stroke % 2 == 0:
                    angle = 2 * np.pi - angle
                length = 10 + rng.integers(200)
                brush = 5 + rng.integers(100)
                end_x = int(np.clip(np.int32(x + length * np.sin(angle)), 0, width))
                end_y = int(np.clip(np.int32(y + length * np.cos(angle)), 0, height))
                cv2.line(mask, (int(x), int(y)), (end_x, end_y), 1.0, int(brush))
                x, y = end_x, end_y
    else:
        high = min(150 + 1, height - 20, width - 20)  # LaMa: randint(bbox_min, bbox_max + 1) shrunk to fit
        for _ in range(rng.integers(1, 3 + 1)):
            box_w, box_h = rng.integers(30, high), rng.integers(30, high)
            x = rng.integers(10, width - 10 - box_w + 1)
            y = rng.integers(10, height - 10 - box_h + 1)
            mask[y:y + box_h, x:x + box_w] = 1
    return mask


# ---------------------------------------------------------------------------------------------------------- masks
def test_masks_equal_lama_formulas_at_reference_size(generator):
    for seed in range(60):
        for height, width in ((256, 256), (256, 320)):
            ours = generator(height, width, np.random.default_rng(seed))
            ref = lama_reference(height, width, np.random.default_rng(seed))
            np.testing.assert_array_equal(ours, ref, err_msg=f"seed {seed}, {height}x{width}")


def test_mask_statistics_at_256(generator):
    rng = np.random.default_rng(123)
    kinds, fractions = [], {"irregular": [], "box": []}
    for _ in range(200):
        mask, kind = generator.generate(256, 256, rng)
        assert mask.shape == (256, 256) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        kinds.append(kind)
        fractions[kind].append(mask.mean())
        if kind == "box":  # 1-3 boxes of side 30..150 inside a 10 px margin
            assert not mask[:10].any() and not mask[-10:].any() and not mask[:, :10].any() and not mask[:, -10:].any()
            assert 30 * 30 / 256 ** 2 <= mask.mean() <= 3 * 150 * 150 / 256 ** 2
            rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
            assert rows[-1] - rows[0] + 1 >= 30 and cols[-1] - cols[0] + 1 >= 30
    n_box = kinds.count("box")
    assert abs(n_box / 200 - P_BOX) < 0.1, n_box  # 3.3 sigma of a binomial(200, 0.23)
    assert n_box > 0 and kinds.count("irregular") > 0
    # every mask generates something (min_times 1, brush >= 5 px) and none covers everything
    assert min(fractions["irregular"]) > 0.002 and max(fractions["irregular"]) < 1.0
    # thick strokes: widths 5..104 px over 1-6 strokes cover a large share on average
    assert 0.2 < np.mean(fractions["irregular"]) < 0.7


def test_masks_seeded(generator):
    a = [generator(64, 64, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    b = [generator(64, 64, np.random.default_rng(s)) for s in range(8, 14)]
    assert not any(np.array_equal(a[0], m) for m in b)
    rng = np.random.default_rng(7)
    assert not np.array_equal(generator(64, 64, rng), generator(64, 64, rng))  # a stream moves on


def test_masks_scale_with_resolution(generator):
    def mean_fraction(height, width, n=150):
        rng = np.random.default_rng(0)
        return np.mean([generator(height, width, rng).mean() for _ in range(n)])

    at_256 = mean_fraction(256, 256)
    for height, width in ((64, 64), (512, 512)):
        assert abs(mean_fraction(height, width) - at_256) < 0.08, (height, width)
    # sizes scale with the short side: 96x160 looks like 256x427
    assert abs(mean_fraction(96, 160) - mean_fraction(256, 427)) < 0.08
    # LaMa's absolute pixel sizes at 512 (what reference_size: 512 means) cover far less
    absolute = MaskGenerator.from_config({**_kwargs(), "reference_size": 512})
    rng = np.random.default_rng(0)
    assert np.mean([absolute(512, 512, rng).mean() for _ in range(150)]) < at_256 - 0.1
    for side in (1, 7, 16):  # tiny sizes draw valid masks instead of failing on the box bounds
        mask = generator(side, side + 3, np.random.default_rng(side))
        assert mask.shape == (side, side + 3) and set(np.unique(mask)) <= {0.0, 1.0}


def _kwargs() -> dict:
    """The ``mask_generator_kwargs`` of the shipped yaml."""
    from omegaconf import OmegaConf

    from ldm.data.masks import resolve_config_path
    config = OmegaConf.to_container(load_yaml(resolve_config_path(DEFAULT_MASK_CONFIG)))
    return dict(config["mask_generator_kwargs"])


def test_mask_config_forms_and_errors(tmp_path, monkeypatch, generator):
    monkeypatch.chdir(tmp_path)  # the repo-relative default still resolves
    from_dict = MaskGenerator.from_config(_kwargs())
    assert from_dict.irregular_kwargs == generator.irregular_kwargs == dict(
        max_angle=4, max_len=200, max_width=100, min_times=1, max_times=5)
    assert generator.box_kwargs == dict(margin=10, bbox_min_size=30, bbox_max_size=150, min_times=1, max_times=3)
    np.testing.assert_allclose(generator.probs, [1 / 1.3, 0.3 / 1.3])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        MaskGenerator.from_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mask_generator_kwargs:\n  irregular_kwargs: {max_lenght: 3}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*max_lenght"):
        MaskGenerator.from_config(bad)
    with pytest.raises(ValueError, match="segm_proba"):
        MaskGenerator.from_config({**_kwargs(), "segm_proba": 0.5})
    with pytest.raises(ValueError, match="bbox_min_size"):
        MaskGenerator(box_kwargs={"bbox_min_size": 200, "bbox_max_size": 100})


# ------------------------------------------------------------------------------------------------------- datasets
def _save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kw).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """ImageNet-like layout: root/<class>/*.JPEG|png, plus a hidden file that must be ignored."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for i in range(6):
        _save(root / f"n0{i % 2}" / f"img{i}.JPEG", rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8))
    _save(root / "n01" / "flat.png", np.full((50, 40, 3), 77, np.uint8))
    (root / ".hidden.png").write_bytes(b"not an image")
    return root


def test_sample_format_and_scan(folder):
    ds = ImageFolderInpainting(root=folder, size=32, seed=1)
    assert len(ds) == 7 and ds.paths == sorted(ds.paths)
    for i in range(len(ds)):
        sample = ds[i]
        assert set(sample) == {"image", "mask", "path"}
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert sample["mask"].shape == (1, 32, 32) and sample["mask"].dtype == torch.float32
        assert -1 <= sample["image"].min() and sample["image"].max() <= 1
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
        assert sample["path"] == ds.paths[i]
    flat = ds[ds.paths.index(str(folder / "n01" / "flat.png"))]["image"]
    torch.testing.assert_close(flat, torch.full_like(flat, 77 / 127.5 - 1))


def test_modes_and_bit_depths(tmp_path):
    root = tmp_path / "modes"
    _save(root / "grey.png", np.full((32, 32), 100, np.uint8))
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[...] = (200, 0, 40, 128)
    _save(root / "rgba.png", rgba)
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    pal.save(root / "pal.png")
    _save(root / "deep.png", np.full((32, 32), 40000, np.uint16))  # 16-bit grey: 40000/65535, not clipped to 1
    rgb16 = np.zeros((32, 32, 3), np.uint16)
    rgb16[...] = (65535, 32768, 0)
    cv2.imwrite(str(root / "rgb16.png"), rgb16[..., ::-1])  # Pillow keeps its high byte
    a = 128 / 255
    expected = {"grey.png": [100 / 255] * 3, "rgba.png": [200 / 255 * a + 1 - a, 1 - a, 40 / 255 * a + 1 - a],
                "pal.png": [10 / 255, 20 / 255, 30 / 255], "deep.png": [40000 / 65535] * 3,
                "rgb16.png": [1.0, 128 / 255, 0.0]}
    ds = ImageFolderInpainting(root=root, size=32, random_crop=False, no_mask_prob=1.0)
    assert len(ds) == len(expected)
    for i, path in enumerate(ds.paths):
        want = torch.tensor(expected[path.split("/")[-1]]) * 2 - 1
        got = ds[i]["image"]
        torch.testing.assert_close(got, want[:, None, None].expand_as(got), atol=1e-5, rtol=0, msg=path)
        assert load_image(path).shape == (32, 32, 3)


def test_centre_crop_and_random_crop_sides(tmp_path):
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, 32:] = 255  # left half black, right half white
    path = _save(tmp_path / "wide" / "x.png", img)
    centre = ImageFolderInpainting(root=path.parent, size=32, random_crop=False)[0]["image"]
    assert (centre[:, :, :16] == -1).all() and (centre[:, :, 16:] == 1).all()  # columns 16..47 of the image
    ds = ImageFolderInpainting(root=path.parent, size=32, min_crop_frac=0.5)
    rng = np.random.default_rng(0)
    boxes = [ds.transform.crop_box(100, 80, rng) for _ in range(300)]
    sides = [x1 - x0 for x0, y0, x1, y1 in boxes]
    assert all(x1 - x0 == y1 - y0 for x0, y0, x1, y1 in boxes)
    assert 40 <= min(sides) < 45 and 75 < max(sides) <= 80
    assert all(x0 >= 0 and y0 >= 0 and x1 <= 100 and y1 <= 80 for x0, y0, x1, y1 in boxes)


def test_bad_files_skipped_and_tiny_images_upscaled(tmp_path, caplog):
    root = tmp_path / "mixed"
    _save(root / "a.png", np.full((40, 40, 3), 10, np.uint8))
    (root / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = _save(tmp_path / "full.jpg", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (root / "c_truncated.jpg").write_bytes(good.read_bytes()[:300])
    _save(root / "d_tiny.png", np.full((3, 5, 3), 200, np.uint8))
    ds = ImageFolderInpainting(root=root, size=32)
    with caplog.at_level(logging.WARNING, logger="ldm.data.inpainting"):
        corrupt, truncated, tiny = ds[1], ds[2], ds[3]
        ds[3]
    assert corrupt["path"].endswith("d_tiny.png") and truncated["path"].endswith("d_tiny.png")
    text = caplog.text
    assert "b_corrupt.png" in text and "c_truncated.jpg" in text
    assert text.count("d_tiny.png is 5x3") == 1  # once per file
    torch.testing.assert_close(tiny["image"], torch.full((3, 32, 32), 200 / 127.5 - 1))
    with pytest.raises(UnreadableImageError, match="b_corrupt.png"):
        load_image(root / "b_corrupt.png")
    all_bad = tmp_path / "all_bad"
    all_bad.mkdir()
    (all_bad / "x.png").write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="unreadable"):
        ImageFolderInpainting(root=all_bad, size=32)[0]


def test_errors_before_training(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images.*empty"):
        ImageFolderInpainting(root=empty)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ImageNetSRTrain(root=tmp_path / "missing_dir")
    with pytest.raises(ValueError, match="root"):
        ImageFolderInpainting()
    listing = tmp_path / "list.txt"
    listing.write_text("# subset\nn0/gone.JPEG\n")
    with pytest.raises(FileNotFoundError, match="gone.JPEG"):
        ImageFolderInpainting(file_list=listing)
    with pytest.raises(FileNotFoundError, match="mask_config"):
        _save(tmp_path / "one" / "a.png", np.zeros((8, 8, 3), np.uint8))
        ImageFolderInpainting(root=tmp_path / "one", mask_config="nowhere.yaml")
    for bad in (dict(size=0), dict(no_mask_prob=1.5), dict(min_crop_frac=0.0), dict(seed=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ImageFolderInpainting(root=tmp_path / "one", **bad)


def test_file_list(folder, tmp_path):
    listing = tmp_path / "subset.txt"
    listing.write_text("n01/img5.JPEG\n\n# comment\nn00/img0.JPEG\n")
    ds = ImageFolderInpainting(root=folder, file_list=listing, size=16)
    assert ds.paths == [str(folder / "n01" / "img5.JPEG"), str(folder / "n00" / "img0.JPEG")]
    assert ds[1]["path"].endswith("img0.JPEG")


def test_no_mask_prob_rate(tmp_path):
    path = _save(tmp_path / "one" / "a.png", np.zeros((16, 16, 3), np.uint8))
    ds = ImageFolderInpainting(root=path.parent, size=32, no_mask_prob=0.3, fixed_masks=True)
    ds.paths = ds.paths * 400  # same image, 400 independent draws
    full = [bool(ds[i]["mask"].min() == 1) for i in range(len(ds))]
    assert abs(np.mean(full) - 0.3) < 0.08  # 3.5 sigma of a binomial(400, 0.3)
    never = ImageNetSRTrain(root=path.parent, size=32, Cf_r=0.0)
    assert never.no_mask_prob == 0.0 and all(never[0]["mask"].min() == 0 for _ in range(20))
    always = ImageNetSRTrain(root=path.parent, size=32, Cf_r=1.0, min_crop_f=0.7, degradation="pil_nearest")
    assert always.min_crop_frac == 0.7 and bool((always[0]["mask"] == 1).all())
    with pytest.raises(ValueError, match="Cf_r"):
        ImageNetSRTrain(root=path.parent, Cf_r=0.2, no_mask_prob=0.5)


def test_validation_masks_fixed(folder):
    a, b = ImageNetSRValidation(root=folder, size=32), ImageNetSRValidation(root=folder, size=32)
    torch.manual_seed(1)
    first = [a[i] for i in range(len(a))]
    torch.manual_seed(2)  # torch's state must not matter
    for i in reversed(range(len(b))):  # nor the order of access
        assert torch.equal(first[i]["mask"], b[i]["mask"]) and torch.equal(first[i]["image"], b[i]["image"])
    other = ImageNetSRValidation(root=folder, size=32, seed=5)
    assert any(not torch.equal(first[i]["mask"], other[i]["mask"]) for i in range(len(other)))
    assert not a.random_crop and a.fixed_masks and a.no_mask_prob == 0.0  # every validation image has a mask
    assert ImageNetSRValidation(root=folder, size=32, Cf_r=0.5).no_mask_prob == 0.5


def _masks(loader) -> list:
    return [batch["mask"] for batch in loader]


def test_training_streams_distinct_per_worker_and_reproducible(tmp_path):
    path = _save(tmp_path / "one" / "a.png", np.zeros((32, 32, 3), np.uint8))
    ds = ImageNetSRTrain(root=path.parent, size=32, no_mask_prob=0.0)
    ds.paths = ds.paths * 4  # identical images: only the masks differ
    loader = DataLoader(ds, batch_size=1, num_workers=2)

    torch.manual_seed(0)
    first = _masks(loader)
    # indices 0 and 1 are the first draws of workers 0 and 1: equal if the workers shared a stream
    assert not torch.equal(first[0], first[1])
    assert len({m.numpy().tobytes() for m in first}) == 4
    torch.manual_seed(0)
    assert all(torch.equal(x, y) for x, y in zip(first, _masks(loader)))
    torch.manual_seed(1)
    assert not all(torch.equal(x, y) for x, y in zip(first, _masks(loader)))

    single = DataLoader(ds, batch_size=2, num_workers=0)
    torch.manual_seed(0)
    epoch1, epoch2 = _masks(single), _masks(single)
    assert not torch.equal(epoch1[0], epoch2[0])  # epochs differ
    torch.manual_seed(0)
    assert torch.equal(_masks(single)[0], epoch1[0])


def test_batch_feeds_the_autoencoder(folder, tiny_autoencoder):
    ds = ImageNetSRTrain(root=folder, size=32, no_mask_prob=0.0)
    batch = default_collate([ds[0], ds[1]])
    x, mask = tiny_autoencoder.get_input(batch)
    assert x.shape == (2, 3, 32, 32) and mask.shape == (2, 1, 32, 32)
    with torch.no_grad():
        rec, _ = tiny_autoencoder(x, mask)
    assert rec.shape == x.shape and math.isfinite(rec.abs().sum().item())


def test_loader_workers_ignore_sigterm_and_keep_lightning_seeding(folder, monkeypatch):
    """``scancel`` signals the whole process group: workers must leave SIGTERM to the main process (which saves
    last.ckpt), and still get Lightning's per-worker seeds (``seed_everything(workers=True)``)."""
    import signal

    from lightning_fabric.utilities.seed import pl_worker_init_function

    from ldm.data.datamodule import DataModuleFromConfig, worker_init_fn

    dataset = {"target": "ldm.data.inpainting.ImageNetSRTrain", "params": {"root": str(folder), "size": 32}}
    data = DataModuleFromConfig(batch_size=1, train=dataset, validation=dataset, num_workers=1)
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        assert loader.worker_init_fn.func is worker_init_fn
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("PL_SEED_WORKERS", "1")
    try:
        torch.manual_seed(1234)  # a worker's initial seed (base seed + worker id)
        worker_init_fn(1, rank=3)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        ours = torch.rand(4), np.random.rand(4)
    finally:
        signal.signal(signal.SIGTERM, previous)
    torch.manual_seed(1234)
    pl_worker_init_function(1, rank=3)
    assert torch.equal(ours[0], torch.rand(4)) and np.array_equal(ours[1], np.random.rand(4))
