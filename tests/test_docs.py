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

import pytest
import torch

from ldm.project import load_yaml
from tests.conftest import REPO

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
        state_dict = instantiate_from_config(load_yaml(REPO / config).model).state_dict()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
        else:
            torch.save({"state_dict": state_dict}, path)
    return make


# a user's file named in a docs block -> how its tiny stand-in is made (fits the CONFIG_STAND_INS counterparts)
FILE_STAND_INS: Dict[str, Callable[[Path], None]] = {
    "base.ckpt": random_weights("configs/tiny/autoencoder_kl_tiny.yaml"),
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


# ------------------------------------------------------------------------------------------------ the pages' facts
def test_every_stand_in_is_used_by_a_block():
    """A stand-in no block names is a doc example that went away: drop it (docs/tests.md lists the stand-ins)."""
    code = "\n".join(PYTHON_BLOCKS.values())
    unused = [name for name in FILE_STAND_INS if not re.search(rf"[\"']{re.escape(name)}[\"']", code)]
    assert unused == []


def test_every_docs_page_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme))
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= linked


# a backquoted path of this repository: a top-level folder of the project, then a file or folder name
REPO_PATH = re.compile(r"`((?:configs|scripts|ldm|tests|docs|comfyui_nodes)/[\w./-]*\w)`")


def repo_paths(text: str) -> List[str]:
    """The repository paths a page names in backquotes (no wildcards, braces or placeholders)."""
    return [p for p in REPO_PATH.findall(text) if not re.search(r"[*{}<>]|\.\.\.|/N\b|/X\b", p)]


def test_every_file_a_page_names_exists():
    missing = [f"{page.relative_to(REPO)}: {path}" for page in pages() for path in repo_paths(page.read_text())
               if not (REPO / path).exists()]
    assert missing == []


def test_the_path_check_sees_a_missing_file():
    assert repo_paths("see `docs/nowhere.md`, `configs/autoencoder/{sdxl,sd3}/` and `ldm/x/*.py`") == [
        "docs/nowhere.md"]
    assert not (REPO / "docs/nowhere.md").exists()
