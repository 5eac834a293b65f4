"""inpaint_st.py and txt2img.py end to end on tiny random checkpoints written here in the original key layouts."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import inpaint_st
import txt2img
from ldm.checkpoints.files import save_state_dict
from ldm.checkpoints.keys import read_state_dict
from tests.conftest import REPO
from tests.models.test_ddpm import TINY_INPAINT, TINY_T2I, build, original_layout

DECODER = REPO / "configs/tiny/autoencoder_kl_tiny.yaml"
DECODER_WOC = REPO / "configs/tiny/autoencoder_kl_woc_tiny.yaml"


def decoder_original_layout(seed: int = 1) -> dict:
    """A tiny asymmetric autoencoder as the paper's release stores it: with the dead deconvs and loss weights."""
    sd = dict(build(DECODER, seed=seed).state_dict())
    sd["decoder.up_layers.0.deconv.weight"] = torch.zeros(64, 32, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    return sd


def write_png(path, size, mode="RGB", seed=0):
    rng = np.random.RandomState(seed)
    if mode == "RGB":
        array = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        array = np.zeros((size[1], size[0]), dtype=np.uint8)
        array[: size[1] // 2, size[0] // 4:] = 255
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    ckpts = {
        "sd_inpaint": save_state_dict(original_layout(build(TINY_INPAINT)), root / "sd-inpaint.ckpt"),
        "sd_t2i": save_state_dict(original_layout(build(TINY_T2I)), root / "sd-t2i.safetensors"),
        "decoder": save_state_dict(decoder_original_layout(), root / "decoder.ckpt"),
    }
    ckpts["decoder_st"] = save_state_dict(read_state_dict(ckpts["decoder"]), root / "decoder.safetensors")
    indir = root / "in"
    indir.mkdir()
    write_png(indir / "a.png", (80, 70))  # -> 64x64
    write_png(indir / "a_mask.png", (80, 70), "L")
    write_png(indir / "b.png", (200, 70), seed=1)  # --max_size 160 -> 160x56 -> floored to 128x0: too small
    write_png(indir / "b_mask.png", (200, 70), "L")
    write_png(indir / "c.png", (300, 140), seed=2)  # --max_size 160 -> 160x74 -> 128x64
    write_png(indir / "c_mask.png", (300, 140), "L")
    write_png(indir / "orphan_mask.png", (64, 64), "L")
    write_png(indir / "lonely.png", (64, 64))
    (indir / "broken.png").write_bytes(b"not a png at all")
    write_png(indir / "broken_mask.png", (64, 64), "L")
    write_png(indir / "mism.png", (64, 64))
    write_png(indir / "mism_mask.png", (32, 32), "L")
    return root, indir, ckpts


def inpaint_args(files, outdir, *extra):
    root, indir, ckpts = files
    return ["--indir", str(indir), "--outdir", str(outdir), "--config", str(DECODER), "--ckpt", str(ckpts["decoder"]),
            "--config_d", str(TINY_INPAINT), "--ckpt_d", str(ckpts["sd_inpaint"]), "--steps", "2",
            "--max_size", "160", "--device", "cpu", *extra]


def with_flag(args, flag, value):
    """A copy of a script's argument list with ``flag``'s value replaced."""
    args = list(args)
    args[args.index(flag) + 1] = str(value)
    return args


def refused(script, args, capsys) -> str:
    """Run ``script.main(args)``, check it refuses with exit status 2, and return what it printed to stderr."""
    assert script.main(args) == 2
    return capsys.readouterr().err


def read(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def inpaint_ref(files, tmp_path_factory):
    """One default run over the input folder: (exit status, outdir, stderr)."""
    out = tmp_path_factory.mktemp("inpaint") / "out"
    return inpaint_st.main(inpaint_args(files, out)), out


@pytest.mark.slow
def test_inpaint_st_end_to_end(inpaint_ref):
    status, out = inpaint_ref
    assert status == 1  # some inputs are bad; the good pairs are written
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert read(out / "a.png").shape == (64, 64, 3) and read(out / "c.png").shape == (64, 128, 3)


@pytest.mark.slow
def test_inpaint_st_reports_bad_pairs_keeps_outputs_and_repeats(files, inpaint_ref, tmp_path, capsys):
    _, ref = inpaint_ref
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes((ref / "a.png").read_bytes())
    os.utime(out / "a.png", (0, 0))
    assert inpaint_st.main(inpaint_args(files, out)) == 1
    captured = capsys.readouterr()
    for name in ("orphan_mask.png", "lonely.png", "broken.png", "mism_mask.png", "b.png"):
        assert name in captured.err, name
    assert "too small" in captured.err  # b: 200x70 scaled to 160x56, floored to 128x0
    assert "1 pairs already have outputs" in captured.out
    assert os.stat(out / "a.png").st_mtime == 0  # kept without --overwrite
    np.testing.assert_array_equal(read(out / "c.png"), read(ref / "c.png"))  # same seed, same output

    assert inpaint_st.main(inpaint_args(files, out, "--overwrite", "--n_samples", "2")) == 1
    assert os.stat(out / "a.png").st_mtime == 0  # --n_samples 2 writes a_0.png, a_1.png
    assert {"a_0.png", "a_1.png", "c_0.png", "c_1.png"} <= {p.name for p in out.iterdir()}
    assert not np.array_equal(read(out / "a_0.png"), read(out / "a_1.png"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.slow
def test_inpaint_st_decoder_formats_and_vanilla(files, inpaint_ref, tmp_path):
    root, indir, ckpts = files
    _, ref = inpaint_ref
    args = inpaint_args(files, tmp_path / "st", "--ckpt", str(ckpts["decoder_st"]))
    assert inpaint_st.main(args) == 1
    np.testing.assert_array_equal(read(tmp_path / "st" / "a.png"), read(ref / "a.png"))
    # the SD checkpoint's own VAE: no decoder file needed, another result
    assert inpaint_st.main(inpaint_args(files, tmp_path / "vanilla", "--vanilla_decoder", "--ckpt", "absent")) == 1
    assert not np.array_equal(read(tmp_path / "vanilla" / "a.png"), read(ref / "a.png"))


@pytest.mark.slow
def test_decoder_as_diffusers_folder(files, inpaint_ref, tmp_path):
    """A diffusers AsymmetricAutoencoderKL folder works as --ckpt / --ckpt_c, with the same result as its weights
    saved in our key layout."""
    pytest.importorskip("ldm.checkpoints.diffusers")
    from diffusers import AsymmetricAutoencoderKL

    torch.manual_seed(2)
    folder = tmp_path / "asym-tiny"
    AsymmetricAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, down_block_out_channels=(32, 64),
                            layers_per_down_block=1, up_block_types=("UpDecoderBlock2D",) * 2,
                            up_block_out_channels=(32, 64), layers_per_up_block=2).save_pretrained(folder)
    ours = save_state_dict(read_state_dict(folder), tmp_path / "converted.safetensors")
    for ckpt, out in ((folder, "from_folder"), (ours, "from_file")):
        assert inpaint_st.main(inpaint_args(files, tmp_path / out, "--ckpt", str(ckpt))) == 1
    np.testing.assert_array_equal(read(tmp_path / "from_folder" / "a.png"), read(tmp_path / "from_file" / "a.png"))
    assert not np.array_equal(read(tmp_path / "from_folder" / "a.png"), read(inpaint_ref[1] / "a.png"))
    assert txt2img.main(t2i_args(files, tmp_path / "t2i", "--ckpt_c", str(folder), "--skip_grid")) == 0
    assert len(list((tmp_path / "t2i" / "samples").iterdir())) == 2


def test_inpaint_st_bad_setup(files, tmp_path, capsys):
    root, indir, ckpts = files
    empty = tmp_path / "empty"
    empty.mkdir()
    args = with_flag(inpaint_args(files, tmp_path / "o"), "--indir", empty)
    assert "no NAME.<ext> + NAME_mask.<ext> pair" in refused(inpaint_st, args, capsys)
    args = with_flag(inpaint_args(files, tmp_path / "o"), "--ckpt_d", tmp_path / "sd-v1-5-inpainting.ckpt")
    assert "sd-v1-5-inpainting.ckpt" in refused(inpaint_st, args, capsys)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def t2i_args(files, outdir, *extra):
    root, indir, ckpts = files
    return ["--plms", "--config", str(TINY_T2I), "--ckpt", str(ckpts["sd_t2i"]), "--config_c", str(DECODER),
            "--ckpt_c", str(ckpts["decoder"]), "--H", "32", "--W", "48", "--f", "2", "--ddim_steps", "4",
            "--n_iter", "1", "--n_samples", "2", "--outdir", str(outdir), "--device", "cpu", "--prompt", "a cat",
            *extra]


@pytest.mark.slow
def test_txt2img_end_to_end(files, tmp_path):
    out = tmp_path / "t2i"
    assert txt2img.main(t2i_args(files, out)) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert read(out / "samples" / "00000.png").shape == (32, 48, 3)
    assert read(out / "grid-0000.png").shape == (36, 2 * 50 + 2, 3)  # make_grid pads 2 px
    # numbering continues; same seed gives the same samples
    assert txt2img.main(t2i_args(files, out)) == 0
    assert (out / "grid-0001.png").exists()
    np.testing.assert_array_equal(read(out / "samples" / "00002.png"), read(out / "samples" / "00000.png"))
    assert not np.array_equal(read(out / "samples" / "00001.png"), read(out / "samples" / "00000.png"))

    # a conditioned decoder without a prior decodes exactly like its woc config ("generate everything")
    woc = tmp_path / "woc"
    args = t2i_args(files, woc)
    args[args.index("--config_c") + 1] = str(DECODER_WOC)
    assert txt2img.main(args) == 0
    np.testing.assert_array_equal(read(woc / "samples" / "00000.png"), read(out / "samples" / "00000.png"))


@pytest.mark.slow
def test_txt2img_from_file_ddim_and_flags(files, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na bird\n")
    out = tmp_path / "file"
    assert txt2img.main(t2i_args(files, out, "--from-file", str(prompts), "--skip_grid") + ["--ddim_eta", "0"]) == 0
    assert len(list((out / "samples").iterdir())) == 3 and not list(out.glob("grid-*"))
    args = [a for a in t2i_args(files, tmp_path / "ddim", "--ddim_eta", "0.5", "--skip_save") if a != "--plms"]
    assert txt2img.main(args) == 0
    assert list((tmp_path / "ddim").glob("grid-*.png")) and not list((tmp_path / "ddim" / "samples").iterdir())

    args = with_flag(t2i_args(files, tmp_path / "bad"), "--f", "8")
    assert "--f 8" in refused(txt2img, args, capsys)
    args = with_flag(t2i_args(files, tmp_path / "bad"), "--H", "30")
    assert "--H 30 must be a multiple of 4" in refused(txt2img, args, capsys)
    args = with_flag(t2i_args(files, tmp_path / "bad"), "--ddim_steps", "3")
    assert "3 uniform steps do not fit 1000 timesteps" in refused(txt2img, args, capsys)
    with pytest.raises(SystemExit):
        txt2img.main(t2i_args(files, tmp_path / "bad", "--ddim_eta", "1.0"))  # PLMS needs eta 0


# ---------------------------------------------------------------------------------------------------------------------
# The scripts' wiring: what reaches the decoder and the UNet, and the original defaults.

class UNetBatches:
    """Records the batch size of every UNet call (2n when classifier-free guidance runs both halves at once)."""

    def __init__(self, monkeypatch):
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        self.sizes = []
        real = UNetModel.forward

        def forward(unet, x, *args, **kwargs):
            self.sizes.append(x.shape[0])
            return real(unet, x, *args, **kwargs)

        monkeypatch.setattr(UNetModel, "forward", forward)


def spy_decode(monkeypatch, decoder, calls):
    """Record the arguments of ``decoder.decode`` by name (``z``, ``image``, ``mask``) and pass them on."""
    import inspect

    real = decoder.decode
    signature = inspect.signature(real)

    def decode(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "decode", decode)


def spy_samples(monkeypatch, calls):
    """Record the latents each sampler returns."""
    from ldm.models.diffusion.sampling_common import ScheduledSampler

    real = ScheduledSampler.sample

    def sample(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(out[0].detach().clone())
        return out

    monkeypatch.setattr(ScheduledSampler, "sample", sample)


@pytest.fixture
def one_pair(tmp_path):
    """A 64x64 pair (no resizing): mask white (generate) in the top half, right three quarters."""
    indir = tmp_path / "one"
    indir.mkdir()
    write_png(indir / "x.png", (64, 64), seed=3)
    write_png(indir / "x_mask.png", (64, 64), "L")
    return indir


@pytest.mark.slow
def test_inpaint_st_decoder_gets_latents_image_and_mask(files, one_pair, tmp_path, monkeypatch):
    decodes, samples, scale = [], [], []
    real_load = inpaint_st.load_models

    def load_models(opt, device):
        model, decoder = real_load(opt, device)
        spy_decode(monkeypatch, decoder, decodes)
        scale.append(model.scale_factor)
        return model, decoder

    monkeypatch.setattr(inpaint_st, "load_models", load_models)
    spy_samples(monkeypatch, samples)
    args = inpaint_args(files, tmp_path / "out", "--n_samples", "2")
    args[args.index("--indir") + 1] = str(one_pair)
    assert inpaint_st.main(args) == 0
    assert len(decodes) == len(samples) == 1
    call = decodes[0]
    torch.testing.assert_close(call["z"], samples[0] / scale[0])
    image = torch.tensor(read(one_pair / "x.png")).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(call["image"].float(), image[None].expand(2, -1, -1, -1))
    mask = torch.tensor(read(one_pair / "x_mask.png") >= 128).float()  # white = generate = 1
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(call["mask"].float(), mask[None, None].expand(2, -1, -1, -1))


@pytest.mark.slow
@pytest.mark.parametrize("scale, factor", [(None, 2), ("1.0", 1)])
def test_inpaint_st_classifier_free_guidance(files, one_pair, tmp_path, monkeypatch, scale, factor):
    """The default scale 7.5 runs the unconditional and conditional halves in one UNet batch (2n); scale 1 needs
    only the conditional one (n)."""
    unet = UNetBatches(monkeypatch)
    args = inpaint_args(files, tmp_path / "out", "--n_samples", "2", *(["--scale", scale] if scale else []))
    args[args.index("--indir") + 1] = str(one_pair)
    assert inpaint_st.main(args) == 0
    assert unet.sizes and set(unet.sizes) == {2 * factor}


def test_inpaint_st_defaults_are_the_original():
    opt = inpaint_st.parse_args(["--indir", "x"])
    assert (opt.prompt, opt.steps, opt.eta, opt.scale, opt.seed, opt.max_size, opt.n_samples) == (
        "photograph of a beautiful empty scene, highest quality settings", 50, 1.0, 7.5, 0, 640, 1)
    assert (opt.config, opt.ckpt, opt.config_d) == ("configs/autoencoder/autoencoder_kl_32x32x4.yaml", "base.ckpt",
                                                    "configs/autoencoder/v1-inpainting-inference.yaml")
    assert not opt.vanilla_decoder and not opt.overwrite and opt.precision == "autocast"


def test_txt2img_defaults_are_the_original():
    """The paper repo's txt2img.py defaults (CompVis' flags, its own --config / --config_c / --ckpt_c); only
    --outdir and --ckpt lose the original's cluster paths."""
    opt = txt2img.parse_args([])
    assert (opt.prompt, opt.ddim_steps, opt.ddim_eta, opt.scale, opt.seed, opt.n_iter, opt.n_samples, opt.n_rows) == (
        "a painting of a virus monster playing guitar", 50, 0.0, 7.5, 42, 2, 1, 0)
    assert (opt.H, opt.W, opt.C, opt.f, opt.precision) == (512, 512, 4, 8, "autocast")
    assert (opt.config, opt.config_c, opt.ckpt_c) == ("configs/autoencoder/v1-t2i-inference.yaml",
                                                      "configs/autoencoder/autoencoder_kl_woc_32x32x4.yaml",
                                                      "base.ckpt")
    assert not (opt.plms or opt.fixed_code or opt.skip_grid or opt.skip_save or opt.vanilla_decoder)
    assert opt.from_file is None


@pytest.mark.slow
@pytest.mark.parametrize("scale, factor", [(None, 2), ("1.0", 1)])
def test_txt2img_classifier_free_guidance(files, tmp_path, monkeypatch, scale, factor):
    unet = UNetBatches(monkeypatch)
    assert txt2img.main(t2i_args(files, tmp_path / "out", *(["--scale", scale] if scale else []))) == 0
    assert unet.sizes and set(unet.sizes) == {2 * factor}  # --n_samples 2


@pytest.mark.slow
def test_txt2img_decodes_with_the_asymmetric_decoder(files, tmp_path, monkeypatch):
    decodes, samples, scale = [], [], []
    import ldm.loading

    real_load = ldm.loading.load_model

    def load_model(config, ckpt, **kwargs):
        model = real_load(config, ckpt, **kwargs)
        if str(config) == str(DECODER):
            spy_decode(monkeypatch, model, decodes)
        else:
            scale.append(model.scale_factor)
        return model

    monkeypatch.setattr(ldm.loading, "load_model", load_model)
    spy_samples(monkeypatch, samples)
    out = tmp_path / "asym"
    assert txt2img.main(t2i_args(files, out, "--skip_grid")) == 0
    assert len(decodes) == len(samples) == 1
    torch.testing.assert_close(decodes[0]["z"], samples[0] / scale[0])
    assert decodes[0].get("image") is None and decodes[0].get("mask") is None  # no prior: generate everything
    vanilla = tmp_path / "vanilla"
    assert txt2img.main(t2i_args(files, vanilla, "--skip_grid", "--vanilla_decoder")) == 0
    assert len(decodes) == 1  # the SD VAE decoded this time
    for name in ("00000.png", "00001.png"):
        assert not np.array_equal(read(out / "samples" / name), read(vanilla / "samples" / name))


@pytest.mark.slow
def test_inpaint_st_never_replaces_some_of_n_samples_without_overwrite(files, one_pair, tmp_path, capsys):
    out = tmp_path / "out"
    args = inpaint_args(files, out, "--n_samples", "2")
    args[args.index("--indir") + 1] = str(one_pair)
    assert inpaint_st.main(args) == 0
    first = read(out / "x_1.png")
    (out / "x_1.png").unlink()
    os.utime(out / "x_0.png", (0, 0))
    capsys.readouterr()
    assert inpaint_st.main(args) == 0
    assert "keeping the existing x_0.png" in capsys.readouterr().out
    assert os.stat(out / "x_0.png").st_mtime == 0  # kept
    np.testing.assert_array_equal(read(out / "x_1.png"), first)  # the missing one, as the first run drew it
    assert inpaint_st.main(args + ["--overwrite"]) == 0
    assert os.stat(out / "x_0.png").st_mtime != 0  # replaced when asked


def test_bad_setups_are_messages_naming_the_flag(files, one_pair, tmp_path, capsys):
    """--outdir on a file (both scripts), --device foo, an inpainting model given to txt2img: a message and exit
    status 2, no traceback."""
    root, indir, ckpts = files
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = inpaint_args(files, afile)
    args[args.index("--indir") + 1] = str(one_pair)
    for outdir in (afile, afile / "sub"):
        args[args.index("--outdir") + 1] = str(outdir)
        assert inpaint_st.main(args) == 2
        assert f"--outdir {outdir}" in capsys.readouterr().err
    for outdir in (afile, afile / "sub"):
        assert txt2img.main(t2i_args(files, outdir)) == 2
        assert f"--outdir {outdir}" in capsys.readouterr().err
    assert afile.read_text() == "x"

    args = with_flag(with_flag(inpaint_args(files, tmp_path / "o"), "--indir", one_pair), "--device", "foo")
    assert "--device foo" in refused(inpaint_st, args, capsys)
    args = with_flag(t2i_args(files, tmp_path / "o"), "--device", "foo")
    assert "--device foo" in refused(txt2img, args, capsys)

    args = with_flag(t2i_args(files, tmp_path / "o"), "--config", TINY_INPAINT)
    args = with_flag(args, "--ckpt", ckpts["sd_inpaint"])
    assert f"--config {TINY_INPAINT}" in refused(txt2img, args, capsys)
    assert not (tmp_path / "o" / "samples").exists() or not list((tmp_path / "o" / "samples").iterdir())


def test_pick_device():
    from ldm.cli.common import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    for bad in ("foo", "cuda:x", "meta"):
        with pytest.raises(ValueError, match=f"--device {bad}"):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:0: CUDA is not available"):
            pick_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_inpaint_st_failure_in_one_pair_is_reported_and_the_others_run(files, one_pair, tmp_path, monkeypatch,
                                                                       capsys):
    write_png(one_pair / "y.png", (64, 64), seed=4)
    write_png(one_pair / "y_mask.png", (64, 64), "L")
    real = inpaint_st.inpaint
    calls = []

    def inpaint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first pair, x
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(inpaint_st, "inpaint", inpaint)
    out = tmp_path / "out"
    args = inpaint_args(files, out)
    args[args.index("--indir") + 1] = str(one_pair)
    assert inpaint_st.main(args) == 1
    captured = capsys.readouterr()
    assert "x.png" in captured.err and "CUDA out of memory" in captured.err
    assert "1 written" in captured.out and "1 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["y.png"]


def test_bad_steps_and_eta_name_the_flag(files, one_pair, tmp_path, capsys):
    args = inpaint_args(files, tmp_path / "o")
    args[args.index("--indir") + 1] = str(one_pair)
    for steps in ("3", "2000"):  # 3: uniform spacing overshoots 1000 timesteps; 2000: more than there are
        args[args.index("--steps") + 1] = steps
        assert inpaint_st.main(args) == 2
        assert f"--steps {steps}:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inpaint_st.main(inpaint_args(files, tmp_path / "o", "--eta", "-1"))
    assert "--eta must be >= 0" in capsys.readouterr().err
    args = with_flag(t2i_args(files, tmp_path / "o"), "--ddim_steps", "2000")
    assert "--ddim_steps 2000:" in refused(txt2img, args, capsys)
    with pytest.raises(SystemExit):
        txt2img.main([a for a in t2i_args(files, tmp_path / "o", "--ddim_eta", "-0.5") if a != "--plms"])
    assert "--ddim_eta must be >= 0" in capsys.readouterr().err


def test_16bit_masks_are_scaled_not_clipped(tmp_path):
    """PIL's convert("L") clips 16-bit values at 255: 0.4 of full scale would become "generate"."""
    from ldm.image_io import InputError, Pair, read_image, read_mask, read_pair

    levels = np.array([0, 26214, 32767, 32768, 39321, 65535])  # 0, .4, .49999, .50001, .6, 1 of full scale
    values = np.resize(levels, (64, 64))  # every row cycles through the levels
    expected = (np.resize(levels, (64, 64)) >= 32768).astype(np.float32)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "m_mask.png")  # 16-bit grayscale PNG
    assert Image.open(tmp_path / "m_mask.png").mode == "I;16"
    _, mask = read_pair(Pair("m", tmp_path / "m.png", tmp_path / "m_mask.png"), 640)
    np.testing.assert_array_equal(mask[0, 0].numpy(), expected)
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "m_mask.tif")  # mode I
    np.testing.assert_array_equal(read_mask(tmp_path / "m_mask.tif") >= 0.5, expected)

    Image.fromarray(np.full((2, 6), 70000, dtype=np.int32)).save(tmp_path / "big.tif")
    Image.fromarray(np.full((2, 6), 0.7, dtype=np.float32)).save(tmp_path / "float.tif")
    for name, match in (("big.tif", "outside 0..65535"), ("float.tif", "floating-point")):
        with pytest.raises(InputError, match=match) as e:
            read_image(tmp_path / name)
        assert name in str(e.value)


def test_txt2img_laion400m_is_refused_naming_what_to_pass(capsys):
    with pytest.raises(SystemExit) as e:
        txt2img.parse_args(["--laion400m"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized" not in err  # the original's flag is known, and refused with what to pass instead
    assert "--laion400m: the LAION-400M LDM model" in err and "not supported" in err
    assert "--config and --ckpt" in err


def test_mask_suffix_matches_in_any_case(tmp_path):
    for name in ("a.png", "a_mask.PNG", "b.PNG", "b_Mask.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    from ldm.image_io import find_pairs

    pairs, problems = find_pairs(tmp_path)
    assert [(p.name, p.image.name, p.mask.name) for p in pairs] == [("a", "a.png", "a_mask.PNG"),
                                                                   ("b", "b.PNG", "b_Mask.png")]
    assert len(problems) == 1 and "c.png" in problems[0]


@pytest.mark.parametrize("where", ["same", "inside"])
def test_inpaint_st_never_writes_into_its_input_folder(files, one_pair, where, capsys):
    before = {p.name: p.read_bytes() for p in one_pair.iterdir()}
    outdir = one_pair if where == "same" else one_pair / "out"
    args = with_flag(with_flag(inpaint_args(files, outdir, "--overwrite"), "--indir", one_pair), "--outdir", outdir)
    err = refused(inpaint_st, args, capsys)
    assert "--outdir" in err and "--indir" in err
    assert {p.name: p.read_bytes() for p in one_pair.iterdir()} == before


def test_inpaint_st_skips_an_image_above_max_pixels_and_runs_the_rest(files, one_pair, tmp_path, monkeypatch, capsys):
    write_png(one_pair / "huge.png", (128, 128), seed=5)
    write_png(one_pair / "huge_mask.png", (128, 128), "L")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # PIL's own bomb error would abort the whole run
    args = inpaint_args(files, tmp_path / "out", "--max_pixels", "10000")
    args = with_flag(args, "--indir", one_pair)
    assert inpaint_st.main(args) == 1
    err = capsys.readouterr().err
    assert "huge.png" in err and "--max_pixels" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]


def test_missing_decoder_is_reported_by_flag_before_sd_loads(files, one_pair, tmp_path, monkeypatch, capsys):
    import ldm.loading

    loaded = []
    real = ldm.loading.load_model
    monkeypatch.setattr(ldm.loading, "load_model", lambda *a, **k: loaded.append(a) or real(*a, **k))
    args = with_flag(with_flag(inpaint_args(files, tmp_path / "o"), "--indir", one_pair), "--ckpt",
                     tmp_path / "nope.ckpt")
    assert "--ckpt " in refused(inpaint_st, args, capsys)
    args = with_flag(t2i_args(files, tmp_path / "o"), "--ckpt_c", tmp_path / "nope.ckpt")
    assert "--ckpt_c " in refused(txt2img, args, capsys)
    assert loaded == []


def test_default_configs_are_found_from_another_folder(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = txt2img.parse_args(["--ckpt", str(files[2]["sd_t2i"]), "--ckpt_c", str(files[2]["decoder"])])
    txt2img.check_files(opt)
    assert opt.config == str(REPO / "configs/autoencoder/v1-t2i-inference.yaml")
    opt = inpaint_st.parse_args(["--indir", ".", "--ckpt", str(files[2]["decoder"]), "--ckpt_d",
                                 str(files[2]["sd_inpaint"])])
    inpaint_st.check_files(opt)
    assert opt.config_d == str(REPO / "configs/autoencoder/v1-inpainting-inference.yaml")


@pytest.mark.parametrize("args, message", [(["--prompt"], "expected one argument"),
                                           (["--outdir"], "expected one argument"),
                                           (["--skip_save", "--skip_grid"], "write nothing")])
def test_txt2img_flags_that_would_do_nothing_or_crash(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        txt2img.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def readme_command(script: str) -> list:
    """The documented command line for ``script`` (docs/inpainting.md, continuation lines joined), as argv after the
    script name."""
    import shlex

    text = (REPO / "docs" / "inpainting.md").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(f"python {script} "))
    return shlex.split(line)[2:]


@pytest.mark.parametrize("script, module, flag", [("inpaint_st.py", inpaint_st, "--ckpt"),
                                                  ("txt2img.py", txt2img, "--ckpt_c")])
def test_readme_commands_run_as_written_and_name_the_missing_weights(script, module, flag, tmp_path, monkeypatch,
                                                                      capsys):
    """Without the weights (none exist here) the README's command, run from another folder, finds the project's
    configs and stops before loading anything, naming the flag and the file to bring."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    write_png(tmp_path / "DIR" / "a.png", (64, 64))
    write_png(tmp_path / "DIR" / "a_mask.png", (64, 64), "L")
    err = refused(module, readme_command(script), capsys)
    assert f"{flag} base.ckpt: not found" in err and "configs/" not in err


def test_fast_flag_decodes_on_the_fast_path_within_bf16_rounding(files, one_pair, tmp_path, monkeypatch):
    """inpaint_st.py --fast: the decoder runs on ldm.fast's settings for the CPU (bf16 + channels_last where the
    CPU has native bf16) and the written image stays within bf16 rounding of the exact run; txt2img.py and
    evaluate.py take the same flag."""
    from ldm import fast
    from scripts import evaluate

    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: True)  # the same test on any CPU
    used = []
    real_load = inpaint_st.load_models

    def load_models(opt, device):
        model, decoder = real_load(opt, device)
        used.append((decoder.settings, decoder.model.decoder.conv_in.weight.dtype))
        return model, decoder

    monkeypatch.setattr(inpaint_st, "load_models", load_models)
    args = inpaint_args(files, tmp_path / "exact", "--n_samples", "1")
    args[args.index("--indir") + 1] = str(one_pair)
    assert inpaint_st.main(args) == 0
    assert inpaint_st.main(with_flag(args, "--outdir", tmp_path / "fast") + ["--fast"]) == 0
    assert used == [(fast.EXACT, torch.float32),
                    (fast.FastSettings(torch.bfloat16, channels_last=True), torch.bfloat16)]
    exact, quick = (read(tmp_path / d / "x.png").astype(np.float64) for d in ("exact", "fast"))
    assert 10 * np.log10(255 ** 2 / max(((exact - quick) ** 2).mean(), 1e-12)) >= 30
    assert txt2img.parse_args(["--fast"]).fast and evaluate.parse_args(
        ["reconstruction", "--images", "x", "--decoder", "a=b:c", "--outdir", "o", "--fast"]).fast
