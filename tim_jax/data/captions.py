"""T2I caption features cached in the records, and read back as the network's ``cond``.

``python -m tim_jax.prepare --captions FILE --text-encoder FOLDER [--tokenizer FOLDER]`` runs the
official caption path once per record (``tim_jax.encoders.text_encoder``: ``unicode-escape``,
BOS, right padding to 256 tokens, truncation, Gemma-3 ``last_hidden_state``) and stores

    caption_features  (L_i, hidden) float16   the record's own tokens, BOS included (L_i <= 256)

plus, in the output directory, ``null_caption_full.npy`` (256, hidden) float32, the encoded
empty prompt, and ``null_caption.npy``, its first ``L`` rows with ``L = max_i L_i`` over the
directory (``caption_max_tokens`` in the manifest).

Why own-length storage is exact: the encoder follows the official flash-attention padding
(``tim_jax.encoders.gemma3``), so a pad position's feature depends on the pad token only, not
on the prompt or the position, and the BOS row is the same for every prompt. A row padded with
``null[L_i:L]`` is therefore the row the official encoder gives at positions ``< L``.

Batches (:func:`pad_features`): ``cond`` (B, L, hidden) float32, row i = ``features_i`` then
``null[L_i:L]``, with ``L = len(null caption)`` (fixed: one compiled step). The official trainer
cuts each process batch to its longest prompt instead; the two differ only in how many copies of
the (identical) pad feature the unmasked cross-attention sees. Caption dropout (10 % to the null
caption) is the objective's ``label_dropout``, not done here.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from tim_jax import atomic_files

__all__ = ["FEATURES_FIELD", "NULL_CAPTION_FILE", "NULL_CAPTION_FULL_FILE", "CaptionEncoder",
           "text_encoder_settings", "null_caption_ref", "pad_features", "check_null_caption",
           "write_null_captions"]

FEATURES_FIELD = "caption_features"
NULL_CAPTION_FILE = "null_caption.npy"
NULL_CAPTION_FULL_FILE = "null_caption_full.npy"
MAX_LENGTH = 256                  # the official max_seq_length
DTYPES = ("bfloat16", "float32")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_UNSET_PATH = "<set data.path>"


def _null_caption_of(path: str) -> str:
    return os.path.join(path or _UNSET_PATH, NULL_CAPTION_FILE)


def null_caption_ref(data):
    """``data.null_caption`` that follows ``data.path`` (a config FieldReference): always
    ``<data.path>/null_caption.npy`` (``<set data.path>/null_caption.npy`` while the path is
    empty, so the error names the missing field). Setting ``data.null_caption`` replaces it."""
    ref = data.get_ref("path")
    return ref._apply_op(_null_caption_of)  # the op behind FieldReference's own + and *


def _sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def text_encoder_settings(encoder_folder: str, tokenizer_folder: str, dtype: str) -> dict:
    """What decides the stored features: the Gemma-3 config / weight files, the tokenizer files,
    the compute dtype and the official tokenisation. ValueError names a bad folder. No JAX."""
    from tim_jax.encoders import hub

    if dtype not in DTYPES:
        raise ValueError(f"text encoder dtype {dtype!r}: expected one of {DTYPES}")
    try:
        config = hub.read_config(encoder_folder)
        weights = hub.weight_files(encoder_folder)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"--text-encoder: {exc}") from None
    if config.get("model_type") != "gemma3_text" or not config.get("hidden_size"):
        raise ValueError(f"--text-encoder {encoder_folder}: expected a Gemma-3 text model folder "
                         f"(config.json model_type 'gemma3_text'), got "
                         f"{config.get('model_type')!r}")
    tok = Path(tokenizer_folder)
    if not (tok / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer {tokenizer_folder}: no tokenizer.json there")
    return {"model_type": "gemma3_text", "hidden_size": int(config["hidden_size"]),
            "config_sha256": hashlib.sha256(
                (Path(encoder_folder) / "config.json").read_bytes()).hexdigest(),
            "weights": [[w.name, w.stat().st_size] for w in weights],
            "tokenizer_sha256": _sha256_files([tok / n for n in _TOKENIZER_FILES
                                               if (tok / n).is_file()]),
            "dtype": dtype, "max_length": MAX_LENGTH, "escape": "unicode-escape",
            "feature": "last_hidden_state", "storage_dtype": "float16"}


class CaptionEncoder:
    """The official caption path over a 1-D mesh of local devices (axis ``"data"``).

    ``encode(captions)`` -> one (L_i, hidden) array per caption: its own tokens' features
    (``L_i`` = its token count, BOS included, at most 256). Every call runs full (batch_size,
    256) batches (one compiled shape; short chunks are padded with empty prompts).
    ``null()`` -> (256, hidden) float32, the empty prompt.
    """

    def __init__(self, encoder_folder: str, tokenizer_folder: str, *, dtype: str = "bfloat16",
                 batch_size: int = 64, devices=None, compiler_options: dict | None = None):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        from tim_jax.encoders.gemma3 import Gemma3TextEncoder
        from tim_jax.encoders.text_encoder import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_folder)
        module = Gemma3TextEncoder.from_pretrained(encoder_folder, dtype=getattr(jnp, dtype))
        self.vocab_size, self.hidden_size = module.spec.vocab_size, module.spec.hidden_size
        graphdef, params = nnx.split(module)
        devices = list(devices) if devices is not None else jax.local_devices()
        self.batch_size = max(1, math.ceil(batch_size / len(devices))) * len(devices)
        mesh = Mesh(np.asarray(devices), ("data",))
        self._rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        self._params = jax.device_put(params, replicated)
        self._put = jax.device_put
        kwargs = {"compiler_options": compiler_options} if compiler_options else {}
        self._fn = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p)(ids, mask),
                           in_shardings=(replicated, self._rows, self._rows),
                           out_shardings=self._rows, **kwargs)

    def _run(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.tokenizer(texts + [""] * (self.batch_size - len(texts)), MAX_LENGTH)
        if int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= the text encoder's vocab_size "
                             f"{self.vocab_size}: --tokenizer does not match --text-encoder")
        feats = self._fn(self._params, self._put(ids, self._rows), self._put(mask, self._rows))
        return np.asarray(feats, np.float32)[:len(texts)], mask.sum(-1)[:len(texts)]

    def encode(self, captions: Sequence[str], dtype=np.float32) -> list[np.ndarray]:
        """One (L_i, hidden) array of ``dtype`` per caption (a copy: the batch is freed; a value
        beyond float16's range becomes inf, which the caller checks)."""
        from tim_jax.encoders.text_encoder import escape_caption

        out = []
        for start in range(0, len(captions), self.batch_size):
            chunk = [escape_caption(c) for c in captions[start:start + self.batch_size]]
            feats, lengths = self._run(chunk)
            with np.errstate(over="ignore"):
                out.extend(feats[i, :int(n)].astype(dtype) for i, n in enumerate(lengths))
        return out

    def null(self) -> np.ndarray:
        return self._run([""])[0][0]


def write_null_captions(out_dir: str, null_full: np.ndarray, length: int) -> None:
    """``null_caption_full.npy`` (256, hidden) and ``null_caption.npy`` (its first ``length``
    rows), float32, written atomically."""
    if not 1 <= length <= len(null_full):
        raise ValueError(f"caption length {length} outside [1, {len(null_full)}]")
    for name, arr in ((NULL_CAPTION_FULL_FILE, null_full), (NULL_CAPTION_FILE, null_full[:length])):
        atomic_files.save_npy(os.path.join(out_dir, name), np.ascontiguousarray(arr, np.float32))


def pad_features(features: Sequence[np.ndarray], null: np.ndarray, ids=None,
                 where: str = "") -> np.ndarray:
    """Records' (L_i, D) caption features -> the batch ``cond`` (B, L, D) float32, L = len(null):
    row i is ``features[i]`` then ``null[L_i:]`` (the pad-token features)."""
    length, dim = null.shape
    out = np.empty((len(features), length, dim), np.float32)
    for i, f in enumerate(features):
        n = f.shape[0]
        if f.ndim != 2 or f.shape[1] != dim or not 1 <= n <= length:
            rid = i if ids is None else int(ids[i])
            raise ValueError(f"{where}: record {rid} has caption features {f.shape}; the null "
                             f"caption (data.null_caption) is ({length}, {dim}): a record may "
                             f"have 1..{length} tokens of width {dim}")
        out[i, :n] = f
        out[i, n:] = null[n:]
    return out


def check_null_caption(null: np.ndarray, first_features: np.ndarray, where: str) -> None:
    """ValueError unless ``null`` comes from the records' text encoder: every prompt starts with
    the same BOS feature, so row 0 of any record equals ``null[0]`` up to float16 rounding."""
    a = np.asarray(first_features[0], np.float32)
    b = np.asarray(null[0], np.float32)
    tol = 2.0 ** -10 * np.abs(b) + 1e-3 * max(float(np.abs(b).max()), 1e-30)
    if a.shape != b.shape or not (np.abs(a - b) <= tol).all():
        raise ValueError(f"data.null_caption does not match the caption features in {where!r} "
                         "(the BOS feature differs): use the null_caption.npy that "
                         "`python -m tim_jax.prepare` wrote into that directory")
