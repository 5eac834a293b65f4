"""Shared tiny configs: every test runs on CPU in seconds with random weights."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Scripts run as child processes as users run them: with the project installed (`make venv` does `pip install -e
# .`), nothing added to their import path; pytest itself finds the checkout through `pythonpath` in pyproject.toml.


def user_env() -> dict:
    """The environment of a child process run as a user runs it: this one without the ``PYTHONPATH`` a developer's
    shell may carry (none of our tests sets it), so the child imports the project only through its install, as
    ComfyUI and the documented commands do."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# GroupNorm uses 32 groups, so widths must be multiples of 32. f = 2 ** (len(ch_mult) - 1) = 2.
TINY_DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                     num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def assert_same_tensors(a: dict, b: dict) -> None:
    """Two state dicts hold the same keys and, under each, the same dtype and values bit for bit."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def tiny_ddconfig() -> dict:
    return dict(TINY_DDCONFIG)


def make_autoencoder(condition: bool = True, seed: int = 0, **decoder_overrides):
    """A tiny AutoencoderKL with random (non-trivial) weights."""
    from ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4,
                          decoder_overrides={"condition": condition, **decoder_overrides})
    return model.eval()


@pytest.fixture
def tiny_autoencoder():
    return make_autoencoder(condition=True)
