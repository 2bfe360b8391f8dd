"""Prompt conditions of the T2I pipeline: the Gemma-3 text encoder and its tokenizer, used as
the official T2I sample scripts use them (``tim/models/utils/text_encoders.py``).

:class:`PromptEncoder` turns the prompts of one call into TiM's caption features
(N, L, cap_feat_dim) float32, cut to the longest prompt of the call (BOS included), plus the null
condition (1, L, cap_feat_dim): the features of ``""`` (BOS + padding) at max_length cut to L.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

__all__ = ["PromptEncoder", "load_text_parts"]


def load_text_parts(text_encoder, tokenizer, dtype: str):
    """(Gemma3TextEncoder, CaptionTokenizer) from Hub folders or loaded objects; the tokenizer
    defaults to the text encoder's folder. ``dtype``: Gemma compute dtype name."""
    from tim_jax.encoders.gemma3 import Gemma3TextEncoder
    from tim_jax.encoders.text_encoder import load_tokenizer

    folder = text_encoder if isinstance(text_encoder, (str, os.PathLike)) else None
    if folder is not None:
        text_encoder = Gemma3TextEncoder.from_pretrained(folder, dtype=jnp.dtype(dtype))
    if tokenizer is None:
        if folder is None:
            raise ValueError("give the tokenizer (a Hub folder with tokenizer.json)")
        tokenizer = folder
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return text_encoder, tokenizer


class PromptEncoder:
    """A ``Gemma3TextEncoder`` + ``CaptionTokenizer`` pair.

    Args:
      max_length: tokens per prompt fed to Gemma (official 256; longer prompts are truncated).
      text_batch: prompts per Gemma call; every call has this many rows (padded with ""), so
        Gemma compiles once.
      escape: the official training-time caption escaping (``unicode-escape``).
    """

    def __init__(self, text_encoder, tokenizer, *, max_length: int = 256, text_batch: int = 8,
                 escape: bool = True):
        from flax import nnx

        from tim_jax.encoders.gemma3 import make_encode_fn

        self.tokenizer = tokenizer
        self.hidden_size = int(text_encoder.spec.hidden_size)
        self.vocab_size = int(text_encoder.spec.vocab_size)
        self.max_length, self.text_batch, self.escape = int(max_length), int(text_batch), escape
        graph, self._params = nnx.split(text_encoder)
        self._fn = make_encode_fn(graph)

    def check(self, prompts) -> None:
        """ValueError when a prompt tokenizes to an id outside the encoder's vocabulary (the
        tokenizer and the encoder do not belong together). Compiles nothing."""
        from tim_jax.encoders.text_encoder import escape_caption

        texts = [escape_caption(p) if self.escape else p for p in prompts]
        ids, _ = self.tokenizer(texts, self.max_length)
        if int(ids.max()) >= self.vocab_size:
            raise ValueError(f"a prompt tokenizes to id {int(ids.max())}, outside the text "
                             f"encoder's vocabulary of {self.vocab_size}: the tokenizer and "
                             "the text encoder do not belong together")

    def __call__(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, L, D), null (1, L, D)) float32, L = the longest prompt's token count.
        "" is encoded in the same Gemma calls as the prompts (rows are independent)."""
        from tim_jax.encoders.text_encoder import encode_prompts

        def encoder(ids, mask):
            return self._fn(self._params, ids, mask)

        texts = list(prompts) + [""]
        rows = max(1, min(self.text_batch, len(texts)))
        feats, masks = [], []
        for s in range(0, len(texts), rows):
            chunk = texts[s:s + rows]
            keep = len(chunk)
            f, m = encode_prompts(self.tokenizer, encoder, chunk + [""] * (rows - keep),
                                  max_length=self.max_length, escape=self.escape,
                                  cut_to_longest=False)
            feats.append(f[:keep])
            masks.append(m[:keep])
        feats, masks = np.concatenate(feats), np.concatenate(masks)
        length = int(masks[:-1].sum(-1).max())
        feats = feats[:, :length].astype(np.float32)
        return feats[:-1], feats[-1:]
