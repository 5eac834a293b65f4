"""scripts/inpaint_diffusers.py end to end on a tiny SD inpainting pipeline folder saved here (with a tiny CLIP
vocabulary written here: nothing comes from a hub), on the input folder of tests/scripts/test_sd_scripts.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import inpaint_st
from ldm.latent_spaces import LATENT_SPACES
from ldm.project import load_yaml
from scripts import inpaint_diffusers
from tests.integrations.test_pipelines import build_sd, export_vae, make_decoder
from tests.scripts.test_sd_scripts import DECODER, files, inpaint_args, read  # noqa: F401 - files is a fixture

transformers = pytest.importorskip("transformers")


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer over single letters (no merges), written to ``folder``."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    pipe = build_sd(export_vae(make_decoder(LATENT_SPACES["sd"], condition=False)))
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe.register_modules(text_encoder=text_encoder, tokenizer=tiny_tokenizer(root / "vocab"))
    pipe.save_pretrained(root / "sd-inpainting")
    return root / "sd-inpainting"


def script_args(files, pipeline_dir, outdir, *extra):  # noqa: F811 - the fixture's value
    root, indir, ckpts = files
    return ["--pipeline", str(pipeline_dir), "--indir", str(indir), "--outdir", str(outdir), "--config",
            str(DECODER), "--ckpt", str(ckpts["decoder"]), "--steps", "2", "--max_size", "160", "--device", "cpu",
            *extra]


def skipped_lines(err: str):
    return sorted(line for line in err.splitlines() if line.startswith("skipped:"))


@pytest.mark.slow
def test_inpaint_diffusers_end_to_end_as_inpaint_st(files, pipeline_dir, tmp_path, capsys):  # noqa: F811
    """Same pairs, same messages for bad ones, same keep / overwrite rules as inpaint_st.py."""
    out = tmp_path / "out"
    assert inpaint_diffusers.main(script_args(files, pipeline_dir, out)) == 1
    ours = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert read(out / "a.png").shape == (64, 64, 3) and read(out / "c.png").shape == (64, 128, 3)
    assert inpaint_st.main(inpaint_args(files, tmp_path / "st")) == 1
    theirs = capsys.readouterr()
    assert skipped_lines(ours.err) == skipped_lines(theirs.err)
    assert len(skipped_lines(ours.err)) == 5  # orphan mask, lonely image, broken, mismatched sizes, too small

    first = read(out / "a.png")
    assert inpaint_diffusers.main(script_args(files, pipeline_dir, out)) == 1
    assert "2 pairs already have outputs" in capsys.readouterr().out
    assert inpaint_diffusers.main(script_args(files, pipeline_dir, out, "--overwrite")) == 1
    np.testing.assert_array_equal(read(out / "a.png"), first)  # same seed, same output
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    vanilla = tmp_path / "vanilla"
    args = script_args(files, pipeline_dir, vanilla, "--vanilla_decoder", "--ckpt", "absent")
    assert inpaint_diffusers.main(args) == 1
    assert not np.array_equal(read(vanilla / "a.png"), first)


def test_inpaint_diffusers_refuses_what_cannot_work(files, pipeline_dir, tmp_path, capsys):  # noqa: F811
    config = load_yaml(DECODER)
    config.model.params.scaling_factor = 0.13025  # SDXL's latent space, 4 channels as well
    sdxl_config = tmp_path / "sdxl_tiny.yaml"
    OmegaConf.save(config, sdxl_config)
    assert inpaint_diffusers.main(script_args(files, pipeline_dir, tmp_path / "o", "--config", str(sdxl_config))) == 2
    err = capsys.readouterr().err
    assert f"--config {sdxl_config}: 4 channels, scaling_factor 0.13025" in err
    assert f"--pipeline {pipeline_dir}'s VAE: 4 channels, scaling_factor 0.18215" in err

    other = tmp_path / "t2i"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert inpaint_diffusers.main(script_args(files, other, tmp_path / "o")) == 2
    assert "StableDiffusionPipeline is not supported" in capsys.readouterr().err
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionControlNetInpaintPipeline"}))
    assert inpaint_diffusers.main(script_args(files, other, tmp_path / "o")) == 2
    assert "StableDiffusionControlNetInpaintPipeline needs --control_image" in capsys.readouterr().err
    absent = ["--control_image", str(tmp_path / "absent.png")]
    assert inpaint_diffusers.main(script_args(files, other, tmp_path / "o", *absent)) == 2
    assert "absent.png: not found" in capsys.readouterr().err
    assert inpaint_diffusers.main(script_args(files, tmp_path / "absent", tmp_path / "o")) == 2
    assert "model_index.json is missing" in capsys.readouterr().err
    assert inpaint_diffusers.main(script_args(files, pipeline_dir, tmp_path / "o", "--ckpt", "absent.ckpt")) == 2
    assert "--ckpt absent.ckpt: not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    root, indir, ckpts = files
    assert inpaint_diffusers.main(script_args(files, pipeline_dir, indir / "results")) == 2  # inputs stay inputs
    assert "--outdir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        inpaint_diffusers.main(["--pipeline", str(pipeline_dir), "--indir", "x"])  # no decoder, not --vanilla_decoder
    assert "--config and --ckpt" in capsys.readouterr().err
