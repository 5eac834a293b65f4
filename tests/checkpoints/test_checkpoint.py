"""The one loader: formats, weights-only safety, key checks that name the likely wrong variant."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.checkpoints.files import CheckpointError, save_state_dict
from ldm.checkpoints.keys import read_state_dict
from ldm.loading import load_model
from tests.conftest import TINY_DDCONFIG, assert_same_tensors, make_autoencoder


def original_style_checkpoint(model, path, extra=None):
    """What the paper's release looks like: a Lightning dict with dead up_layers, loss weights and metadata."""
    import pytorch_lightning as pl

    sd = dict(model.state_dict())
    sd["decoder.up_layers.0.deconv.weight"] = torch.randn(8, 8, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    sd.update(extra or {})
    # PL 1.4 (the release) keys callback states by class; they hold numpy scalars and paths
    torch.save({"state_dict": sd, "global_step": 120030, "epoch": 3, "pytorch-lightning_version": "1.4.2",
                "callbacks": {pl.callbacks.ModelCheckpoint: {"best_model_path": "x", "dirpath": Path("logs"),
                                                             "best_model_score": np.float64(0.5)}}}, path)
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


def test_ignore_keys_keep_fresh_initialisation(tmp_path, caplog):
    """The large ``_train`` configs' ``ignore_keys: [decoder]`` started from the SD VAE (a narrower decoder)."""
    src = make_autoencoder(condition=False, seed=1)
    save_state_dict(src.state_dict(), tmp_path / "vae.ckpt")
    dst = make_autoencoder(seed=2, ch=64, num_res_blocks=2)  # a wider decoder: only the encoder side fits
    before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("decoder.")}
    with caplog.at_level(logging.WARNING):
        dst.init_from_ckpt(tmp_path / "vae.ckpt", ignore_keys=["decoder"])
    assert torch.equal(dst.encoder.conv_in.weight, src.encoder.conv_in.weight)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in before.items())
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "vae.ckpt: its decoder is not this config's variant" in said[0]
    assert "ch=32, num_res_blocks=1" in said[0] and "ch=64, num_res_blocks=2" in said[0]


def test_a_train_config_started_from_a_decoder_of_its_own_variant_trains_from_it(tmp_path, caplog):
    """``ignore_keys: [decoder]`` + the paper's release of the same variant (``larger2.ckpt`` into the large2
    ``_train`` config) or one's own run: the decoder and its branch come from the file, said in one line."""
    from ldm.models.autoencoder import AutoencoderKL

    release = make_autoencoder(seed=1, ch=64, num_res_blocks=2)
    original_style_checkpoint(release, tmp_path / "larger2.ckpt")
    with caplog.at_level(logging.WARNING):
        started = AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4,
                                decoder_overrides={"condition": True, "ch": 64, "num_res_blocks": 2},
                                ckpt_path=tmp_path / "larger2.ckpt", ignore_keys=["decoder"])
    assert all(torch.equal(started.state_dict()[k], v) for k, v in release.state_dict().items())
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1
    assert "larger2.ckpt: its decoder is this config's variant, so training starts from it" in said[0]


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
    ("text.ckpt", b"hello world", CheckpointError, "text.ckpt: not a PyTorch checkpoint"),
    ("torn.ckpt", b"PK\x03\x04 torn zip", CheckpointError, "torn.ckpt: not a readable PyTorch checkpoint"),
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
    assert_same_tensors(back, sd)


