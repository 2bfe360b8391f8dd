"""The training state: one pytree, created directly sharded on the mesh.

:class:`TrainState` holds only arrays; the model's graphdef and the optax transformation are
static (closed over by the step), so the state is trivially checkpointable (Orbax) and
shardable (one NamedSharding per leaf, :func:`state_shardings`).

Layout (all float32 except ``step``/``rng``):

* ``params``      the model's ``nnx.Param`` state in pure-dict form (``nnx.to_pure_dict``);
                  ``nnx.merge(graphdef, params)`` rebuilds the module.
* ``ema_params``  ``{ema_key(decay): params-like}`` for every ``config.ema.decays`` (e.g.
                  ``{"0.9999": ...}``); same sharding as ``params``.
* ``opt_state``   the optax state of ``tim_jax.training.optimizer.make_optimizer(config)``; its moments
                  have the params' shardings, its counters are replicated.
* ``step``        int32 scalar, optimizer steps taken so far.
* ``rng``         uint32[2] base key ``fold_in(PRNGKey(seed), 1)``; the key of step k is
                  ``fold_in(rng, k)`` (:func:`step_rng`), so a resumed run draws the same numbers.
                  Params are initialised from ``fold_in(PRNGKey(seed), 0)``.

Public API
----------
``TrainState``                                      flax.struct dataclass (a pytree)
``ema_key(decay)``                                  -> "0.9999"
``ema_decays(config)``                              -> validated config.ema.decays
``step_rng(state)``                                 -> the rng key of the state's next step
``default_model_fn(config)``                        -> rngs -> NNX model (tim_jax.models.presets)
``abstract_run_params(config, model_fn=None)``         -> (graphdef, abstract params, logical names)
``state_shardings(config, mesh, abstract_params, names, tx)`` -> TrainState of NamedShardings
``abstract_train_state(config, mesh, model_fn=None, tx=None)``
                                                    -> (TrainState of ShapeDtypeStructs carrying
                                                        their target sharding, for Orbax restore,
                                                        shardings, graphdef)
``create_train_state(config, mesh, model_fn=None, tx=None)``
                                                    -> (state, shardings, graphdef), the state
                                                       initialised by one jit with
                                                       out_shardings (never on one device first)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from tim_jax.training import optimizer as optim
from tim_jax.training import sharding

PyTree = Any
ModelFn = Callable[[nnx.Rngs], nnx.Module]

PARAM_INIT_STREAM = 0
STEP_RNG_STREAM = 1

__all__ = [
    "TrainState", "ema_key", "ema_decays", "step_rng", "default_model_fn", "abstract_run_params",
    "state_shardings", "abstract_train_state", "create_train_state",
]


@flax.struct.dataclass
class TrainState:
    """All mutable training state as one pytree (see the module docstring for each field)."""

    step: jax.Array
    params: PyTree
    ema_params: dict[str, PyTree]
    opt_state: PyTree
    rng: jax.Array


def ema_key(decay: float) -> str:
    """Dict key of an EMA copy: ``str(float(decay))``, e.g. ``"0.9999"``."""
    return str(float(decay))


def ema_decays(config: Any) -> tuple[float, ...]:
    """``config.ema.decays`` as floats, validated (each in [0, 1), distinct)."""
    decays = tuple(float(d) for d in config.ema.decays)
    for d in decays:
        if not 0.0 <= d < 1.0:
            raise ValueError(f"ema.decays must be in [0, 1), got {d}")
    if len(set(map(ema_key, decays))) != len(decays):
        raise ValueError(f"ema.decays must be distinct, got {decays}")
    return decays


def step_rng(state: TrainState) -> jax.Array:
    """The rng key of the step that ``state`` is about to take: ``fold_in(state.rng, state.step)``."""
    return jax.random.fold_in(state.rng, state.step)


def default_model_fn(config: Any) -> ModelFn:
    """``rngs -> model`` building the network of ``config.model`` (tim_jax.models.presets)."""
    from tim_jax.models import presets
    return lambda rngs: presets.build_model(config.model, rngs)


def _split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model has non-Param state (e.g. "
                         f"{list(nnx.to_pure_dict(rest))[:3]}); the network contract allows only "
                         "nnx.Param (constants must be computed at trace time)")
    return graphdef, params


def abstract_run_params(config: Any, model_fn: Optional[ModelFn] = None):
    """``(graphdef, abstract_params, names)`` without allocating any parameter.

    abstract_params: pure dict of ``jax.ShapeDtypeStruct``; names: the matching pure dict of
    logical-axis tuples (``sharding.logical_axes``). Eager variable sharding is switched off
    while building, so no mesh context is needed (we shard explicitly).
    """
    model_fn = model_fn or default_model_fn(config)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    graphdef, state = _split_params(model)
    names = sharding.logical_axes(state)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            nnx.to_pure_dict(state))
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        if leaf.dtype != jnp.float32:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has dtype {leaf.dtype}; "
                             "params must be float32 (set the compute dtype with model.dtype)")
    return graphdef, abstract, names


def state_shardings(config: Any, mesh: Mesh, abstract_params: PyTree, names: PyTree,
                    tx: optax.GradientTransformation) -> TrainState:
    """NamedShardings of every TrainState leaf: params/EMA/optimizer moments by the logical
    rules of ``config.sharding_rules``; step, rng and optimizer counters replicated."""
    rules, min_size = sharding.rules_from_config(config, mesh)
    param_sh = sharding.tree_shardings(abstract_params, names, mesh, rules, min_size)
    repl = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=param_sh,
                      ema_params={ema_key(d): param_sh for d in ema_decays(config)},
                      opt_state=opt_sh, rng=repl)


def _init_fn(config: Any, model_fn: ModelFn, tx: optax.GradientTransformation):
    decays = ema_decays(config)

    def init(seed: jax.Array) -> TrainState:
        root = jax.random.PRNGKey(seed)
        with nnx.use_eager_sharding(False):
            model = model_fn(nnx.Rngs(jax.random.fold_in(root, PARAM_INIT_STREAM)))
        _, params = _split_params(model)
        params = nnx.to_pure_dict(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params={ema_key(d): jax.tree.map(jnp.copy, params) for d in decays},
            opt_state=tx.init(params),
            rng=jax.random.fold_in(root, STEP_RNG_STREAM),
        )
    return init


def abstract_train_state(config: Any, mesh: Mesh, model_fn: Optional[ModelFn] = None,
                         tx: Optional[optax.GradientTransformation] = None):
    """``(abstract_state, shardings, graphdef)``: the TrainState as ShapeDtypeStructs that carry
    their target sharding (what Orbax's StandardRestore needs), without allocating anything."""
    model_fn = model_fn or default_model_fn(config)
    tx = optim.make_optimizer(config)[0] if tx is None else tx
    graphdef, abstract_params, names = abstract_run_params(config, model_fn)
    shardings = state_shardings(config, mesh, abstract_params, names, tx)
    shapes = jax.eval_shape(_init_fn(config, model_fn, tx), jnp.int32(0))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    return abstract, shardings, graphdef


def create_train_state(config: Any, mesh: Mesh, model_fn: Optional[ModelFn] = None,
                       tx: Optional[optax.GradientTransformation] = None):
    """``(state, shardings, graphdef)``: a fresh TrainState from ``config.seed``, initialised
    by ONE jit whose out_shardings place every leaf directly in its final sharding.

    model_fn: ``rngs -> nnx.Module`` (default: ``presets.build_model(config.model, rngs)``).
    tx: the optax transformation (default: ``optim.make_optimizer(config)[0]``); it must be the
    one the train step uses.
    """
    model_fn = model_fn or default_model_fn(config)
    tx = optim.make_optimizer(config)[0] if tx is None else tx
    graphdef, abstract_params, names = abstract_run_params(config, model_fn)
    shardings = state_shardings(config, mesh, abstract_params, names, tx)
    init = jax.jit(_init_fn(config, model_fn, tx), out_shardings=shardings)
    state = init(jnp.int32(config.seed))
    return state, shardings, graphdef
