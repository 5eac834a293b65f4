"""The docs run: every ```python block of README.md and docs/*.md is executed, and every ``python SCRIPT ...`` /
``make TARGET`` line of a ```bash block is checked against the script's own argument parser and the Makefile.

Python blocks run one by one, each in an empty folder, where

* a file the block names (in quotes) that is a key of :data:`FILE_STAND_INS` is first written there as a tiny
  random-weight stand-in (a decoder checkpoint, an SD VAE, an image and its mask, ...);
* a full-size config the block names is swapped for its ``configs/tiny/`` counterpart (:data:`CONFIG_STAND_INS`),
  so that the stand-ins fit it and the block runs on a CPU in a second.

A page that names a new user file extends :data:`FILE_STAND_INS` with one line. Code that cannot run on stand-ins
(real weights, a GPU only) belongs in a ```text block.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple
from unittest import mock

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from .conftest import REPO

TINY = REPO / "configs" / "tiny"

# a full-size config named in a docs block -> the tiny config the block runs with (first match wins)
CONFIG_STAND_INS: List[Tuple[str, str]] = [
    (r"configs/autoencoder/autoencoder_kl_woc_32x32x4\w*\.yaml", "configs/tiny/autoencoder_kl_woc_tiny.yaml"),
    (r"configs/autoencoder/autoencoder_kl_32x32x4\w*\.yaml", "configs/tiny/autoencoder_kl_tiny.yaml"),
    (r"configs/autoencoder/flux/asuka\.yaml", "configs/tiny/autoencoder_kl_flux_tiny.yaml"),
    (r"configs/autoencoder/v1-inpainting-inference\.yaml", "configs/tiny/v1-inpainting-tiny.yaml"),
    (r"configs/autoencoder/v1-t2i-inference\.yaml", "configs/tiny/v1-t2i-tiny.yaml"),
]


def random_weights(config: str, seed: int = 0) -> Callable[[Path], None]:
    """A stand-in maker: the model of ``config`` (repository-relative) with random weights, saved as a Lightning
    ``.ckpt`` (``{"state_dict": ...}``) or a ``.safetensors`` by the stand-in's suffix."""
    def make(path: Path) -> None:
        from ldm.util import instantiate_from_config

        torch.manual_seed(seed)
        state_dict = instantiate_from_config(OmegaConf.load(REPO / config).model).state_dict()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
        else:
            torch.save({"state_dict": state_dict}, path)
    return make


def random_image(h: int = 32, w: int = 48, mask: bool = False) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        rng = np.random.default_rng(0)
        if mask:  # white = generate: a box in the middle
            pixels = np.zeros((h, w), np.uint8)
            pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        else:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return make


def tiny_flux_fill_pipeline(path: Path) -> None:
    """A ``save_pretrained`` folder of a FluxFillPipeline with tiny random components (tests/test_pipelines.py's),
    text encoders and tokenizers included (a 4-word vocabulary: every prompt is unknown words)."""
    import diffusers
    import transformers
    from tokenizers import Tokenizer, models

    from ldm.latent_spaces import LATENT_SPACES

    from .test_pipelines import TEXT_DIM, build_flux, export_vae, make_decoder

    words = ["<unk>", "<pad>", "<s>", "</s>"]

    def tokenizer(cls, model, **special):
        return cls(tokenizer_object=Tokenizer(model), unk_token="<unk>", pad_token="<pad>", eos_token="</s>", **special)

    pipe = build_flux(export_vae(make_decoder(LATENT_SPACES["flux"], condition=False)))
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(words), d_model=TEXT_DIM, d_ff=37, d_kv=8, num_layers=1, num_heads=4))
    diffusers.FluxFillPipeline(**{
        **pipe.components, "text_encoder": clip, "text_encoder_2": t5,
        "tokenizer": tokenizer(transformers.CLIPTokenizerFast, models.BPE(
            {w: i for i, w in enumerate(words)}, [], unk_token="<unk>", end_of_word_suffix=""),
            bos_token="<s>", model_max_length=77),
        "tokenizer_2": tokenizer(transformers.T5TokenizerFast, models.Unigram([(w, 0.0) for w in words], unk_id=0),
                                 model_max_length=512, extra_ids=0)}).save_pretrained(path)


# a user's file named in a docs block -> how its tiny stand-in is made (fits the CONFIG_STAND_INS counterparts)
FILE_STAND_INS: Dict[str, Callable[[Path], None]] = {
    "base.ckpt": random_weights("configs/tiny/autoencoder_kl_tiny.yaml"),
    "larger1.5.ckpt": random_weights("configs/tiny/autoencoder_kl_tiny.yaml", seed=1),
    "larger2.ckpt": random_weights("configs/tiny/autoencoder_kl_tiny.yaml", seed=2),
    "base.safetensors": random_weights("configs/tiny/autoencoder_kl_tiny.yaml"),
    "stable_vqgan.ckpt": random_weights("configs/tiny/autoencoder_kl_woc_tiny.yaml"),
    "asuka_decoder.ckpt": random_weights("configs/tiny/autoencoder_kl_flux_tiny.yaml"),
    "sd-v1-5-inpainting.ckpt": random_weights("configs/tiny/v1-inpainting-tiny.yaml"),
    "v1-5-pruned-emaonly.ckpt": random_weights("configs/tiny/v1-t2i-tiny.yaml"),
    "models/FLUX.1-Fill-dev": tiny_flux_fill_pipeline,
    "photo.png": random_image(),
    "photo_mask.png": random_image(mask=True),
}

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def pages() -> List[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(language: str) -> Iterator[Tuple[str, str]]:
    """``(page:line, code)`` of every fenced block of ``language`` in the pages."""
    for page in pages():
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start()) + 1
                yield f"{page.relative_to(REPO)}:{line}", match.group(2)


