"""The pure-function view of the TiM networks: (graphdef, params) and ``apply_fn``.

    graphdef, params = split_model(model)          # params: nnx.State of nnx.Param (float32)
    apply_fn = make_apply_fn(graphdef)
    F = apply_fn(params, x_t, t, r, cond)                          # (B, H, W, C) float32
    F, h_proj = apply_fn(params, x_t, t, r, cond, return_proj=True)

``params`` may be the ``nnx.State`` from ``split_model`` / ``init_params`` or the equivalent pure
nested dict (``nnx.to_pure_dict``). Everything here is jit-friendly: no hidden state, the
graphdef is static (hashable) and closed over.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from tim_jax.models import layers as L
from tim_jax.models.presets import build_model

ApplyFn = Callable[..., Any]


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params). Raises ValueError if the model holds any state besides nnx.Param."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model holds non-Param state: {rest}")
    return graphdef, params


def make_apply_fn(graphdef: nnx.GraphDef) -> ApplyFn:
    """``apply_fn(params, x_t, t, r, cond, *, return_proj=False)`` (docs/design.md network contract):
    x_t (B, H, W, C); t, r (B,) float32 (already through transport.c_noise); cond (B,) int labels
    (c2i) or (B, L, cap_feat_dim) caption features (t2i). Returns F (B, H, W, C) float32, or
    (F, h_proj (B, N_tokens, z_dim) float32) with return_proj=True."""

    def apply_fn(params, x_t, t, r, cond, *, return_proj: bool = False):
        model = nnx.merge(graphdef, params)
        return model(x_t, t, r, cond, return_proj=return_proj)

    return apply_fn


def abstract_model(model_config) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params of ``jax.ShapeDtypeStruct``) without allocating any parameter memory.
    The abstract params keep their logical-axis metadata (``nnx.get_partition_spec`` works)."""
    model = nnx.eval_shape(lambda: build_model(model_config, rngs=0))
    return split_model(model)


def abstract_params(model_config) -> nnx.State:
    """Abstract params (``jax.ShapeDtypeStruct`` leaves) of ``model_config``; no memory."""
    return abstract_model(model_config)[1]


def make_init_fn(model_config) -> tuple[nnx.GraphDef, Callable[[jax.Array], nnx.State]]:
    """(graphdef, ``init_fn(key) -> params``): a pure init function, to be jitted (optionally with
    ``out_shardings`` so the params are created sharded). ``key`` is a jax PRNG key."""
    graphdef, _ = abstract_model(model_config)

    def init_fn(key: jax.Array) -> nnx.State:
        return split_model(build_model(model_config, rngs=L.KeyGen(key)))[1]

    return graphdef, init_fn


def init_params(model_config, key: jax.Array | int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) initialised with the official recipe, under one ``jax.jit`` (much
    faster than building the model eagerly, op by op)."""
    if isinstance(key, int):
        key = jax.random.key(key)
    graphdef, init_fn = make_init_fn(model_config)
    return graphdef, jax.jit(init_fn)(key)


def count_params(params) -> int:
    """Total number of parameter elements (works on abstract params too)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params)))


# -------------------------------------------------------------------------------------------
# list <-> scanned block layout (pure nested dicts, as from nnx.to_pure_dict)


def stack_block_params(params: Mapping) -> dict:
    """List layout -> scanned layout: ``params['blocks'][i][...]`` for i < depth becomes
    ``params['blocks'][...]`` with a leading depth axis. Works on pure nested dicts (or an
    ``nnx.State``, converted with ``nnx.to_pure_dict``); returns a pure dict."""
    pure = _pure(params)
    blocks = pure["blocks"]
    keys = sorted(blocks)
    if keys != list(range(len(keys))):
        raise ValueError(f"params['blocks'] is not in the list layout (keys {keys[:5]}...)")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in keys])
    return {**pure, "blocks": stacked}


def unstack_block_params(params: Mapping) -> dict:
    """Scanned layout -> list layout (inverse of ``stack_block_params``)."""
    pure = _pure(params)
    blocks = pure["blocks"]
    depth = {x.shape[0] for x in jax.tree.leaves(blocks)}
    if len(depth) != 1:
        raise ValueError(f"params['blocks'] leaves disagree on the leading (depth) axis: {depth}")
    (depth,) = depth
    listed = {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(depth)}
    return {**pure, "blocks": listed}


def params_from_pure_dict(model_config, pure: Mapping) -> nnx.State:
    """An ``nnx.State`` with the metadata (logical axes) of ``model_config``'s params and the
    values of ``pure`` (a nested dict as from ``nnx.to_pure_dict``); ValueError if the tree or a
    shape differs."""
    target = abstract_params(model_config)
    pure = _pure(pure)
    flat_t = dict(nnx.to_flat_state(target))
    flat_p = traverse_util.flatten_dict(pure)
    if set(flat_t) != set(flat_p):
        missing = sorted(set(flat_t) - set(flat_p), key=str)
        extra = sorted(set(flat_p) - set(flat_t), key=str)
        raise ValueError(f"param tree mismatch: missing {missing[:8]}, unexpected {extra[:8]}")
    for k, v in flat_t.items():
        got = tuple(np.shape(flat_p[k]))
        if got != tuple(v.shape):
            raise ValueError(f"param {k}: shape {got} != expected {tuple(v.shape)}")
    nnx.replace_by_pure_dict(target, pure)
    return target


def _pure(params) -> dict:
    if isinstance(params, nnx.State):
        return nnx.to_pure_dict(params)
    return dict(params)
