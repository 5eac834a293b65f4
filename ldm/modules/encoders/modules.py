"""Frozen text encoders of Stable Diffusion, built offline.

* :class:`FrozenCLIPEmbedder` (SD v1): the CLIP ViT-L/14 text transformer as ``transformers.CLIPTextModel``,
  built from a config written here (never ``from_pretrained``); its weights are the SD checkpoint's
  ``cond_stage_model.transformer.text_model.*``.

It tokenizes with the CLIP BPE vocabulary that open-clip-torch ships (``bpe_simple_vocab_16e6.txt.gz``), so
nothing is fetched from a hub. Nothing here loads weights: ``LatentDiffusion`` (or ``ldm.checkpoints.keys.load_into``)
does, with the rest of the SD checkpoint.
"""
from __future__ import annotations

import functools
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

Texts = Union[str, Sequence[str]]

# The text tower of openai/clip-vit-large-patch14, which SD v1 uses (its config.json "text_config").
CLIP_VIT_L14_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
SD_V1_CLIP_VERSION = "openai/clip-vit-large-patch14"
START_OF_TEXT, END_OF_TEXT = 49406, 49407


@functools.lru_cache(maxsize=1)
def clip_bpe_tokenizer():
    """open-clip-torch's ``SimpleTokenizer`` over its bundled CLIP BPE vocabulary (built once, ~1 s).

    Text cleaning here: ``ftfy.fix_text``, HTML unescape, whitespace collapse, lower case; then the same split
    pattern and BPE as Hugging Face's ``CLIPTokenizer``, which SD v1 used (transformers 4.x: ``ftfy.fix_text``,
    whitespace, lower case; transformers 5: NFC, whitespace, lower case). Ids agree on ordinary prompts (tested
    against transformers' tokenizer, accents, emoji and truncation included). Edge cases that differ: HTML
    entities (``&amp;`` becomes ``&`` here), text that ftfy repairs (mojibake), and the literal strings
    ``<|startoftext|>`` / ``<|endoftext|>`` inside a prompt, which are ordinary text here and special ids in HF.
    """
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    # the two ids SD v1 hard-codes must be this vocabulary's start/end tokens
    if (tokenizer.sot_token_id, tokenizer.eot_token_id) != (START_OF_TEXT, END_OF_TEXT):
        raise RuntimeError(f"open_clip's BPE vocabulary has start/end ids {tokenizer.sot_token_id}/"
                           f"{tokenizer.eot_token_id}, expected {START_OF_TEXT}/{END_OF_TEXT}")
    return tokenizer


def _as_text_list(text: Texts) -> List[str]:
    if isinstance(text, str):
        return [text]
    if isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
        return list(text)
    raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")


class AbstractEncoder(nn.Module):
    """A conditioning encoder: ``encode(x)`` gives what the diffusion model is conditioned on."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class FrozenModule(AbstractEncoder):
    """An encoder that, once :meth:`freeze` is called, stays in eval mode with no gradients, even when its parent
    is put in train mode."""

    def freeze(self) -> None:
        self._frozen = True
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenModule":
        return super().train(mode and not getattr(self, "_frozen", False))


class _CLIPTextWrapper(nn.Module):
    """Holds the CLIPTextModel as ``text_model``: transformers >= 5 dropped that level from ``CLIPTextModel``
    itself, but SD checkpoints name the weights ``transformer.text_model.*``."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class FrozenCLIPEmbedder(FrozenModule):
    """SD v1 text encoder: prompts -> (B, max_length, hidden) CLIP token features (B, 77, 768 for SD v1).

    ``version``: only ``openai/clip-vit-large-patch14`` (the architecture; no download). ``config``: keys of a
    ``transformers.CLIPTextConfig`` merged over the ViT-L/14 text config (tests pass tiny widths). ``layer``:
    ``"last"`` = last hidden state after the final layer norm (SD v1), ``"pooled"`` = the end-token feature
    (B, 1, hidden), ``"hidden"`` = hidden state ``layer_idx`` of the encoder stack, no final norm (``-2``: the
    penultimate layer, "CLIP skip 2"). ``device``: if given, the module is moved there; tokens always follow the
    weights.

    State dict: ``transformer.text_model.{embeddings,encoder,final_layer_norm}.*``. SD v1.x checkpoints also hold
    ``transformer.text_model.embeddings.position_ids`` (a buffer older transformers saved); here it is a
    non-persistent ``arange`` buffer, so loaders drop that key (``LatentDiffusion`` does).
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version: str = SD_V1_CLIP_VERSION, device: Optional[Union[str, torch.device]] = None,
                 max_length: int = 77, layer: str = "last", layer_idx: Optional[int] = None,
                 config: Optional[Mapping[str, Any]] = None, freeze: bool = True):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if version != SD_V1_CLIP_VERSION:
            raise ValueError(f"version {version!r}: only {SD_V1_CLIP_VERSION!r} is built in (nothing is downloaded); "
                             f"pass config={{...}} for another CLIP text architecture")
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "hidden" and layer_idx is None:
            raise ValueError("layer='hidden' needs layer_idx (e.g. -2 for the penultimate layer)")
        text_config = CLIPTextConfig(**{**CLIP_VIT_L14_TEXT_CONFIG, **dict(config or {})})
        if not 1 <= max_length <= text_config.max_position_embeddings:
            raise ValueError(f"max_length must be in [1, {text_config.max_position_embeddings}], got {max_length}")
        if layer == "hidden" and not -text_config.num_hidden_layers <= layer_idx <= text_config.num_hidden_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range for {text_config.num_hidden_layers} layers")
        self.transformer = _CLIPTextWrapper(CLIPTextModel(text_config))
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        if device is not None:
            self.to(device)
        if freeze:
            self.freeze()

    @classmethod
    def tokenize(cls, text: Texts, max_length: int = 77) -> torch.Tensor:
        """Token ids (B, max_length) int64 as SD v1 feeds them to the text model: 49406, the BPE ids of the
        cleaned, lower-cased text (cut to ``max_length - 2``), 49407, then 49407 up to ``max_length``.
        Needs no weights: ``FrozenCLIPEmbedder.tokenize(["a cat"])``."""
        texts = _as_text_list(text)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start and end tokens), got {max_length}")
        tokenizer = clip_bpe_tokenizer()
        out = torch.full((len(texts), max_length), END_OF_TEXT, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [START_OF_TEXT] + tokenizer.encode(t)[:max_length - 2] + [END_OF_TEXT]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def forward(self, text: Texts) -> torch.Tensor:
        """Prompts -> (B, max_length, hidden) (or (B, 1, hidden) for ``layer="pooled"``)."""
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        tokens = self.tokenize(text, self.max_length).to(device)
        outputs = self.transformer.text_model(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text: Texts) -> torch.Tensor:
        return self(text)