def with_stand_in_configs(code: str) -> str:
    for pattern, tiny in CONFIG_STAND_INS:
        code = re.sub(pattern, tiny, code)
    return code


PYTHON_BLOCKS = dict(blocks("python"))


@pytest.mark.parametrize("where", sorted(PYTHON_BLOCKS))
def test_python_block_runs(where, tmp_path, monkeypatch):
    code = PYTHON_BLOCKS[where]
    monkeypatch.chdir(tmp_path)
    for name, make in FILE_STAND_INS.items():
        if re.search(rf"[\"']{re.escape(name)}[\"']", code):
            make(tmp_path / name)
    exec(compile(with_stand_in_configs(code), where, "exec"), {"__name__": "__docs__"})


# ------------------------------------------------------------------------------------------------ shell commands

def commands(code: str) -> Iterator[List[str]]:
    """The command lines of a bash block, continuation lines joined, comments dropped, as argv lists."""
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.fullmatch(r"\w+=\S*", argv[0]):  # leading VAR=value
            argv.pop(0)
        if argv:
            yield argv


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace, extras: List[str], strict: bool):
        self.namespace, self.extras, self.strict = namespace, extras, strict


def parse_with_script(script: Path, args: List[str]) -> _Parsed:
    """Run ``script``'s ``main(args)`` up to its argument parsing, which is done for real (a refused flag exits);
    nothing after it runs."""
    spec = importlib.util.spec_from_file_location(f"_docs_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_known_args(self, args=None, namespace=None):
        if depth[0]:  # a subcommand's parser, called by the top-level one
            return original(self, args, namespace)
        depth[0] += 1
        try:
            namespace, extras = original(self, args, namespace)
        finally:
            depth[0] -= 1
        # parse_args refuses every extra; a script that calls parse_known_args itself takes them (dot-list overrides)
        strict = sys._getframe(1).f_code.co_name == "parse_args" and sys._getframe(1).f_globals is vars(argparse)
        raise _Parsed(namespace, extras, strict)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_known_args):
        try:
            module.main(args)
        except _Parsed as parsed:
            return parsed
    raise AssertionError(f"{script.name}: main() returned without parsing arguments")


def config_paths(args: List[str]) -> Iterator[str]:
    """Every ``configs/...`` path in the arguments (also inside ``name=config:ckpt`` and ``key=value``)."""
    for arg in args:
        yield from (piece for piece in re.split(r"[=:,]", arg) if piece.startswith("configs/"))


BASH_COMMANDS = {f"{where} `{' '.join(argv)[:60]}`": argv for where, code in blocks("bash")
                 for argv in commands(code) if Path(argv[0]).name.startswith(("python", "make"))}


@pytest.mark.parametrize("where", sorted(BASH_COMMANDS))
def test_shell_command_names_what_exists(where):
    argv = BASH_COMMANDS[where]
    if Path(argv[0]).name == "make":
        targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.M))
        missing = [t for t in argv[1:] if not t.startswith("-") and t not in targets]
        assert not missing, f"{where}: no Makefile target {missing}"
        return
    if argv[1] == "-m" or argv[1] == "-c":
        return  # a module run (python -m pytest ...) is not a script of this checkout
    script, args = REPO / argv[1], argv[2:]
    assert script.is_file(), f"{where}: no script {argv[1]}"
    missing = [p for p in config_paths(args) if not (REPO / p).exists()]
    assert not missing, f"{where}: no config {missing}"
    try:
        refused = refused_arguments(script, args)
    except SystemExit as e:
        raise AssertionError(f"{where}: {argv[1]} refuses these arguments (exit {e.code}, message above)") from None
    assert not refused, f"{where}: {argv[1]} does not take {refused}"


def refused_arguments(script: Path, args: List[str]) -> List[str]:
    """The arguments ``script`` would refuse as unknown; a parser error (a bad value, a missing argument) exits."""
    parsed = parse_with_script(script, args)
    return parsed.extras if parsed.strict else [a for a in parsed.extras if a.startswith("-") or "=" not in a]


def test_the_checks_see_a_broken_example():
    """A flag a script does not have, a missing config and a missing script are found."""
    assert refused_arguments(REPO / "inpaint_st.py", ["--indir", "in", "--no_such_flag"]) == ["--no_such_flag"]
    with pytest.raises(SystemExit):  # a bad value
        refused_arguments(REPO / "inpaint_st.py", ["--indir", "in", "--steps", "many"])
    assert refused_arguments(REPO / "main.py", ["--base", "a.yaml", "data.params.batch_size=4"]) == []
    assert refused_arguments(REPO / "main.py", ["--base", "a.yaml", "--no_such_flag"]) == ["--no_such_flag"]
    assert list(config_paths(["--decoder", "a=configs/nowhere.yaml:x.ckpt"])) == ["configs/nowhere.yaml"]
    assert list(commands("python a.py --x 1 \\\n    --y 2  # comment\n# only a comment\n")) == [
        ["python", "a.py", "--x", "1", "--y", "2"]]
    assert with_stand_in_configs('"configs/autoencoder/autoencoder_kl_32x32x4_large.yaml"') == (
        '"configs/tiny/autoencoder_kl_tiny.yaml"')
