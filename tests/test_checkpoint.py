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
    ("text.ckpt", b"hello world", CheckpointError, "text.ckpt: not a readable PyTorch checkpoint"),
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


def test_load_model_refuses_a_checkpoint_without_the_configured_condition_branch(tmp_path):
    """A plain VAE into a conditioned config would leave the branch random and ruin the kept region: training may
    start that way (init_from_ckpt), a model to use may not (load_model)."""
    vae = make_autoencoder(condition=False, seed=4)
    save_state_dict(vae.state_dict(), tmp_path / "vae.safetensors")
    config = {"target": "ldm.models.autoencoder.AutoencoderKL",
              "params": {"ddconfig": TINY_DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}, "embed_dim": 4,
                         "decoder_overrides": {"condition": True}}}
    with pytest.raises(CheckpointError, match=r"vae.safetensors: has no condition branch .*condition: false"):
        load_model(config, tmp_path / "vae.safetensors")
    config["params"]["decoder_overrides"]["condition"] = False
    assert not load_model(config, tmp_path / "vae.safetensors").decoder.has_condition


def test_hyper_parameter_metadata_loads_without_running_code(tmp_path, tiny_autoencoder):
    """Lightning checkpoints carry plain containers and Lightning objects as metadata."""
    import collections

    import pytorch_lightning as pl

    sd = tiny_autoencoder.state_dict()
    torch.save({"state_dict": sd, "hyper_parameters": {"ddconfig": {"ch": 32, "ch_mult": [1, 2]}},
                "order": collections.OrderedDict(b=2.0), "seen": {1, 2},
                "callbacks": {pl.callbacks.ModelCheckpoint: {"best_model_path": "x"}}},
               tmp_path / "hp.ckpt")
    back = read_state_dict(tmp_path / "hp.ckpt")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_written_files_get_the_umask_mode_not_mkstemp_0600(tmp_path, tiny_autoencoder):
    old = os.umask(0o022)
    try:
        path = save_state_dict(tiny_autoencoder.state_dict(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_pickle_the_safe_loader_cannot_read_gets_no_advice_to_disable_it(tmp_path, monkeypatch):
    import pickle

    def unreadable(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                     "`False` will likely succeed.\nWeightsUnpickler error: Unsupported operand 149")

    (tmp_path / "odd.ckpt").write_bytes(b"x")
    monkeypatch.setattr(torch, "load", unreadable)
    with pytest.raises(CheckpointError, match=r"odd.ckpt: not a weights checkpoint this loader can read safely "
                                              r"\(Unsupported operand 149\)") as info:
        read_state_dict(tmp_path / "odd.ckpt")
    assert "weights_only" not in str(info.value)


def test_training_model_loads_a_release_checkpoint_whose_lpips_has_no_lins_alias(tmp_path):
    """The release was saved with taming's LPIPS (lin0..lin4 only); the lpips package also registers them as
    lins.0..4. Fine-tuning from it must not fail on the alias, and the calibration weights must come across."""
    import torchvision

    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.losses.contperceptual import VGG16_FILE

    torch.save({f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()},
               tmp_path / VGG16_FILE)

    def training_model(seed):
        torch.manual_seed(seed)
        return AutoencoderKL(ddconfig=TINY_DDCONFIG, embed_dim=4, decoder_overrides={"condition": True},
                             lossconfig={"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                         "params": {"disc_start": 0, "perceptual_weight": 1.0,
                                                    "vgg_path": str(tmp_path / VGG16_FILE)}})

    src = training_model(1)
    with torch.no_grad():
        src.loss.perceptual_loss.lin0.model[1].weight.fill_(0.25)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("loss.perceptual_loss.lins.")}
    torch.save({"state_dict": sd}, tmp_path / "release.ckpt")
    dst = training_model(2)
    dst.init_from_ckpt(tmp_path / "release.ckpt")
    assert torch.equal(dst.loss.perceptual_loss.lins[0].model[1].weight, torch.full_like(
        dst.loss.perceptual_loss.lins[0].model[1].weight, 0.25))
    assert torch.equal(dst.decoder.conv_out.weight, src.decoder.conv_out.weight)
