"""Official TiM network sizes, the model-config schema and ``build_model``.

Presets (every value checked against ``configs/{c2i,t2i}/*.yaml`` of WZDTHU/TiM and the
constructor defaults of ``tim/models/{c2i,t2i}/tim_model.py``; parameter counts include the REPA
projector and the null-class row):

    name          kind  latent (H=W x C)     patch  depth  D     heads  lora  enc  params
    c2i_b4_256    c2i   32 x 4   (SD-VAE)    4      12     768   12     256   4    136,173,120
    c2i_b2_256    c2i   32 x 4   (SD-VAE)    2      12     768   12     256   4    136,099,344
    c2i_l2_256    c2i   32 x 4   (SD-VAE)    2      24     1024  16     384*  8*   467,015,408
    c2i_xl2_256   c2i   32 x 4   (SD-VAE)    2      28     1152  16     384   8    672,259,344
    c2i_xl1_512   c2i   16 x 32  (DC-AE)     1      28     1152  16     384   8    672,296,224
    t2i_xl1       t2i   16 x 32  (DC-AE)     1      28     1152  16     384   8    873,109,408
    c2i_tiny      c2i   8 x 4                2      3      64     4     24    2    305,660 (parity fixture)
    t2i_tiny      t2i   8 x 4                2      2      64     4     24    1    314,840 (tests; cap_feat_dim 48)

Common to the official presets: mlp_ratio 4, projector_dim 2048, z_dim 768 (RADIO-v2.5-B),
new_condition 't-r', use_new_embed, distance_aware, qk_norm; c2i: 1000 classes +
class_dropout_prob 0.1 (adds the null row); t2i: cap_feat_dim 1152 (Gemma-3-1B hidden size).
(*) There is no official L/2 config: L/2 uses the standard DiT-L size (depth 24, D 1024, 16
heads) with our choice lora_hidden_size 384 and encoder_depth 8 (REPA's L setting); B/2 is B/4
with patch 2. ``t2i`` input_size is only the default sample size: the networks accept any
H, W divisible by the patch size.

Model-config fields (``config.model``; official constructor names plus JAX knobs):

    kind               'c2i' | 't2i'
    input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
    lora_hidden_size, encoder_depth, projector_dim, z_dim, new_condition, use_new_embed,
    distance_aware, qk_norm                                 (official meaning)
    num_classes, class_dropout_prob                         (c2i only)
    cap_feat_dim                                            (t2i only)
    dtype              compute dtype 'float32' | 'bfloat16' (params always float32)
    scan_blocks        stack the blocks on a leading 'layers' axis and run them with lax.scan
    remat              per-block remat: 'none' | 'full' | 'dots' | 'dots_no_batch' (+ aliases,
                       see backbone.REMAT_POLICIES)
    attention_impl     name registered in tim_jax.models.attention ('xla', 'xla_softmax',
                       'dot_product', 'cudnn', ...)
    matmul_precision   'default' | 'high' | 'highest': jax.lax.Precision of the weight matmuls
                       (linears, patch embedding). The attention einsums use JAX's default; for
                       exact fp32 everywhere on TPU/GPU also run under
                       ``jax.default_matmul_precision("highest")``.

Logical axis names on the params (``nnx.Param`` metadata ``out_sharding``; map them to mesh axes
with the sharding rules, e.g. ``config.sharding_rules``):
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections
from flax import nnx

from tim_jax.models.c2i import TiMC2I
from tim_jax.models.t2i import TiMT2I

# Every logical axis name used on a parameter, and what the dim is.
LOGICAL_AXES: dict[str, str] = {
    "embed": "the token width D (rows of most kernels, biases/outputs of D-wide layers, the "
             "adaLN modulation outputs 6D/9D/2D)",
    "mlp": "hidden width of a SwiGLU/MLP (block MLP, adaLN bottleneck lora_hidden_size, fused "
           "fc1 = 2*hidden, caption SwiGLU 4D, the second time-embedder linear's input)",
    "heads": "fused attention projections: qkv / qkv_d outputs (3D, ordered (3, heads, head_dim)), "
             "cross-attention q output, attention-output proj input (D = heads*head_dim)",
    "kv": "cross-attention fused kv output (2D, ordered (2, heads, head_dim))",
    "proj": "REPA projector hidden width (projector_dim)",
    "vocab": "label-table rows (num_classes + null)",
    "patch": "patch dims: the C_in dim of the patch-embedding kernel (p, p, C_in, D) and the "
             "p*p*C output of the final linear",
    "cond": "caption feature dim cap_feat_dim (t2i caption embedder input)",
    "norm": "LayerNorm scale/bias vectors (QK-norm head_dim)",
    "layers": "the stacked block axis (scan_blocks=True only; leading dim of every block param)",
}
__doc__ += "\n".join(f"    {k:8s} {v}" for k, v in LOGICAL_AXES.items()) + \
    "\n    None     replicated (small dims: the 256-dim sinusoid input, z_dim, patch kernel p x p)\n"

# tim_jax-only fields of config.model and their defaults.
JAX_KNOBS = dict(dtype="float32", scan_blocks=False, remat="none", attention_impl="xla",
                 matmul_precision="default")
_JAX_KNOBS = JAX_KNOBS
_COMMON = dict(mlp_ratio=4.0, projector_dim=2048, z_dim=768, new_condition="t-r",
               use_new_embed=True, distance_aware=True, qk_norm=True)
_C2I = dict(kind="c2i", num_classes=1000, class_dropout_prob=0.1)
_T2I = dict(kind="t2i", cap_feat_dim=1152)
_XL = dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8, lora_hidden_size=384)
_B = dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4, lora_hidden_size=256)
_SD_VAE_256 = dict(input_size=32, in_channels=4)
_DC_AE_512 = dict(input_size=16, in_channels=32)

PRESETS: dict[str, dict[str, Any]] = {
    "c2i_b4_256": {**_C2I, **_COMMON, **_B, **_SD_VAE_256, "patch_size": 4},
    "c2i_b2_256": {**_C2I, **_COMMON, **_B, **_SD_VAE_256, "patch_size": 2},
    "c2i_l2_256": {**_C2I, **_COMMON, **_SD_VAE_256, "patch_size": 2, "depth": 24,
                   "hidden_size": 1024, "num_heads": 16, "encoder_depth": 8,
                   "lora_hidden_size": 384},
    "c2i_xl2_256": {**_C2I, **_COMMON, **_XL, **_SD_VAE_256, "patch_size": 2},
    "c2i_xl1_512": {**_C2I, **_COMMON, **_XL, **_DC_AE_512, "patch_size": 1},
    "t2i_xl1": {**_T2I, **_COMMON, **_XL, **_DC_AE_512, "patch_size": 1},
    # Tiny sizes for tests / debugging. c2i_tiny = tests/fixtures/parity/c2i_tiny/config.json.
    "c2i_tiny": {**_COMMON, "kind": "c2i", "num_classes": 10, "class_dropout_prob": 0.1,
                 "input_size": 8, "in_channels": 4, "patch_size": 2, "depth": 3,
                 "hidden_size": 64, "num_heads": 4, "encoder_depth": 2, "lora_hidden_size": 24,
                 "projector_dim": 128, "z_dim": 32},
    "t2i_tiny": {**_COMMON, "kind": "t2i", "cap_feat_dim": 48, "input_size": 8,
                 "in_channels": 4, "patch_size": 2, "depth": 2, "hidden_size": 64,
                 "num_heads": 4, "encoder_depth": 1, "lora_hidden_size": 24,
                 "projector_dim": 128, "z_dim": 32},
}

_MODEL_CLASSES = {"c2i": TiMC2I, "t2i": TiMT2I}
_SHARED_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                  "num_heads", "mlp_ratio", "lora_hidden_size", "encoder_depth", "projector_dim",
                  "z_dim", "new_condition", "use_new_embed", "distance_aware", "qk_norm",
                  *_JAX_KNOBS)
FIELDS = {
    "c2i": frozenset(("kind", *_SHARED_FIELDS, "num_classes", "class_dropout_prob")),
    "t2i": frozenset(("kind", *_SHARED_FIELDS, "cap_feat_dim")),
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def knobs_of(model_cfg) -> dict[str, Any]:
    """The JAX-knob fields (``JAX_KNOBS``) present in a model config, e.g. to carry the base
    config's knobs over to a preset: ``model_config(name, **knobs_of(config.model))``."""
    d = _as_dict(model_cfg)
    return {k: d[k] for k in JAX_KNOBS if k in d}


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
    """The full ``config.model`` ConfigDict of a preset (official values + JAX knobs at their
    defaults), with ``overrides`` applied. Unknown preset or field -> ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; presets: {list(PRESETS)}")
    values = {**PRESETS[preset], **_JAX_KNOBS}
    unknown = set(overrides) - FIELDS[values["kind"]]
    if unknown:
        raise ValueError(f"unknown {values['kind']} model field(s) {sorted(unknown)}; "
                         f"fields: {sorted(FIELDS[values['kind']])}")
    values.update(overrides)
    return ml_collections.ConfigDict(values)


_preset_config = model_config  # build_model's argument shadows the name


def _as_dict(model_config) -> dict[str, Any]:
    if isinstance(model_config, ml_collections.ConfigDict):
        return model_config.to_dict()
    if isinstance(model_config, Mapping):
        return dict(model_config)
    raise ValueError(f"model_config must be a ConfigDict or a mapping; got {type(model_config)}")


def model_kwargs(model_config) -> tuple[type, dict[str, Any]]:
    """(model class, constructor kwargs) from a model config; ValueError on a bad kind or an
    unknown field. Missing fields take the constructor defaults."""
    cfg = _as_dict(model_config)
    kind = cfg.pop("kind", None)
    if kind not in _MODEL_CLASSES:
        raise ValueError(f"model kind={kind!r}; allowed: {sorted(_MODEL_CLASSES)}")
    unknown = set(cfg) - FIELDS[kind]
    if unknown:
        raise ValueError(f"unknown {kind} model field(s) {sorted(unknown)}; "
                         f"fields: {sorted(FIELDS[kind])}")
    return _MODEL_CLASSES[kind], cfg


def build_model(model_config, rngs: nnx.Rngs | int = 0) -> nnx.Module:
    """Builds the network of ``model_config`` (a ConfigDict/mapping with the fields above, or a
    preset name). ``rngs``: an ``nnx.Rngs``, an int seed or a ``layers.KeyGen``. Eager
    construction runs op by op; ``functional.init_params`` does the same under one jit."""
    if isinstance(model_config, str):
        model_config = _preset_config(model_config)
    cls, kwargs = model_kwargs(model_config)
    return cls(**kwargs, rngs=rngs)
