"""The one loader: formats, weights-only safety, key checks that name the likely wrong variant."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from ldm.checkpoint import CheckpointError, load_model, read_state_dict, save_state_dict
from tests.conftest import TINY_DDCONFIG, make_autoencoder


def original_style_checkpoint(model, path, extra=None):
    """What the paper's release looks like: a Lightning dict with dead up_layers, loss weights and metadata."""
    import pytorch_lightning as pl

    sd = dict(model.state_dict())
    sd["decoder.up_layers.0.deconv.weight"] = torch.randn(8, 8, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    sd.update(extra or {})
    torch.save({"state_dict": sd, "global_step": 120030, "epoch": 3,
                "callbacks": {pl.callbacks.ModelCheckpoint: {"best_model_path": "x"}}}, path)
    return sd


def test_round_trip_ckpt_and_safetensors_exact(tmp_path, tiny_autoencoder):
    sd = tiny_autoencoder.state_dict()
    for name in ("a.ckpt", "a.safetensors", "a.pt"):
        save_state_dict(sd, tmp_path / name)
        back = read_state_dict(tmp_path / name)
        assert back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "a.pt", "a.safetensors"]  # no temporary files left


def test_original_release_layout_loads_and_drops_dead_keys(tmp_path, caplog):
    src = make_autoencoder(seed=1)
    original_style_checkpoint(src, tmp_path / "base.ckpt")
    dst = make_autoencoder(seed=2)
    with caplog.at_level(logging.INFO):
        dst.init_from_ckpt(tmp_path / "base.ckpt")
    assert "decoder.up_layers." in caplog.text and "never used" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_woc_config_loads_a_conditioned_checkpoint_and_decodes_without_prior(tmp_path):
    cond = make_autoencoder(seed=1)
    original_style_checkpoint(cond, tmp_path / "base.ckpt")
    woc = make_autoencoder(condition=False, seed=3)
    woc.init_from_ckpt(tmp_path / "base.ckpt")
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(woc.decode(z), cond.decode(z))


def test_full_stable_diffusion_checkpoint_gives_its_vae(tmp_path):
    vae = make_autoencoder(condition=False, seed=4)
    sd = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    sd["model.diffusion_model.out.2.weight"] = torch.randn(4, 8, 3, 3)
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    save_state_dict(sd, tmp_path / "sd.safetensors")
    asym = make_autoencoder(condition=True, seed=5)
    asym.init_from_ckpt(tmp_path / "sd.safetensors")  # condition branch stays fresh, the rest is SD's
    for k, v in vae.state_dict().items():
        assert torch.equal(asym.state_dict()[k], v)
    assert read_state_dict(tmp_path / "sd.safetensors", prefix="first_stage_model.").keys() == vae.state_dict().keys()


def test_ignore_keys_keep_fresh_initialisation(tmp_path):
    src = make_autoencoder(seed=1)
    save_state_dict(src.state_dict(), tmp_path / "vae.ckpt")
    dst = make_autoencoder(seed=2, ch=64, num_res_blocks=2)  # a wider decoder: only the encoder side fits
    before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("decoder.")}
    dst.init_from_ckpt(tmp_path / "vae.ckpt", ignore_keys=["decoder"])
    assert torch.equal(dst.encoder.conv_in.weight, src.encoder.conv_in.weight)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())


def test_wrong_variant_is_refused_with_the_variant_named(tmp_path):
    save_state_dict(make_autoencoder(seed=1).state_dict(), tmp_path / "small.ckpt")
    wide = make_autoencoder(ch=64, num_res_blocks=2)
    with pytest.raises(CheckpointError) as err:
        wide.init_from_ckpt(tmp_path / "small.ckpt")
    text = str(err.value)
    assert "small.ckpt" in text and "other shapes" in text and "missing keys" in text
    assert "ch=32, num_res_blocks=1" in text and "ch=64, num_res_blocks=2" in text


def test_unknown_keys_are_refused(tmp_path, tiny_autoencoder):
    sd = dict(tiny_autoencoder.state_dict())
    sd["decoder.extra_head.weight"] = torch.zeros(3)
    save_state_dict(sd, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys: decoder.extra_head.weight"):
        make_autoencoder().init_from_ckpt(tmp_path / "x.safetensors")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickled_code_is_refused_and_never_run(tmp_path, tiny_autoencoder):
    marker = tmp_path / "pwned"
    payload = _Exploit()
    payload.target = marker
    torch.save({"state_dict": tiny_autoencoder.state_dict(), "hook": payload}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refusing to load.*(system|posix)"):
        read_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("name, content, error, message", [
    ("garbage.ckpt", b"not a checkpoint at all", CheckpointError, "garbage.ckpt"),
    ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", CheckpointError, "broken.safetensors"),
    ("weights.npz", b"PK", CheckpointError, "unknown checkpoint format"),
])
def test_unreadable_files_get_clear_errors(tmp_path, name, content, error, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=message):
        read_state_dict(tmp_path / name)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        read_state_dict(tmp_path / "nowhere.ckpt")


def test_load_model_from_config_file(tmp_path, tiny_autoencoder):
    from omegaconf import OmegaConf

    cfg = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL",
                     "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                                "ddconfig": TINY_DDCONFIG, "decoder_overrides": {"condition": True}}}}
    OmegaConf.save(cfg, tmp_path / "tiny.yaml")
    save_state_dict(tiny_autoencoder.state_dict(), tmp_path / "tiny.safetensors")
    model = load_model(tmp_path / "tiny.yaml", tmp_path / "tiny.safetensors")
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_autoencoder.state_dict().values()))
