"""Gemma-3 text decoder stack (``Gemma3ForCausalLM.model``) as a feature encoder, in Flax NNX.

TiM's text-to-image model conditions on ``last_hidden_state`` of google/gemma-3-1b-it: the
output after the final RMSNorm ``model.norm``, (B, L, hidden) (hidden = 1152 for the 1B model).

    enc = Gemma3TextEncoder.from_pretrained(folder)          # config.json + *.safetensors
    feats = enc(input_ids, attention_mask)                     # (B, L, hidden) float32
    graphdef, params = nnx.split(enc); fn = make_encode_fn(graphdef)
    feats = fn(params, input_ids, attention_mask)              # the same, jitted, pure

Architecture read from the config: token embedding times sqrt(hidden) (the scale is rounded to
the compute dtype first, as transformers rounds it to the weight dtype: 34.0 instead of 33.94
for hidden 1152 in bfloat16, the dtype the official code runs Gemma in); per layer
``h += post_attn_norm(attn(input_norm(h)))`` then ``h += post_ff_norm(mlp(pre_ff_norm(h)))``;
(1 + w) RMSNorms in float32; grouped-query attention with RMSNorm on q and k (per head), RoPE
(base per layer type), scale ``query_pre_attn_scalar ** -0.5``; sliding-window layers see keys
with ``q - k < sliding_window``; gelu-tanh gated MLP. ``attn_logit_softcapping`` is ignored, as
transformers' Gemma3 attention ignores it (it never passes it to the attention function, in
4.5x and 5.x; Gemma-3 configs set it to null anyway).

Padded positions (attention_mask == 0). The official TiM code runs transformers with
``attn_implementation="flash_attention_2"`` and right padding. transformers then unpads q/k/v
(flash-attn varlen: each row's valid tokens form one sequence) and scatters the result back
into a zero tensor, so a PAD QUERY ROW GETS AN ATTENTION OUTPUT OF EXACTLY ZERO. That zero still
goes through ``o_proj`` (its bias, if any), ``post_attention_layernorm`` (RMSNorm(0) = 0) and the
residual, and the pad row's own MLP branch runs as usual. So, without attention bias, a pad
position's feature is ``norm(e + sum over layers of post_ff_norm(mlp(pre_ff_norm(h))))`` with
e the scaled embedding of the pad token: it depends on the pad token only, not on the prompt.
This module reproduces that; valid positions attend to the valid keys of their row (causal,
windowed by the row's valid-token index, as varlen flash attention does). TiM's cross
attention has no mask and reads these pad features, so they matter. (Eager/SDPA attention
gives pad rows other values; io.npz fixtures made with eager attention agree at valid
positions only.)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tim_jax.encoders import hub

LAYER_TYPES = ("sliding_attention", "full_attention")
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")


@dataclasses.dataclass(frozen=True)
class Gemma3TextSpec:
    """The architecture fields of a ``gemma3_text`` config, normalised across transformers
    versions. ``rope`` = ((layer_type, theta, linear_factor), ...) (a tuple: the spec is
    static, hashable graph data)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    sliding_window: int | None
    layer_types: tuple[str, ...]
    rope: tuple
    attention_bias: bool
    approximate_gelu: bool


def _rope_entry(params: dict, where: str) -> tuple[float, float]:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(params["rope_theta"]), 1.0
    if kind == "linear":
        return float(params["rope_theta"]), float(params["factor"])
    raise NotImplementedError(f"{where}: rope_type {kind!r} is not supported (only 'default' "
                              "and 'linear')")


