"""Configs are strict and say each thing once: a misspelt key is an error naming it, every shipped config uses only
keys its classes take, variant configs differ only in the numbers that define a variant, no number is repeated."""
from __future__ import annotations

import itertools
from typing import Any, Dict

import pytest
from omegaconf import OmegaConf

from ldm.loading import load_model
from ldm.models.autoencoder import NETWORKS, AutoencoderKL
from ldm.modules.diffusionmodules.model import ENCODER_ONLY_KEYS
from ldm.project import load_yaml
from ldm.util import check_params, get_obj_from_str
from tests.conftest import REPO, TINY_DDCONFIG

SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))
# One family per latent space: SD 1.x under the original names, the others one folder each.
FAMILIES = {"sd1": sorted((REPO / "configs/autoencoder").glob("autoencoder_kl_*32x32x4*.yaml")),
            **{d.name: sorted(d.glob("*.yaml"))
               for d in sorted((REPO / "configs/autoencoder").iterdir()) if d.is_dir() and d.name != "recipe"}}
TRAIN_CONFIGS = sorted((REPO / "configs/autoencoder").rglob("*_train.yaml"))
RECIPE = REPO / "configs/autoencoder/recipe"
VARIANTS = [p for family in FAMILIES.values() for p in family]
# What may differ between two variant configs: the decoder's numbers, the recipe that follows from them
# (decoder warm-started from SD or trained from scratch, its learning-rate factor) and the batch that fits a GPU.
VARIANT_KEYS = ("model.params.decoder_overrides.", "model.params.pretrained_lr_factor", "model.params.ignore_keys",
                "data.params.batch_size")


def _build(**overrides: Any) -> AutoencoderKL:
    params = dict(ddconfig=dict(TINY_DDCONFIG), lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    params.update(overrides)
    return AutoencoderKL(**params)


def test_misspelt_decoder_key_is_an_error_naming_it_and_the_keys_that_exist():
    with pytest.raises(ValueError, match=r"'conditon' \(did you mean 'condition'\?\).*num_res_blocks"):
        _build(decoder_overrides={"conditon": True})


def test_misspelt_ddconfig_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"ddconfig: unknown key 'num_res_block' \(did you mean 'num_res_blocks'"):
        _build(ddconfig={**TINY_DDCONFIG, "num_res_block": 3})


def test_misspelt_key_in_a_config_file_names_the_class_and_the_key(tmp_path):
    config = load_yaml(REPO / "configs/tiny/autoencoder_kl_tiny.yaml")
    config.model.params.embed_dims = 4
    path = tmp_path / "typo.yaml"
    OmegaConf.save(config, path)
    with pytest.raises(ValueError, match=r"params of ldm.models.autoencoder.AutoencoderKL: unknown key 'embed_dims' "
                                         r"\(did you mean 'embed_dim'\?\)"):
        load_model(path)


def _check_tree(node: Any, where: str) -> int:
    """check_params on every target/params pair under ``node`` (and on the autoencoder's ddconfig); returns the
    number of targets checked."""
    checked = 0
    if OmegaConf.is_dict(node) or isinstance(node, dict):
        if "target" in node:
            target = get_obj_from_str(node["target"])
            params = dict(node.get("params") or {})
            check_params(target, params, f"{where}: {node['target']}")
            checked += 1
            if target is AutoencoderKL:
                encoder_cls, decoder_cls = NETWORKS[params.get("architecture", "kl")]
                check_params(encoder_cls, params["ddconfig"], f"{where}: ddconfig")
                decoder = {**params["ddconfig"], **dict(params.get("decoder_overrides") or {})}
                check_params(decoder_cls, {k: v for k, v in decoder.items() if k not in ENCODER_ONLY_KEYS},
                             f"{where}: decoder_overrides")
        for key, value in node.items():
            checked += _check_tree(value, f"{where}.{key}")
    elif OmegaConf.is_list(node) or isinstance(node, list):
        for i, value in enumerate(node):
            checked += _check_tree(value, f"{where}[{i}]")
    return checked


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_uses_only_keys_its_classes_take(path):
    config = load_yaml(path)
    if "mask_generator_kwargs" in config:
        pytest.skip("a mask generator config, read by MaskGenerator.from_config")
    assert _check_tree(config, path.name) > 0


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_variant_configs_differ_only_in_the_numbers_of_the_variant(family):
    assert len(FAMILIES[family]) >= 7
    flat = {p.name: _flat(OmegaConf.to_container(load_yaml(p))) for p in FAMILIES[family]}
    for (a, fa), (b, fb) in itertools.combinations(flat.items(), 2):
        if a.endswith("_train.yaml") != b.endswith("_train.yaml"):
            continue  # training and inference configs differ in their sections by design
        differ = sorted(k for k in set(fa) | set(fb) if fa.get(k, None) != fb.get(k, None))
        assert all(k.startswith(VARIANT_KEYS) for k in differ), (a, b, differ)


@pytest.mark.parametrize("path", VARIANTS + sorted((REPO / "configs/tiny").glob("autoencoder*.yaml"))
                         + sorted((REPO / "configs/demo").glob("*.yaml")), ids=lambda p: p.name)
