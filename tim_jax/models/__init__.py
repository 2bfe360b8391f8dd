"""TiM networks in Flax NNX (class-conditional ``TiMC2I``, text-conditional ``TiMT2I``), computing
exactly the official functions of WZDTHU/TiM ``tim/models/{c2i,t2i}/tim_model.py``.

Quick use::

    from tim_jax.models import model_config, init_params, make_apply_fn
    cfg = model_config("c2i_xl2_256", dtype="bfloat16")
    graphdef, params = init_params(cfg, key=0)
    apply_fn = make_apply_fn(graphdef)
    F = apply_fn(params, x_t, t, r, labels)          # NHWC in, NHWC float32 out

Parameter naming (official state-dict key -> tim_jax params path)
-------------------------------------------------------------------
The NNX attribute paths mirror the official ``state_dict()`` keys: split the torch key on '.',
turn digit components into ints, and rename the leaf:

    torch leaf / module                          tim_jax leaf      value transform
    nn.Linear ``weight`` (out, in)               ``kernel``        W.T -> (in, out)
    nn.Linear ``bias``                           ``bias``          as is
    conv ``x_embedder.proj.weight`` (D,C,p,p)    ``kernel``        W.transpose(2, 3, 1, 0) -> (p, p, C, D)
    nn.LayerNorm ``weight`` / ``bias``           ``scale``/``bias``  as is   (attn.q_norm, attn.k_norm,
                                                                   cross_attn.{q,k}_norm, y_embedder.norm)
    nn.Embedding ``embedding_table.weight``      ``embedding``     as is   ((num_classes + 1, D))
    timm SwiGLU ``fc1_g`` + ``fc1_x``            ONE ``fc1``       kernel = concat([fc1_g.weight.T,
                                                                   fc1_x.weight.T], axis=-1) (in, 2h);
                                                                   bias = concat([fc1_g.bias, fc1_x.bias])
                                                                   (gate FIRST, value second)
    timm SwiGLU ``fc2``                          ``fc2``           as nn.Linear

Examples:

    blocks.0.attn.qkv.weight              -> ('blocks', 0, 'attn', 'qkv', 'kernel')
    blocks.3.attn.qkv_d.weight            -> ('blocks', 3, 'attn', 'qkv_d', 'kernel')      (no bias)
    blocks.0.attn.q_norm.weight           -> ('blocks', 0, 'attn', 'q_norm', 'scale')
    blocks.0.mlp.fc1_g/.fc1_x.{weight,bias} -> ('blocks', 0, 'mlp', 'fc1', 'kernel' / 'bias')
    blocks.0.adaLN_modulation.fc2.weight  -> ('blocks', 0, 'adaLN_modulation', 'fc2', 'kernel')
    blocks.0.cross_attn.kv.weight (t2i)   -> ('blocks', 0, 'cross_attn', 'kv', 'kernel')
    t_embedder.mlp.0.weight               -> ('t_embedder', 'mlp', 0, 'kernel')    (mlp.2 likewise)
    delta_embedder.mlp.2.bias             -> ('delta_embedder', 'mlp', 2, 'bias')
    y_embedder.embedding_table.weight     -> ('y_embedder', 'embedding_table', 'embedding')   (c2i)
    y_embedder.norm.weight (t2i)          -> ('y_embedder', 'norm', 'scale')
    y_embedder.mlp.fc1_g.weight (t2i)     -> ('y_embedder', 'mlp', 'fc1', 'kernel')  (fused as above)
    x_embedder.proj.weight                -> ('x_embedder', 'proj', 'kernel')       (conv transform)
    projector.0.weight                    -> ('projector', 0, 'kernel')             (also 2, 4)
    final_layer.linear.weight             -> ('final_layer', 'linear', 'kernel')
    final_layer.adaLN_modulation.fc1_g... -> ('final_layer', 'adaLN_modulation', 'fc1', ...)

Nothing else is stored (RoPE tables are computed at trace time; affine-free LayerNorms have no
params), so the official state dict and ``nnx.to_flat_state(params)`` are in one-to-one
correspondence (after fusing fc1_g/fc1_x). With ``scan_blocks=True`` the ``blocks`` sub-tree is
the same without the integer level and with a leading depth axis on every leaf:
('blocks', 'attn', 'qkv', 'kernel') of shape (depth, D, 3D); ``functional.stack_block_params`` /
``unstack_block_params`` convert between the layouts. Shapes are float32 params; the official
q/k/v (and kv) column order (3 or 2, heads, head_dim) is kept, as is the interleaved RoPE pair
layout, so no permutation of columns is needed.

Modules: ``backbone`` (the shared trunk), ``c2i`` / ``t2i`` (the two networks), ``layers``
(primitives), ``attention_layers`` (self- and cross-attention), ``rope`` (2D RoPE),
``attention`` (THE attention dispatch), ``matmul`` (THE matmul and its dtype policy),
``cpu_layouts`` / ``cpu_fused`` (the XLA:CPU-only code paths, behind one switch), ``presets``
(official sizes, config schema, ``build_model``, logical axis names), ``functional``
(split/apply/init/abstract params).
"""
from tim_jax.models.attention import attention_impls, register_attention
from tim_jax.models.c2i import NEW_CONDITIONS, TiMC2I
from tim_jax.models.functional import (
    abstract_model,
    abstract_params,
    count_params,
    init_params,
    make_apply_fn,
    make_init_fn,
    params_from_pure_dict,
    split_model,
    stack_block_params,
    unstack_block_params,
)
from tim_jax.models.presets import (
    LOGICAL_AXES,
    PRESETS,
    build_model,
    model_config,
    preset_names,
)
from tim_jax.models.t2i import TiMT2I

__all__ = [
    "LOGICAL_AXES", "NEW_CONDITIONS", "PRESETS", "TiMC2I", "TiMT2I",
    "abstract_model", "abstract_params", "attention_impls", "build_model",
    "count_params", "init_params", "make_apply_fn", "make_init_fn", "model_config",
    "params_from_pure_dict", "preset_names", "register_attention", "split_model",
    "stack_block_params", "unstack_block_params",
]