def parse_config(config: dict) -> Gemma3TextSpec:
    """Normalise a ``gemma3_text`` config dict of transformers 4.5x (``rope_theta``,
    ``rope_local_base_freq``, ``sliding_window_pattern``, ``rope_scaling`` for full-attention
    layers) or 5.x (``layer_types``, ``rope_parameters`` keyed by layer type). Missing optional
    keys take transformers' Gemma3TextConfig defaults. ValueError on anything unsupported."""
    mt = config.get("model_type")
    if mt != "gemma3_text":
        raise ValueError(f"expected a config with model_type 'gemma3_text' (Gemma3ForCausalLM), "
                         f"got {mt!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in config:
            raise ValueError(f"gemma3_text config lacks {key!r}")
    n = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")
    layer_types = config.get("layer_types")
    if layer_types is None:
        pattern = int(config.get("sliding_window_pattern",
                                 config.get("_sliding_window_pattern", 6)))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                       for i in range(n)]
    layer_types = tuple(layer_types)
    if len(layer_types) != n or any(t not in LAYER_TYPES for t in layer_types):
        raise ValueError(f"layer_types must be {n} entries of {LAYER_TYPES}, got {layer_types}")
    rp = config.get("rope_parameters")
    if rp is not None:
        if not all(isinstance(rp.get(t), dict) for t in set(layer_types)):
            raise ValueError("rope_parameters must be a dict keyed by layer type "
                             f"({sorted(set(layer_types))}), got {rp}")
        rope = {t: _rope_entry(rp[t], f"rope_parameters[{t!r}]") for t in LAYER_TYPES
                if t in layer_types}
    else:
        scaling = dict(config.get("rope_scaling") or {"rope_type": "default"})
        scaling["rope_theta"] = config.get("rope_theta", 1_000_000.0)
        rope = {"full_attention": _rope_entry(scaling, "rope_scaling"),
                "sliding_attention": (float(config.get("rope_local_base_freq", 10_000.0)), 1.0)}
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _TANH_GELU and act != "gelu":
        raise ValueError(f"hidden_activation {act!r} is not supported (gelu_pytorch_tanh, gelu)")
    sw = config.get("sliding_window")
    if "sliding_attention" in layer_types and not sw:
        raise ValueError("config has sliding_attention layers but no sliding_window")
    if config.get("use_bidirectional_attention"):
        raise NotImplementedError("use_bidirectional_attention=True is not supported (Gemma-3 "
                                  "text encoders are causal)")
    return Gemma3TextSpec(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), num_layers=n, num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        query_pre_attn_scalar=float(config.get("query_pre_attn_scalar", 256)),
        sliding_window=int(sw) if sw else None, layer_types=layer_types,
        rope=tuple((t, *rope[t]) for t in LAYER_TYPES if t in layer_types),
        attention_bias=bool(config.get("attention_bias", False)),
        approximate_gelu=act in _TANH_GELU)


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: ``x / sqrt(mean(x^2) + eps) * (1 + w)`` in float32, cast back to x.dtype.
    ``w`` (dim,) starts at zero."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, factor: float, dtype):
    """cos, sin (..., L, head_dim) for integer positions (..., L); the frequencies are computed
    in float32 as transformers does, halves duplicated (rotate-half convention)."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / jnp.power(jnp.float32(theta), exponent) / jnp.float32(factor)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x (B, L, heads, D); cos/sin (B, L, D)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_allowed(valid, layer_type: str, sliding_window):
    """Boolean (B, Lq, Lk): which keys each query row may see, as varlen flash attention does
    for rows of valid tokens: valid keys only, causal, and on sliding layers a window measured
    in valid-token index (``q - k < sliding_window``; the same as position for right padding)."""
    L = valid.shape[-1]
    pos = jnp.arange(L)
    allowed = valid[:, None, :] & (pos[None, :, None] >= pos[None, None, :])
    if layer_type == "sliding_attention":
        idx = jnp.cumsum(valid.astype(jnp.int32), axis=-1)  # valid-token index (+1)
        allowed = allowed & (idx[:, :, None] - idx[:, None, :] < sliding_window)
    return allowed


class Gemma3Attention(nnx.Module):
    """Grouped-query self-attention with q/k RMSNorm and RoPE. Query rows whose token is padding
    get a zero attention output before ``o_proj`` (flash-attention-2 unpadding)."""

    def __init__(self, spec: Gemma3TextSpec, layer_type: str, *, dtype, rngs: nnx.Rngs):
        H, K, D, E = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
        lin = dict(use_bias=spec.attention_bias, dtype=dtype, param_dtype=jnp.float32,
                   precision=_precision(dtype), rngs=rngs)
        self.q_proj = nnx.Linear(E, H * D, **lin)
        self.k_proj = nnx.Linear(E, K * D, **lin)
        self.v_proj = nnx.Linear(E, K * D, **lin)
        self.o_proj = nnx.Linear(H * D, E, **lin)
        self.q_norm = RMSNorm(D, spec.rms_norm_eps)
        self.k_norm = RMSNorm(D, spec.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = H, K, D
        self.layer_type = layer_type
        self.scale = spec.query_pre_attn_scalar ** -0.5
        self.window = spec.sliding_window
        self.dtype = dtype

    def __call__(self, x, cos, sin, valid):
        B, L, _ = x.shape
        H, K, D = self.heads, self.kv_heads, self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).reshape(B, L, H, D)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(B, L, K, D)), cos, sin)
        v = self.v_proj(x).reshape(B, L, K, D)
        q = q.reshape(B, L, K, H // K, D)  # head h = kv * (H // K) + g, as repeat_kv
        prec = _precision(self.dtype)
        s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, precision=prec,
                       preferred_element_type=jnp.float32) * self.scale
        allowed = attention_allowed(valid, self.layer_type, self.window)
        s = jnp.where(allowed[:, None, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(self.dtype)
        o = jnp.einsum("bkgqs,bskd->bqkgd", p, v, precision=prec)
        o = jnp.where(valid[:, :, None, None, None], o, 0).reshape(B, L, H * D)
        return self.o_proj(o)


class Gemma3MLP(nnx.Module):
    """``down(gelu(gate(x)) * up(x))``, gelu with the tanh approximation (gelu_pytorch_tanh)."""

    def __init__(self, spec: Gemma3TextSpec, *, dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                   precision=_precision(dtype), rngs=rngs)
        E, F = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nnx.Linear(E, F, **lin)
        self.up_proj = nnx.Linear(E, F, **lin)
        self.down_proj = nnx.Linear(F, E, **lin)
        self.approximate = spec.approximate_gelu

    def __call__(self, x):
        gate = jax.nn.gelu(self.gate_proj(x), approximate=self.approximate)
        return self.down_proj(gate * self.up_proj(x))


class Gemma3DecoderLayer(nnx.Module):
    """One sandwich-norm decoder layer; ``layer_type`` picks the mask and the RoPE base."""

    def __init__(self, spec: Gemma3TextSpec, layer_type: str, *, dtype, rngs: nnx.Rngs):
        eps, E = spec.rms_norm_eps, spec.hidden_size
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(E, eps)
        self.self_attn = Gemma3Attention(spec, layer_type, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(E, eps)
        self.pre_feedforward_layernorm = RMSNorm(E, eps)
        self.mlp = Gemma3MLP(spec, dtype=dtype, rngs=rngs)
        self.post_feedforward_layernorm = RMSNorm(E, eps)

    def __call__(self, h, cos, sin, valid):
        h = h + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(h), cos, sin, valid))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3TextEncoder(nnx.Module):
    """Gemma-3 decoder stack: ``(input_ids (B, L) int, attention_mask (B, L) 0/1) ->
    last_hidden_state (B, L, hidden) float32`` (after the final norm). Params float32; ``dtype``
    is the compute dtype (float32 default, bfloat16 as the official code runs it). Positions are
    0..L-1 for every row (transformers' default position_ids)."""

    def __init__(self, config: dict, *, dtype=jnp.float32, rngs: nnx.Rngs | int = 0):
        rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
        spec = parse_config(config)
        self.spec = spec
        self.dtype = dtype
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (spec.vocab_size, spec.hidden_size)) * 0.02)
        self.layers = nnx.List([Gemma3DecoderLayer(spec, t, dtype=dtype, rngs=rngs)
                                for t in spec.layer_types])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def __call__(self, input_ids, attention_mask=None):
        spec = self.spec
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                             f"{input_ids.shape}")
        if not isinstance(input_ids, jax.core.Tracer):
            top = int(np.max(np.asarray(input_ids), initial=0))
            if top >= spec.vocab_size or int(np.min(np.asarray(input_ids), initial=0)) < 0:
                raise ValueError(f"input_ids must lie in [0, {spec.vocab_size}) (vocab_size), "
                                 f"got max {top}: tokenizer and model do not match")
        valid = attention_mask.astype(bool)
        scale = jnp.asarray(math.sqrt(spec.hidden_size), self.dtype)
        h = jnp.take(self.embed_tokens[...], input_ids.astype(jnp.int32), axis=0)
        h = h.astype(self.dtype) * scale
        B, L = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(L), (B, L))
        tables = {t: rope_tables(positions, spec.head_dim, theta, factor, self.dtype)
                  for t, theta, factor in spec.rope}
        for layer in self.layers:
            h = layer(h, *tables[layer.layer_type], valid)
        return self.norm(h).astype(jnp.float32)

    @classmethod
    def from_pretrained(cls, folder, dtype=jnp.float32) -> "Gemma3TextEncoder":
        """Load a Hub folder written by ``Gemma3ForCausalLM.save_pretrained`` (config.json +
        model.safetensors or shards). Keys with or without the ``model.`` prefix;
        ``lm_head.weight`` is ignored. KeyError/ValueError name missing, unused or misshaped
        tensors."""
        config = hub.read_config(folder)
        abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        pure = nnx.to_pure_dict(state)
        flat = _flatten(pure)
        loaded = _map_weights(hub.read_weights(folder), flat, folder)
        nnx.replace_by_pure_dict(state, _unflatten(loaded))
        return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=16)
