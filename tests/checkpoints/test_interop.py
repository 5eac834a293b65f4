"""diffusers interop: our AutoencoderKL and diffusers' AsymmetricAutoencoderKL / AutoencoderKL compute the same
thing on converted weights (both directions), conversions round-trip exactly, full-size layouts map onto diffusers'
own x-1-5 / x-2 models, and scripts/convert_checkpoint.py works end to end and refuses bad requests."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from ldm.checkpoints.diffusers import (
    AutoencoderLayout,
    check_diffusers_state_dict,
    diffusers_condition_widths,
    diffusers_config_to_ldm,
    diffusers_to_ldm,
    ldm_to_diffusers,
    read_diffusers_folder,
    write_diffusers_folder,
)
from ldm.checkpoints.files import CheckpointError, save_state_dict
from ldm.checkpoints.keys import read_state_dict
from ldm.models.autoencoder import AutoencoderKL
from ldm.project import load_yaml
from tests.conftest import REPO, TINY_DDCONFIG, assert_same_tensors

diffusers = pytest.importorskip("diffusers")

IDENTITY_LOSS = {"target": "torch.nn.Identity"}
# 4 levels as in SD (f = 8), tiny widths: diffusers' 5-layer condition encoder is used in full
FOUR_LEVELS = dict(TINY_DDCONFIG, ch_mult=[1, 2, 4, 4])

# name -> (ddconfig, decoder_overrides, image size)
VARIANTS = {
    "tiny": (TINY_DDCONFIG, {"num_res_blocks": 2, "condition": True}, 32),
    "tiny_wide": (TINY_DDCONFIG, {"ch": 64, "num_res_blocks": 2, "condition": True}, 32),
    "four_levels": (FOUR_LEVELS, {"num_res_blocks": 2, "condition": True}, 32),
    "plain_vae": (TINY_DDCONFIG, {"condition": False}, 32),
}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give norms and biases random values too (default init: norm weight 1, bias 0), so that a mapping that
    swaps two norms or biases changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def build_ours(name: str, seed: int = 0) -> AutoencoderKL:
    ddconfig, overrides, _ = VARIANTS[name]
    torch.manual_seed(seed)
    model = AutoencoderKL(ddconfig=ddconfig, lossconfig=IDENTITY_LOSS, embed_dim=4, decoder_overrides=overrides)
    return randomize_(model, seed)


def inputs(size: int, seed: int = 0):
    """Image in [-1, 1] and a binary mask with both kept (0) and generated (1) regions, batch 2."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, size, size)
    mask[0, :, size // 4: size // 2 + 3, 5: size - 7] = 1
    mask[1, :, : size // 2] = 1
    mask[1, :, size // 2:, : size // 3] = 1
    return image, mask


def assert_same_model(ours: AutoencoderKL, theirs, size: int, condition: bool) -> None:
    """Posterior and decodes (with and without image/mask) agree within float32 noise."""
    image, mask = inputs(size)
    with torch.no_grad():
        post = ours.encode(image)
        dist = theirs.encode(image).latent_dist
        torch.testing.assert_close(post.mean, dist.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(post.logvar, dist.logvar, rtol=0, atol=1e-5)
        z = post.mean
        plain = ours.decode(z)
        assert plain.abs().mean() > 0.05  # a real signal, not a vanishing output
        assert (plain - theirs.decode(z).sample).abs().max() < 1e-4
        if condition:
            cond = ours.decode(z, image, mask)
            assert (cond - theirs.decode(z, image=image, mask=mask).sample).abs().max() < 1e-4
            assert (cond - plain).abs().max() > 1e-2  # the condition branch took part


def diffusers_class(name: str):
    return diffusers.AutoencoderKL if name == "plain_vae" else diffusers.AsymmetricAutoencoderKL


# ---------------------------------------------------------------------- parity, ours -> diffusers
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny_wide", "four_levels", "plain_vae"])
def test_ours_to_diffusers_folder_same_outputs(name, tmp_path):
    ours = build_ours(name)
    ddconfig, overrides, size = VARIANTS[name]
    folder = write_diffusers_folder(ours.state_dict(), ddconfig, overrides, tmp_path / "vae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no temporary folder left
    assert json.loads((folder / "config.json").read_text())["_class_name"] == diffusers_class(name).__name__
    theirs = diffusers_class(name).from_pretrained(folder).eval()
    assert_same_model(ours, theirs, size, condition=name != "plain_vae")


# ---------------------------------------------------------------------- parity, diffusers -> ours
@pytest.mark.slow
@pytest.mark.parametrize("levels", [2, 4])
def test_diffusers_folder_to_ours_same_outputs(levels, tmp_path):
    widths = (32, 64, 128, 128)[:levels]
    torch.manual_seed(3)
    theirs = diffusers.AsymmetricAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels, down_block_out_channels=widths, layers_per_down_block=1,
        up_block_types=("UpDecoderBlock2D",) * levels, up_block_out_channels=tuple(2 * w for w in widths),
        layers_per_up_block=2)
    randomize_(theirs, 3).save_pretrained(tmp_path / "hf")

    ddconfig, overrides = diffusers_config_to_ldm(json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert overrides == {"ch": 64, "ch_mult": [w // 32 for w in widths], "num_res_blocks": 2, "condition": True}
    # the one loader: AutoencoderKL(ckpt_path=folder) goes through ldm.checkpoints.keys.read_state_dict
    ours = AutoencoderKL(ddconfig=ddconfig, lossconfig=IDENTITY_LOSS, embed_dim=4, decoder_overrides=overrides,
                         ckpt_path=tmp_path / "hf").eval()
    assert_same_model(ours, theirs, 32, condition=True)


def test_plain_diffusers_vae_to_ours(tmp_path):
    torch.manual_seed(4)
    theirs = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 64),
                                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
    randomize_(theirs, 4).save_pretrained(tmp_path / "hf", safe_serialization=False)  # .bin, read weights-only
    sd, overrides = read_diffusers_folder(tmp_path / "hf")
    assert overrides == {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "condition": False}
    ours = build_ours("plain_vae", seed=9)
    ours.load_state_dict(sd)
    assert_same_model(ours, theirs, 32, condition=False)


# ---------------------------------------------------------------------- exact round trips
def original_layout(model: AutoencoderKL) -> dict:
    """The state dict as the paper's release stores it: plus the dead deconvs and loss weights."""
    sd = dict(model.state_dict())
    sd["decoder.up_layers.0.deconv.weight"] = torch.randn(64, 32, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    return sd


@pytest.mark.parametrize("name", ["tiny", "four_levels", "plain_vae"])
def test_ours_diffusers_ours_is_exact(name):
    ours = dict(build_ours(name).state_dict())
    converted, config = ldm_to_diffusers(original_layout(build_ours(name)))
    check_diffusers_state_dict(converted, config)
    back, overrides = diffusers_to_ldm(converted, config)
    assert set(back) == set(ours)
    for k in ours:
        assert torch.equal(back[k], ours[k]), k
    assert overrides == {k: v for k, v in {**VARIANTS[name][0], **VARIANTS[name][1]}.items()
                         if k in ("ch", "ch_mult", "num_res_blocks", "condition")}


def test_diffusers_ours_diffusers_is_exact():
    """Four levels: every diffusers tensor is used and comes back unchanged. With two levels, diffusers' extra
    condition layers (never read) come back as zeros."""
    for levels in (4, 2):
        widths = (32, 64, 128, 128)[:levels]
        torch.manual_seed(5)
        theirs = diffusers.AsymmetricAutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels, down_block_out_channels=widths,
            up_block_types=("UpDecoderBlock2D",) * levels, up_block_out_channels=widths)
        sd = randomize_(theirs, 5).state_dict()
        ours, _ = diffusers_to_ldm(sd, theirs.config)
        again, config = ldm_to_diffusers(ours, sample_size=theirs.config.sample_size)
        assert set(again) == set(sd)
        assert {k: v for k, v in config.items() if k != "_class_name"} == \
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in theirs.config.items()
             if k in config}
        dead = [f"decoder.condition_encoder.layers.{k}." for k in range(levels + 1, 5)]
        for k in sd:
            if k.startswith(tuple(dead)):
                assert not again[k].any(), k
            else:
                assert torch.equal(again[k], sd[k]), k


def test_legacy_attention_names_are_read(tmp_path):
    """diffusers folders saved before 0.14 name the attention projections query/key/value/proj_attn."""
    sd, config = ldm_to_diffusers(build_ours("tiny").state_dict())
    legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
              .replace("to_out.0", "proj_attn"): v for k, v in sd.items()}
    assert legacy.keys() != sd.keys()
    ours, _ = diffusers_to_ldm(sd, config)
    from_legacy, _ = diffusers_to_ldm(legacy, config)
    assert from_legacy.keys() == ours.keys() and all(torch.equal(from_legacy[k], ours[k]) for k in ours)


# ---------------------------------------------------------------------- full-size layouts (meta device)
X_1_5 = dict(down_block_out_channels=[128, 256, 512, 512], layers_per_down_block=2,
             up_block_out_channels=[192, 384, 768, 768], layers_per_up_block=3)
X_2 = dict(X_1_5, up_block_out_channels=[256, 512, 1024, 1024], layers_per_up_block=5)


@pytest.mark.parametrize("config_name, expected", [
    ("autoencoder_kl_32x32x4_large.yaml", X_1_5),        # diffusers' cross-attention/asymmetric-autoencoder-kl-x-1-5
    ("autoencoder_kl_32x32x4_large2.yaml", X_2),         # ... -x-2
    ("autoencoder_kl_32x32x4.yaml", dict(X_1_5, up_block_out_channels=[128, 256, 512, 512], layers_per_up_block=2)),
])
def test_full_size_variants_map_onto_diffusers(config_name, expected):
    """Our released-variant configs give diffusers' own x-1-5 / x-2 configs (from its conversion script), and
    every converted key and shape fits the diffusers model (built on meta, no memory)."""
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(load_yaml(REPO / "configs/autoencoder" / config_name))["model"]["params"]
    with torch.device("meta"):
        model = AutoencoderKL(**params)
    sd, config = ldm_to_diffusers(model.state_dict(), params["ddconfig"], params["decoder_overrides"])
    assert config == dict(expected, _class_name="AsymmetricAutoencoderKL", in_channels=3, out_channels=3,
                          down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                          act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=256,
                          scaling_factor=0.18215)
    check_diffusers_state_dict(sd, config)
    assert AutoencoderLayout.from_diffusers_config(config) == AutoencoderLayout.from_state_dict(model.state_dict())


def test_condition_widths_follow_diffusers_rule():
    assert diffusers_condition_widths(128, 512) == [128, 256, 512, 512, 512]
    assert diffusers_condition_widths(192, 768) == [192, 384, 768, 768, 768]
    assert diffusers_condition_widths(32, 64) == [32, 64, 64, 64, 64]


def test_woc_config_keeps_the_checkpoints_branch(cli, tmp_path):
    """The "woc" configs (condition: false) name the same released checkpoints: converting with one keeps the
    branch, and diffusers' decode(z) without image/mask ignores it."""
    ours = build_ours("tiny")
    src = save_state_dict(ours.state_dict(), tmp_path / "base.ckpt")
    assert cli.main(["to-diffusers", str(src), str(tmp_path / "hf"), "--config",
                     str(REPO / "configs/tiny/autoencoder_kl_woc_tiny.yaml")]) == 0
    sd, overrides = read_diffusers_folder(tmp_path / "hf")
    assert overrides["condition"] is True
    assert_same_tensors(sd, ours.state_dict())


# ---------------------------------------------------------------------- refusals
def test_mapping_refuses_what_diffusers_cannot_hold():
    sd = dict(build_ours("tiny").state_dict())
    with pytest.raises(CheckpointError, match="model.diffusion_model.x"):
        ldm_to_diffusers({**sd, "model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="encoder_blocks: config 2, checkpoint 1"):
        ldm_to_diffusers(sd, dict(TINY_DDCONFIG, num_res_blocks=2), {"num_res_blocks": 2, "condition": True})
    # a wider decoder without condition branch: neither diffusers class builds it
    torch.manual_seed(0)
    wide_plain = AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig=IDENTITY_LOSS, embed_dim=4,
                               decoder_overrides={"ch": 64})
    with pytest.raises(CheckpointError, match="no diffusers class"):
        ldm_to_diffusers(wide_plain.state_dict())
    # condition widths that diffusers would derive differently
    torch.manual_seed(0)
    odd = AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig=IDENTITY_LOSS, embed_dim=4,
                        decoder_overrides={"condition": True, "condition_widths": [32, 96, 64]})
    with pytest.raises(CheckpointError, match="condition branch widths"):
        ldm_to_diffusers(odd.state_dict())
    # a config built with 2 norm groups (diffusers' own tiny test config)
    config = dict(ldm_to_diffusers(sd)[1], norm_num_groups=2)
    with pytest.raises(CheckpointError, match="norm_num_groups 2"):
        diffusers_to_ldm({}, config)
    with pytest.raises(CheckpointError, match="UNet2DConditionModel"):
        diffusers_to_ldm({}, {"_class_name": "UNet2DConditionModel"})


def test_folder_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        read_diffusers_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        read_state_dict(tmp_path / "empty")  # the one loader sends folders here
    write_diffusers_folder(build_ours("tiny").state_dict(), None, None, tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        read_diffusers_folder(tmp_path / "vae")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_diffusers_folder(build_ours("tiny").state_dict(), None, None, tmp_path / "vae")


def test_pipeline_folder_reads_its_vae(tmp_path):
    ours = build_ours("plain_vae")
    write_diffusers_folder(ours.state_dict(), None, None, tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    sd, _ = read_diffusers_folder(tmp_path / "pipe")
    assert sd.keys() == ours.state_dict().keys()


# ---------------------------------------------------------------------- the CLI
def load_cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    return load_cli()


def test_cli_original_ckpt_to_diffusers_and_back(cli, tmp_path, capsys):
    ours = build_ours("tiny")
    original = save_state_dict(original_layout(ours), tmp_path / "base.ckpt")
    out = tmp_path / "asym"
    assert cli.main(["to-diffusers", str(original), str(out), "--config",
                     str(REPO / "configs/tiny/autoencoder_kl_tiny.yaml")]) == 0
    theirs = diffusers.AsymmetricAutoencoderKL.from_pretrained(out).eval()
    assert_same_model(ours, theirs, 32, condition=True)
    for suffix in (".safetensors", ".ckpt"):
        back = tmp_path / f"back{suffix}"
        assert cli.main(["from-diffusers", str(out), str(back)]) == 0
        assert_same_tensors(read_state_dict(back), ours.state_dict())
    assert "decoder_overrides {'ch': 32, 'ch_mult': [1, 2], 'num_res_blocks': 2, 'condition': True}" in \
        capsys.readouterr().out


def test_cli_reformat_round_trip_is_exact(cli, tmp_path):
    sd = original_layout(build_ours("tiny"))
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, dtype=torch.float16)
    start = save_state_dict(sd, tmp_path / "a.ckpt")
    assert cli.main(["reformat", str(start), str(tmp_path / "b.safetensors")]) == 0
    assert cli.main(["reformat", str(tmp_path / "b.safetensors"), str(tmp_path / "c.ckpt")]) == 0
    assert_same_tensors(read_state_dict(tmp_path / "c.ckpt"), read_state_dict(start))
    assert cli.main(["reformat", "--strip", str(start), str(tmp_path / "d.safetensors")]) == 0
    assert_same_tensors(read_state_dict(tmp_path / "d.safetensors"),
                        {k: v for k, v in sd.items() if not k.startswith(("loss.", "decoder.up_layers."))})


def fake_sd_checkpoint(vae: dict) -> dict:
    """A full SD v1 checkpoint's top-level layout: VAE under first_stage_model., plus UNet, text encoder, schedule."""
    g = torch.Generator().manual_seed(0)
    return {**{f"first_stage_model.{k}": v for k, v in vae.items()},
            "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g),
            "model.diffusion_model.out.2.bias": torch.randn(4, generator=g),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(32, generator=g),
            "alphas_cumprod": torch.linspace(1, 0, 10),
            "model_ema.decay": torch.tensor(0.9999)}


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_cli_extract_vae_from_full_sd_checkpoint(cli, tmp_path, suffix):
    vae = build_ours("plain_vae")
    sd_file = save_state_dict(fake_sd_checkpoint(vae.state_dict()), tmp_path / f"v1-5{suffix}")
    assert cli.main(["extract-vae", str(sd_file), str(tmp_path / "stable_vqgan.ckpt")]) == 0
    assert_same_tensors(read_state_dict(tmp_path / "stable_vqgan.ckpt"), vae.state_dict())
    # and the full checkpoint converts straight to a diffusers AutoencoderKL
    assert cli.main(["to-diffusers", str(sd_file), str(tmp_path / "vae")]) == 0
    assert_same_model(vae, diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval(), 32, condition=False)


def test_cli_refuses_overwrite_and_reports_bad_input(cli, tmp_path, capsys):
    ours = build_ours("tiny")
    src = save_state_dict(ours.state_dict(), tmp_path / "a.ckpt")
    existing = tmp_path / "b.safetensors"
    existing.write_bytes(b"keep me")
    assert cli.main(["reformat", str(src), str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert cli.main(["reformat", str(src), str(existing), "--overwrite"]) == 0
    assert_same_tensors(read_state_dict(existing), ours.state_dict())

    folder = tmp_path / "hf"
    assert cli.main(["to-diffusers", str(src), str(folder)]) == 0
    before = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    assert cli.main(["to-diffusers", str(existing), str(folder)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    other = save_state_dict(build_ours("tiny", seed=1).state_dict(), tmp_path / "other.ckpt")
    assert cli.main(["to-diffusers", str(other), str(folder), "--overwrite"]) == 0
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left

    for argv, needle in [
        (["reformat", str(tmp_path / "missing.ckpt"), str(tmp_path / "x.ckpt")], "missing.ckpt"),
        (["from-diffusers", str(tmp_path / "nowhere"), str(tmp_path / "x.ckpt")], "nowhere"),
        (["extract-vae", str(src), str(tmp_path / "x.ckpt")], "first_stage_model."),
        (["to-diffusers", str(src), str(tmp_path / "y"), "--config",
          str(REPO / "configs/autoencoder/autoencoder_kl_32x32x4_large.yaml")], "autoencoder_kl_32x32x4_large.yaml"),
    ]:
        assert cli.main(argv) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists() and not (tmp_path / "y").exists()
    with pytest.raises(SystemExit):
        cli.main(["reformat", str(src), str(tmp_path / "x.txt")])
    assert "must end in one of" in capsys.readouterr().err


def test_cli_to_diffusers_folder_names_may_contain_dots(cli, tmp_path, capsys):
    """Only weight-file suffixes are refused as a to-diffusers output; hf_x-1.5 is a folder name."""
    src = save_state_dict(build_ours("tiny").state_dict(), tmp_path / "a.ckpt")
    out = tmp_path / "hf_x-1.5"
    assert cli.main(["to-diffusers", str(src), str(out)]) == 0
    assert (out / "config.json").is_file() and not (tmp_path / "hf_x-1").exists()
    for suffix in (".ckpt", ".pt", ".pth", ".safetensors", ".bin", ".SAFETENSORS"):
        with pytest.raises(SystemExit):
            cli.parse_args(["to-diffusers", str(src), str(tmp_path / f"vae{suffix}")])
        assert "must be a folder name" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_as_a_script(tmp_path):
    src = save_state_dict(build_ours("tiny").state_dict(), tmp_path / "a.safetensors")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_checkpoint.py"), "reformat", str(src),
                             str(tmp_path / "a.ckpt")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_tensors(read_state_dict(tmp_path / "a.ckpt"), read_state_dict(src))


def test_cli_to_diffusers_files_get_the_umask_mode(cli, tmp_path):
    """safetensors writes 0600 files; the folder's files get what the umask gives any new file."""
    original = save_state_dict(build_ours("tiny").state_dict(), tmp_path / "base.ckpt")
    old = os.umask(0o022)
    try:
        assert cli.main(["to-diffusers", str(original), str(tmp_path / "asym")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "asym", *(tmp_path / "asym").iterdir()]}
    assert modes == {"asym": 0o755, "config.json": 0o644, "diffusion_pytorch_model.safetensors": 0o644}
