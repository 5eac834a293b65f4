"""Text encoders: offline tokenizer ids, SD-format weights, frozen state. Tiny transformer widths, real vocabulary."""
from __future__ import annotations

import gzip
import os

import pytest
import torch
from torch import nn

from ldm.checkpoints.keys import load_into, read_state_dict
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

open_clip = pytest.importorskip("open_clip")
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
PAD = 49407

# Ids looked up in open_clip's bpe_simple_vocab_16e6.txt.gz: id = index of "word</w>" in the vocabulary
# (256 byte symbols, the same with "</w>", then the merges in file order), e.g. "a</w>" = 256 + 64 = 320.
KNOWN = {
    "a photograph of an astronaut riding a horse": [320, 8853, 539, 550, 18376, 6765, 320, 4558],
    # inpaint_st.py's default prompt
    "photograph of a beautiful empty scene, highest quality settings": [8853, 539, 320, 1215, 7893, 3562, 267,
                                                                         5317, 3027, 18628],
    "Hello,   WORLD!": [3306, 267, 1002, 256],  # lower-cased, whitespace collapsed
    "": [],
}


def test_tokenize_known_ids_on_the_class():
    tokens = FrozenCLIPEmbedder.tokenize(list(KNOWN))
    assert tokens.shape == (len(KNOWN), 77) and tokens.dtype == torch.long
    for row, ids in zip(tokens, KNOWN.values()):
        expected = [49406] + ids + [49407] + [PAD] * (75 - len(ids))
        assert row.tolist() == expected
    assert torch.equal(FrozenCLIPEmbedder.tokenize("a photograph of an astronaut riding a horse"), tokens[:1])


def test_tokenize_truncates_keeping_the_end_token():
    tokens = FrozenCLIPEmbedder.tokenize([" ".join(["cat"] * 100)])
    assert tokens[0, 0] == 49406 and tokens[0, 76] == 49407
    assert (tokens[0, 1:76] == 2368).all()  # "cat</w>"
    short = FrozenCLIPEmbedder.tokenize(["a cat"], max_length=3)
    assert short.tolist() == [[49406, 320, 49407]]


def test_tokenize_equals_hf_clip_tokenizer():
    """transformers' CLIPTokenizer (the one SD v1 used) built from the same vocabulary file."""
    from open_clip.tokenizer import bytes_to_unicode

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    hf = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])
    texts = ["a photograph of an astronaut riding a horse", "Don't STOP: 1234 naïve café, x+y=z ... !!",
             "émoji 🐱 and tabs\tand\nnewlines", " ".join(["word"] * 90), ""]
    expected = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(FrozenCLIPEmbedder.tokenize(texts), expected)


@pytest.mark.parametrize("bad", [None, 3, ["a", 1]])
def test_tokenize_rejects_non_text(bad):
    with pytest.raises(TypeError, match="string"):
        FrozenCLIPEmbedder.tokenize(bad)


def _sd_checkpoint(tmp_path, seed: int = 0):
    """A directly built CLIPTextModel, saved under the key names of an SD v1.x checkpoint (position_ids included)."""
    torch.manual_seed(seed)
    ref = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                       bos_token_id=49406, eos_token_id=49407, **TINY_CLIP)).eval()
    state_dict = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in ref.state_dict().items()}
    state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state_dict["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other parts of the SD checkpoint
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": state_dict}, path)
    return ref, path


def test_sd_keys_load_into_the_embedder(tmp_path):
    ref, path = _sd_checkpoint(tmp_path)
    texts = ["a photograph of an astronaut riding a horse", ""]
    tokens = FrozenCLIPEmbedder.tokenize(texts)
    outputs = {}
    for layer, layer_idx in [("last", None), ("hidden", -2), ("pooled", None)]:
        embedder = FrozenCLIPEmbedder(config=TINY_CLIP, layer=layer, layer_idx=layer_idx)
        state_dict = read_state_dict(path, prefix="cond_stage_model.")
        load_into(embedder, state_dict, source=path, known_unused={
            "transformer.text_model.embeddings.position_ids": "a non-persistent buffer in transformers >= 5"})
        outputs[layer] = embedder.encode(texts)
    with torch.no_grad():
        expected = ref(input_ids=tokens, output_hidden_states=True)
    assert outputs["last"].shape == (2, 77, 32)
    assert torch.allclose(outputs["last"], expected.last_hidden_state, atol=1e-6)
    assert torch.allclose(outputs["hidden"], expected.hidden_states[-2], atol=1e-6)
    assert torch.allclose(outputs["pooled"], expected.pooler_output[:, None], atol=1e-6)
    assert not torch.allclose(outputs["last"][0], outputs["last"][1])  # the prompt matters


def test_random_embedder_differs_from_loaded_weights(tmp_path):
    """The comparison above is not vacuous: without loading, another initialisation gives other features."""
    ref, _ = _sd_checkpoint(tmp_path)
    torch.manual_seed(1)
    embedder = FrozenCLIPEmbedder(config=TINY_CLIP)
    with torch.no_grad():
        expected = ref(input_ids=FrozenCLIPEmbedder.tokenize(["a cat"])).last_hidden_state
    assert not torch.allclose(embedder("a cat"), expected, atol=1e-3)


def test_embedders_are_frozen():
    for embedder in (FrozenCLIPEmbedder(config=TINY_CLIP),):
        parent = nn.ModuleDict({"cond_stage_model": embedder}).train()
        assert not any(p.requires_grad for p in embedder.parameters())
        assert not any(m.training for m in embedder.modules())
        assert parent.training
        assert not embedder("a cat").requires_grad
    trainable = FrozenCLIPEmbedder(config=TINY_CLIP, freeze=False).train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_clip_embedder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="only"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32", config=TINY_CLIP)
    with pytest.raises(ValueError, match="layer"):
        FrozenCLIPEmbedder(layer="penultimate", config=TINY_CLIP)
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(layer="hidden", config=TINY_CLIP)
    with pytest.raises(ValueError, match="max_length"):
        FrozenCLIPEmbedder(max_length=78, config=TINY_CLIP)


def test_full_size_text_towers_on_meta():
    """SD v1: CLIP ViT-L/14 text model, 196 tensors / 123,060,480 parameters under ``transformer.text_model``
    (SD v1.x checkpoints add ``embeddings.position_ids``)."""
    with torch.device("meta"):
        clip = FrozenCLIPEmbedder()
    keys = clip.state_dict()
    assert len(keys) == 196 and sum(p.numel() for p in clip.parameters()) == 123_060_480
    assert keys["transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert keys["transformer.text_model.encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
    assert keys["transformer.text_model.final_layer_norm.weight"].shape == (768,)