def make_encode_fn(graphdef: nnx.GraphDef):
    """Jitted pure ``fn(params, input_ids, attention_mask) -> (B, L, hidden) float32`` for
    ``graphdef, params = nnx.split(encoder)`` (cached per graphdef)."""

    @jax.jit
    def encode(params, input_ids, attention_mask):
        return nnx.merge(graphdef, params)(input_ids, attention_mask)

    return encode


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat):
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _torch_name(path) -> tuple[str, bool]:
    """HF tensor name (without ``model.``) of one param path, and whether it is transposed."""
    *mods, leaf = [str(p) for p in path]
    if mods == [] and leaf == "embed_tokens":
        return "embed_tokens.weight", False
    if leaf == "kernel":
        return ".".join(mods) + ".weight", True
    return ".".join(mods + [leaf]), False


def _map_weights(weights: dict, flat: dict, folder) -> dict:
    """Fill the abstract param paths of ``flat`` from HF tensors; clear errors on mismatch."""
    tensors = {}
    for name in list(weights):  # pop: each numpy array is freed once copied to the device
        arr = weights.pop(name)
        if name != "lm_head.weight":
            tensors[name[len("model."):] if name.startswith("model.") else name] = arr
    out, missing = {}, []
    for path, abstract in flat.items():
        name, transpose = _torch_name(path)
        if name not in tensors:
            missing.append("model." + name)
            continue
        arr = np.asarray(tensors.pop(name), np.float32)
        arr = arr.T if transpose else arr
        if arr.shape != tuple(abstract.shape):
            got, want = arr.shape, tuple(abstract.shape)
            if transpose:  # report in the file's (out, in) layout
                got, want = got[::-1], want[::-1]
            raise ValueError(f"{folder}: tensor model.{name} has shape {got}, the config "
                             f"implies {want}")
        out[path] = jnp.asarray(arr)
    if missing:
        raise KeyError(f"{folder}: weights lack {len(missing)} tensors the config needs, e.g. "
                       f"{missing[:5]}")
    if tensors:
        raise ValueError(f"{folder}: {len(tensors)} tensors are not used by a gemma3_text "
                         f"decoder, e.g. {sorted(tensors)[:5]}")
    return out


def parity_check(folder) -> dict:
    """Run the encoder of a fixture folder (config + weights + ``io.npz`` with input_ids,
    attention_mask, last_hidden_state) and compare at positions where attention_mask == 1.
    Returns max_abs, max_rel (= max_abs / max|ref|), ref_scale, n_valid."""
    folder = Path(folder)
    io_path = folder / "io.npz"
    if not io_path.is_file():
        raise FileNotFoundError(f"{folder} has no io.npz")
    io = np.load(io_path)
    graphdef, params = nnx.split(Gemma3TextEncoder.from_pretrained(folder))
    out = np.asarray(make_encode_fn(graphdef)(params, jnp.asarray(io["input_ids"], jnp.int32),
                                              jnp.asarray(io["attention_mask"], jnp.int32)))
    valid = io["attention_mask"].astype(bool)
    ref = io["last_hidden_state"][valid]
    diff = np.abs(out[valid] - ref)
    scale = float(np.abs(ref).max())
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale,
            "ref_scale": scale, "n_valid": int(valid.sum())}
