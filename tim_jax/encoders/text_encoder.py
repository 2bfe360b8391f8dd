"""TiM-T2I caption features: the official tokenisation and Gemma-3 feature extraction.

What the official PyTorch code (WZDTHU/TiM, ``tim/models/utils/text_encoders.py`` and the T2I
trainer/samplers) does, reproduced here:

- Captions are escaped with ``caption.encode('unicode-escape').decode('utf-8')`` before
  tokenising in the training data loader (``tim/data/t2i_data.py``) and in the GenEval sampler
  (non-ASCII characters become ``\\xe9``/``\\u2014`` text, a newline becomes ``\\n`` text, a
  backslash is doubled). The MJHQ-30K and DPG-Bench samplers pass prompts unescaped. Here
  ``escape=True`` (the training-time form) is the default.
- Tokeniser: the Gemma tokenizer with BOS prepended, ``padding="max_length"``,
  ``max_length=256``, ``truncation=True`` and ``padding_side="right"`` (forced by the official
  loader whatever tokenizer_config.json says).
- Features: ``last_hidden_state`` of the Gemma-3 decoder (after the final norm) over the whole
  padded batch, then cut to the longest prompt of the batch, ``L_cut = max(mask.sum(-1))``
  tokens (BOS included). Pad positions inside ``L_cut`` keep their features (TiM's
  cross-attention has no mask); see ``gemma3.py`` for what those are.
- Null condition: the empty prompt ``""`` (BOS then padding), encoded once at max_length and
  cut to the same ``L_cut`` as the batch, repeated over the batch. 10% of training captions
  are replaced by ``""``.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tim_jax.encoders.gemma3 import make_encode_fn

MAX_LENGTH = 256


def escape_caption(text: str) -> str:
    """The official caption escaping: Python's ``unicode-escape`` codec, read back as text."""
    return text.encode("unicode-escape").decode("utf-8")


class CaptionTokenizer:
    """A ``tokenizers.Tokenizer`` (from tokenizer.json) used as transformers' fast Gemma
    tokenizer with the official settings: special ids ``head`` (BOS) before and ``tail`` after
    the text, truncation to ``max_length`` keeping them, right padding with ``pad_id``."""

    def __init__(self, tokenizer, *, pad_id: int, head=(), tail=(),
                 truncation_side: str = "right"):
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.pad_id, self.head, self.tail = pad_id, list(head), list(tail)
        self.truncation_side = truncation_side

    def __call__(self, texts, max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), each (B, max_length) int32, right-padded."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must all be strings")
        room = max_length - len(self.head) - len(self.tail)
        if room < 0:
            raise ValueError(f"max_length {max_length} cannot hold the special tokens")
        ids = np.full((len(texts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for i, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            body = enc.ids
            if len(body) > room:
                body = body[:room] if self.truncation_side == "right" else body[len(body) - room:]
            row = self.head + list(body) + self.tail
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask


def _token_content(value):
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(folder) -> CaptionTokenizer:
    """The tokenizer of a Hub folder: ``tokenizer.json`` (required) plus tokenizer_config.json /
    special_tokens_map.json for the pad/bos/eos tokens and add_bos_token (default True) /
    add_eos_token (default False), as transformers' Gemma tokenizer reads them; without either
    flag, the specials that tokenizer.json's post-processor adds."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    if not path.is_file():
        hint = ""
        if (folder / "tokenizer.model").is_file():
            hint = (" It has only the SentencePiece tokenizer.model: convert it once with "
                    "transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder), "
                    "which needs sentencepiece and protobuf) to write tokenizer.json.")
        raise FileNotFoundError(f"{folder} has no tokenizer.json.{hint}")
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (folder / name).is_file():
            config.update(json.loads((folder / name).read_text()))
    tok = Tokenizer.from_file(str(path))

    def token_id(key, default):
        content = _token_content(config.get(key, default))
        if content is None:
            return None
        tid = tok.token_to_id(content)
        if tid is None:
            raise ValueError(f"{folder}: {key} {content!r} is not in tokenizer.json's vocabulary")
        return tid

    pad_id = token_id("pad_token", "<pad>")
    if pad_id is None:
        raise ValueError(f"{folder}: the tokenizer has no pad_token; padding to max_length "
                         "needs one")
    if "add_bos_token" in config or "add_eos_token" in config or tok.post_processor is None:
        bos = token_id("bos_token", "<bos>") if config.get("add_bos_token", True) else None
        eos = token_id("eos_token", "<eos>") if config.get("add_eos_token", False) else None
        head, tail = [bos] if bos is not None else [], [eos] if eos is not None else []
    else:  # no explicit flags: the specials of tokenizer.json's own post-processor
        head, tail = _post_processor_specials(tok)
    return CaptionTokenizer(tok, pad_id=pad_id, head=head, tail=tail,
                            truncation_side=config.get("truncation_side", "right"))


def _post_processor_specials(tok) -> tuple[list, list]:
    """The ids a tokenizer's post-processor puts before and after one sequence."""
    probe = "a"
    body = tok.encode(probe, add_special_tokens=False).ids
    full = tok.encode(probe, add_special_tokens=True).ids
    for i in range(len(full) - len(body) + 1):
        if full[i:i + len(body)] == body:
            return full[:i], full[i + len(body):]
    raise ValueError("cannot tell which special tokens the tokenizer's post-processor adds")


def _run(encoder, ids, mask):
    """encoder(ids, mask) as float32 numpy; an nnx module runs through one jitted pure call."""
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    if isinstance(encoder, nnx.Module):
        vocab = getattr(getattr(encoder, "spec", None), "vocab_size", None)
        if vocab is not None and int(ids.max()) >= vocab:
            raise ValueError(f"token id {int(ids.max())} >= the encoder's vocab_size {vocab}: "
                             "tokenizer and model do not match")
        graphdef, params = nnx.split(encoder)
        return np.asarray(make_encode_fn(graphdef)(params, ids, mask), np.float32)
    return np.asarray(encoder(ids, mask), np.float32)


def encode_prompts(tokenizer: CaptionTokenizer, encoder, prompts, *,
                   max_length: int = MAX_LENGTH, escape: bool = True,
                   cut_to_longest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Caption features as the official T2I code makes them.

    ``encoder(input_ids, attention_mask) -> (B, L, hidden)`` (a Gemma3TextEncoder or its jitted
    pure form). Returns features (B, L_cut, hidden) float32 and the token mask (B, L_cut) int32,
    with L_cut = the longest prompt's token count (BOS included) if ``cut_to_longest``, else
    max_length. The encoder runs on the full max_length batch (one shape, one compile)."""
    prompts = [escape_caption(p) if escape else p for p in prompts]
    ids, mask = tokenizer(prompts, max_length)
    feats = _run(encoder, ids, mask)
    length = int(mask.sum(-1).max()) if cut_to_longest else max_length
    return feats[:, :length], mask[:, :length]


def null_features(tokenizer: CaptionTokenizer, encoder, length: int, *, batch_size: int = 1,
                  max_length: int = MAX_LENGTH) -> np.ndarray:
    """The null condition: features of ``""`` (BOS + padding) at max_length, cut to ``length``
    (the batch's L_cut) and repeated to (batch_size, length, hidden) float32."""
    if not 1 <= length <= max_length:
        raise ValueError(f"length must be in [1, {max_length}], got {length}")
    ids, mask = tokenizer([""], max_length)
    feats = _run(encoder, ids, mask)[:, :length]
    return np.repeat(feats, batch_size, axis=0)