def test_written_files_get_the_umask_mode_not_mkstemp_0600(tmp_path, tiny_autoencoder):
    old = os.umask(0o022)
    try:
        path = save_state_dict(tiny_autoencoder.state_dict(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_legacy_format_pickle_with_code_is_refused_with_the_same_message_and_no_advice(tmp_path, tiny_autoencoder):
    """torch.save's pre-zip format has no static listing of its globals: torch's own weights-only refusal is
    reported with the one message, without torch's advice to disable the safe loader."""
    marker = tmp_path / "pwned"
    payload = _Exploit()
    payload.target = marker
    torch.save({"state_dict": tiny_autoencoder.state_dict(), "hook": payload}, tmp_path / "old.ckpt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"old.ckpt: refusing to load: the file holds pickled Python objects "
                                              r"where only tensors and plain containers") as info:
        read_state_dict(tmp_path / "old.ckpt")
    assert "weights_only" not in str(info.value) and not marker.exists()
    save_state_dict(tiny_autoencoder.state_dict(), tmp_path / "plain_old.ckpt")
    torch.save(tiny_autoencoder.state_dict(), tmp_path / "plain_old.pt", _use_new_zipfile_serialization=False)
    assert read_state_dict(tmp_path / "plain_old.pt").keys() == tiny_autoencoder.state_dict().keys()


@pytest.mark.slow
def test_a_global_is_refused_whatever_package_it_lives_in(tmp_path, tiny_autoencoder):
    """Only Lightning's metadata, by exact name, is tolerated: a class of this project (or of Lightning) that no
    Lightning checkpoint carries is refused, never neutralised, and convert_checkpoint.py writes nothing."""
    import subprocess
    import sys

    import pytorch_lightning as pl

    from ldm.lr_scheduler import LambdaWarmUpCosineScheduler
    from tests.conftest import REPO

    sd = tiny_autoencoder.state_dict()
    odd = {"ours.ckpt": LambdaWarmUpCosineScheduler(warm_up_steps=1, lr_min=0.1, lr_max=1, lr_start=0.1,
                                                     max_decay_steps=2),
           "trainer.ckpt": pl.callbacks.LearningRateMonitor()}
    for name, obj in odd.items():
        torch.save({"state_dict": sd, "extra": obj}, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name}: refusing to load: the file holds pickled Python "
                                                  rf"objects \({type(obj).__module__}\.{type(obj).__name__}\)"):
            read_state_dict(tmp_path / name)
    result = subprocess.run([sys.executable, str(REPO / "scripts/convert_checkpoint.py"), "reformat",
                             str(tmp_path / "ours.ckpt"), str(tmp_path / "out.safetensors")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "refusing to load" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_plain_pickle_is_refused_without_unpickling_it_or_a_torch_warning(tmp_path, tiny_autoencoder):
    import pickle
    import warnings

    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({k: v.numpy() for k, v in tiny_autoencoder.state_dict().items()}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"plain.pt: not a PyTorch checkpoint \(a file written by "
                                                  r"torch.save\); other pickles are never loaded"):
            read_state_dict(tmp_path / "plain.pt")


def test_lightning_metadata_among_the_weights_is_refused(tmp_path, tiny_autoencoder):
    from omegaconf import OmegaConf

    sd = dict(tiny_autoencoder.state_dict(), config=OmegaConf.create({"a": 1}))
    torch.save({"state_dict": sd}, tmp_path / "mixed.ckpt")
    with pytest.raises(CheckpointError, match=r"mixed.ckpt: refusing to load.*DictConfig"):
        read_state_dict(tmp_path / "mixed.ckpt")


def test_a_checkpoint_written_by_lightning_2_loads(tmp_path):
    """What Lightning 2 writes (string-keyed callback states, loops, optimizer and LambdaLR states, OmegaConf
    hyper-parameters through save_hyperparameters) reads without running code."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from ldm.lr_scheduler import LambdaWarmUpCosineScheduler

    class Tiny(pl.LightningModule):
        def __init__(self, config):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.1)
            schedule = LambdaWarmUpCosineScheduler(warm_up_steps=1, lr_min=0.1, lr_max=1, lr_start=0.1,
                                                   max_decay_steps=4)
            return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}]

    torch.manual_seed(0)
    model = Tiny(OmegaConf.create({"model": {"ch": 32, "ch_mult": [1, 2]}}))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2))
    back = read_state_dict(tmp_path / "last.ckpt")
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
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


_PEAK_CHILD = """
import json, re, sys, torch
from ldm.loading import load_model
config = json.loads(sys.argv[2])

def peak_since_reset():  # the kernel's resident high-water mark (VmHWM), reset by writing 5 to clear_refs
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def current():
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

load_model(config)  # warm up: imports and allocator pools
for what in ("built", "loaded"):
    base = current()
    open("/proc/self/clear_refs", "w").write("5")
    model = load_model(config, sys.argv[1] if what == "loaded" else None)
    sizes = {what: peak_since_reset() - base}
    del model
    print(json.dumps({"model": sum(t.numel() * t.element_size() for t in load_model(config).state_dict().values()),
                      **sizes}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_loading_weights_peaks_near_the_model_size(tmp_path, suffix):
    """Peak resident memory (the kernel's high-water mark, reset before each step) of building a ~100 MB
    autoencoder, and of building it and loading a checkpoint into it: the file must not add a second copy of the
    weights (before: about 2x the model)."""
    import json
    import subprocess
    import sys

    config = {"target": "ldm.models.autoencoder.AutoencoderKL",
              "params": {"embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
                         "ddconfig": {**TINY_DDCONFIG, "ch": 64, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2},
                         "decoder_overrides": {"condition": True}}}
    model = load_model(config)
    save_state_dict(model.state_dict(), tmp_path / f"w{suffix}")
    del model
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / f"w{suffix}"), json.dumps(config)],
                         capture_output=True, text=True, check=True)
    sizes = {k: v for line in out.stdout.strip().splitlines()[-2:] for k, v in json.loads(line).items()}
    assert sizes["model"] > 80e6
    assert 0.7 * sizes["model"] < sizes["built"] < 1.3 * sizes["model"], sizes  # the measure sees the model
    assert sizes["loaded"] < 1.3 * sizes["model"], sizes


def test_load_model_finds_the_projects_configs_from_any_folder(tmp_path, monkeypatch):
    """``load_model("configs/...")`` as the scripts resolve their configs: as given, else from the repository."""
    # configs/tiny/autoencoder_kl_tiny.yaml: the tiny config with two blocks per decoder level
    save_state_dict(make_autoencoder(seed=1, num_res_blocks=2).state_dict(), tmp_path / "base.ckpt")
    monkeypatch.chdir(tmp_path)
    model = load_model("configs/tiny/autoencoder_kl_tiny.yaml", "base.ckpt")
    assert model.decoder.has_condition and not model.training
    with pytest.raises(FileNotFoundError, match=r"config configs/tiny/nowhere\.yaml: not found"):
        load_model("configs/tiny/nowhere.yaml", "base.ckpt")


def test_the_variant_hint_reads_the_condition_branch_as_the_config_reader_does():
    """describe_decoder_checkpoint (error messages) and autoencoder_config (the ComfyUI loader) read the branch with
    the one reader, condition_branch: absent, present, and ASUKA's mask-reading branch."""
    from ldm.checkpoints.architecture import autoencoder_config
    from ldm.checkpoints.tensors import describe_decoder_checkpoint
    from tests.conftest import make_autoencoder
    from tests.models.test_asuka import asuka_layout_checkpoint

    plain = make_autoencoder(condition=True).state_dict()
    woc = make_autoencoder(condition=False).state_dict()
    asuka = asuka_layout_checkpoint(gate_conv=True)
    assert "condition branch present;" in describe_decoder_checkpoint(plain)
    assert "condition branch absent;" in describe_decoder_checkpoint(woc)
    assert "reading the mask too" in describe_decoder_checkpoint(asuka)
    assert autoencoder_config(asuka)["params"]["decoder_overrides"]["concat_mask"] is True
    broken = dict(plain)
    broken["decoder.encoder.layers.0.weight"] = broken["decoder.encoder.layers.0.weight"][:, :2]
    assert "condition branch unreadable" in describe_decoder_checkpoint(broken)


def test_load_autoencoder_reads_the_file_once(tmp_path, monkeypatch):
    """The config is read off the tensors and the same tensors are loaded: one read of the file, not two."""
    import ldm.checkpoints.autoencoder_weights as weights
    import ldm.loading as loading

    model = make_autoencoder()
    save_state_dict(model.state_dict(), tmp_path / "base.safetensors")
    reads = []

    def counted(path, *args, **kwargs):
        reads.append(Path(path).name)
        return read_state_dict(path, *args, **kwargs)

    monkeypatch.setattr(loading, "read_state_dict", counted)
    monkeypatch.setattr(weights, "read_state_dict", counted)
    loaded = loading.load_autoencoder(tmp_path / "base.safetensors")
    assert reads == ["base.safetensors"]
    assert_same_tensors(loaded.state_dict(), model.state_dict())