def test_no_number_in_two_places(path):
    """The decoder states only what differs from ddconfig, and the discriminator's schedule takes its start from
    the loss' ``disc_start`` (AutoencoderKL.configure_optimizers) instead of repeating it."""
    params = OmegaConf.to_container(load_yaml(path))["model"]["params"]
    repeated = {k: v for k, v in (params.get("decoder_overrides") or {}).items() if params["ddconfig"].get(k) == v}
    assert repeated == {}
    for key in ("scheduler_config", "scheduler_config_d"):
        assert "start_step" not in ((params.get(key) or {}).get("params") or {})
    if "scheduler_config_d" in params:
        assert params["scheduler_config_d"] != params.get("scheduler_config")


def test_train_configs_resolve_to_what_they_said_before_they_shared_one_recipe():
    """``tests/fixtures/train_configs_resolved.json``: every ``_train`` config as it read when each file still spelled
    out the whole recipe. The shared recipe (``configs/autoencoder/recipe/``, through ``defaults:``) changed the
    files, not one resolved value; a deliberate recipe change updates the file."""
    import json

    before = json.loads((REPO / "tests/fixtures/train_configs_resolved.json").read_text())
    after = {str(p.relative_to(REPO)): OmegaConf.to_container(load_yaml(p))
             for p in TRAIN_CONFIGS if p.parent != RECIPE}
    assert set(before) <= set(after)  # a latent space added since has no "before"
    for name in before:
        assert after[name] == before[name], name


@pytest.mark.parametrize("path", [p for p in TRAIN_CONFIGS if p.parent != RECIPE], ids=lambda p: p.name)
def test_every_train_config_takes_the_recipe_from_one_place(path):
    """A ``_train`` config extends its variant's recipe and states only its latent space: no key of the shared
    recipe file (the schedule, the loss, the data, the trainer) is written again."""
    own = OmegaConf.to_container(OmegaConf.load(path))
    variant = "large2" if "large2" in path.name else "large" if "large" in path.name else "base"
    assert own.pop("defaults") == [f"configs/autoencoder/recipe/{variant}_train.yaml"]
    recipe = _flat(OmegaConf.to_container(load_yaml(RECIPE / "asymmetric_train.yaml")))
    stated = set(_flat(own))
    allowed = ("model.params.embed_dim", "model.params.ddconfig.z_channels", "model.params.ckpt_path",
               "model.params.scaling_factor", "model.params.shift_factor", "model.params.use_quant_conv",
               "model.params.latent_batch_norm.", "model.params.latents_mean", "model.params.latents_std")
    if own.get("model", {}).get("params", {}).get("architecture", "kl") != "kl":
        # another network (Qwen-Image's): its base width, temporal resamplers and the recipe's ratios on that width
        allowed += ("model.params.architecture", "model.params.ddconfig.ch",
                    "model.params.ddconfig.temporal_downsample", "model.params.decoder_overrides.ch",
                    "model.params.decoder_overrides.num_res_blocks")
    assert all(k.startswith(allowed) for k in stated), sorted(k for k in stated if not k.startswith(allowed))
    assert not {k for k in stated if k in recipe and not k.startswith(allowed)}


def test_defaults_merge_in_order_and_refuse_a_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\ny: {p: 1, q: 1}\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\ny: {q: 2}\n")
    (tmp_path / "c.yaml").write_text("defaults: [b.yaml]\nx: 3\n")
    assert OmegaConf.to_container(load_yaml(tmp_path / "c.yaml")) == {"x": 3, "y": {"p": 1, "q": 2}}
    (tmp_path / "a.yaml").write_text("defaults: [c.yaml]\n")
    with pytest.raises(ValueError, match="extends"):
        load_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("defaults: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_yaml(tmp_path / "d.yaml")


def test_a_later_file_that_names_another_target_replaces_the_section(tmp_path):
    """``--base train.yaml shards.yaml``: the shards' data section replaces the image folders' (whose ``root`` the
    stream does not take), while a later file that keeps the target still merges key by key."""
    from ldm.training.config import load_config

    shards = tmp_path / "shards.yaml"
    shards.write_text("data:\n  params:\n    train:\n      target: ldm.data.shards.WebDatasetInpainting\n"
                      "      params: {urls: '/data/{0..3}.tar', epoch_size: 100}\n")
    config = load_config([str(REPO / "configs/autoencoder/autoencoder_kl_32x32x4_train.yaml"), str(shards)], [])
    train = OmegaConf.to_container(config.data.params.train)
    assert train == {"target": "ldm.data.shards.WebDatasetInpainting",
                     "params": {"urls": "/data/{0..3}.tar", "epoch_size": 100}}
    assert config.data.params.validation.params.root == "data/imagenet/val"  # untouched
    assert config.data.params.batch_size == 10
    same = tmp_path / "same.yaml"
    same.write_text("data:\n  params:\n    train:\n      target: ldm.data.inpainting.ImageNetSRTrain\n"
                    "      params: {size: 128}\n")
    config = load_config([str(REPO / "configs/autoencoder/autoencoder_kl_32x32x4_train.yaml"), str(same)], [])
    assert (config.data.params.train.params.size, config.data.params.train.params.root) == (128, "data/imagenet/train")
