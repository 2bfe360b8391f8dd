"""The pure, sharded TiM train step: ``train_step(state, batch) -> (state, metrics)``.

One ``jax.jit`` covers the whole step (forward, the objective's no-grad passes, backward,
gradient accumulation, clipping, AdamW, EMA), with the state donated and the in/out shardings of
:mod:`tim_jax.training.state` / :mod:`tim_jax.training.sharding`; nothing in it syncs with the host.

Per step k (= ``state.step``):

1. ``rng = fold_in(state.rng, k)`` (the state's base key comes from ``config.seed``); micro-batch
   j uses ``fold_in(rng, j)``, so a resumed run draws exactly the same numbers.
2. The global batch (rows sharded over ``("data", "fsdp")``) is split into
   ``optim.grad_accum_steps`` micro-batches by STRIDE: micro-batch j holds rows j, j+k, j+2k,...
   Each device keeps its own rows (no resharding) and every micro-batch has the objective's
   static row layout (first n_diffusion rows r = t, last n_consistency rows r = T_min) over the
   same data rows as the big batch whenever those counts are multiples of k (a warning says
   when they are not). Gradients are averaged over micro-batches inside a ``lax.scan``; for a
   per-row objective this equals the big-batch gradient up to float error (tested).
3. ``loss_fn`` (default :func:`tim_jax.objective.tim_loss`: REPA target from
   ``batch["repa_target"]``, label dropout, the guidance-enhanced target from the EMA params of
   the FIRST decay when ``transport.enhance_target``) gives ``(loss, metrics)``.
4. ``grad_norm`` (before clipping), then the optax update (clip 1.0 + AdamW) and the EMA update
   ``ema <- decay * ema + (1 - decay) * new_params`` for every decay.
5. If the loss or the grad norm is not finite the update is skipped: the whole state comes back
   unchanged (step included) and ``metrics["finite"]`` is 0.0; the loop stops on it (naming the
   step) and the last good checkpoint stays valid. With ``optim.make_optimizer``'s
   transformation (:class:`tim_jax.training.optimizer.SkipsNonFinite`) the update is an exact no-op by
   itself (masked coefficients, no ``lax.cond``); any other optax transformation runs under
   ``lax.cond``.

Metrics (float32 scalars, device arrays): ``loss``, ``grad_norm``, ``lr`` (the lr of this update),
``finite`` (1.0 / 0.0) and the objective's metrics (averaged over micro-batches).

Precision: params, gradients, optimizer state, EMA and the loss are float32; the compute dtype
and the remat policy are the model's (``config.model.dtype`` / ``config.model.remat``, read by
``presets.build_model``).

Public API
----------
``make_objective_config(config)``    -> ObjectiveConfig from config.transport + config.objective
``null_cond(config, null_caption=None)`` -> the null condition (c2i: int32 scalar num_classes)
``split_micro_batches(batch, k)``    -> pytree with leaves (k, B/k, ...), strided rows
``rows_sharded_apply_fn(apply_fn, batch_sharding)`` -> apply_fn with rows pinned to the batch
                                        sharding at its inputs and outputs
``train_step_fn(config, graphdef, ...)`` -> the un-jitted pure step function
``make_train_step(config, graphdef, mesh, state_shardings, ...)`` -> jitted, donated step with a
                                        cheap host-side batch-shape check (ValueError)
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tim_jax.training import optimizer as optim
from tim_jax.training import sharding
from tim_jax.training.state import TrainState, ema_decays, ema_key, step_rng

PyTree = Any
LossFn = Callable[..., tuple[jax.Array, dict]]

log = logging.getLogger(__name__)

__all__ = ["make_objective_config", "null_cond", "split_micro_batches", "constrain_rows",
           "rows_sharded_apply_fn", "train_step_fn", "make_train_step"]

_TRANSPORT_KEYS = ("P_mean", "P_std", "sigma_d", "T_max", "T_min", "enhance_target", "w_gt",
                   "w_cond", "w_start", "w_end")


def make_objective_config(config: Any):
    """:class:`tim_jax.objective.ObjectiveConfig` of ``config.transport`` + ``config.objective``.

    Transport fields are passed only when the named transport has them (e.g. VP_SDE has no
    T_max); ``make_transport`` raises for unknown names.
    """
    import dataclasses

    from tim_jax import objective, transports

    tr = config.transport.to_dict() if hasattr(config.transport, "to_dict") else dict(
        config.transport)
    name = tr.pop("name")
    cls = transports.TRANSPORTS.get(name)
    fields = {f.name for f in dataclasses.fields(cls)} if cls is not None else set(tr)
    overrides = {k: v for k, v in tr.items() if k in fields}
    transport = transports.make_transport(name, **overrides)
    ob = config.objective.to_dict() if hasattr(config.objective, "to_dict") else dict(
        config.objective)
    for key in ("repa_encoder", "repa_encoder_path"):   # read by tim_jax.training.repa
        ob.pop(key, None)
    allowed = {f.name for f in dataclasses.fields(objective.ObjectiveConfig)} - {"transport"}
    unknown = sorted(set(ob) - allowed)
    if unknown:
        raise ValueError(f"unknown config.objective field(s) {unknown}; allowed: {sorted(allowed)}")
    return objective.ObjectiveConfig(transport=transport, **ob)


def null_cond(config: Any, null_caption: Optional[jax.Array] = None) -> PyTree:
    """The null (unconditional) condition, shaped like ONE row of ``batch["cond"]``.

    c2i: ``int32(model.num_classes)`` (the extra label row). t2i: the caption features of the
    empty prompt, which only a text encoder can produce: pass them as ``null_caption``
    (L, cap_dim).
    """
    kind = config.model.kind
    if kind == "c2i":
        return jnp.asarray(config.model.num_classes, jnp.int32)
    if kind == "t2i":
        if null_caption is None:
            raise ValueError("model.kind='t2i': null_cond needs the encoded empty caption "
                             "(null_caption=(L, cap_dim) features)")
        return jnp.asarray(null_caption, jnp.float32)
    raise ValueError(f"model.kind must be 'c2i' or 't2i', got {kind!r}")


def split_micro_batches(batch: PyTree, k: int) -> PyTree:
    """Leaves (B, ...) -> (k, B/k, ...) with micro-batch j = rows j, j+k, ... (strided).

    With the batch sharded in contiguous row blocks over devices, a strided split leaves every
    device's rows on that device (when each device holds a multiple of k rows).
    """
    def split(a):
        if a.shape[0] % k:
            raise ValueError(f"batch leaf of shape {a.shape}: rows not divisible by "
                             f"grad_accum_steps={k}")
        return jnp.swapaxes(a.reshape((a.shape[0] // k, k) + a.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def constrain_rows(tree: PyTree, batch_sharding: NamedSharding) -> PyTree:
    """Pin every leaf whose leading dim splits evenly over the mesh to ``batch_sharding`` (rows
    over all devices); other leaves are left to the partitioner."""
    n = batch_sharding.mesh.size

    def pin(a):
        if getattr(a, "ndim", 0) and a.shape[0] % n == 0:
            return jax.lax.with_sharding_constraint(a, batch_sharding)
        return a
    return jax.tree.map(pin, tree)


def rows_sharded_apply_fn(apply_fn: Callable, batch_sharding: NamedSharding) -> Callable:
    """``apply_fn`` with its row inputs and outputs pinned to the batch sharding.

    This anchors every network call of the objective (main, DDE and guidance passes, whose
    row counts differ) to data-parallel activations, so the partitioner all-gathers the FSDP
    weights rather than re-laying-out activations (without it XLA picks feature-sharded
    activations for small per-device batches and warns about involuntary rematerialisation).
    """
    def wrapped(params, x_t, t, r, cond, *, return_proj: bool = False):
        x_t, t, r, cond = constrain_rows((x_t, t, r, cond), batch_sharding)
        out = apply_fn(params, x_t, t, r, cond, return_proj=return_proj)
        return constrain_rows(out, batch_sharding)
    return wrapped


def _check_row_layout(obj_config, global_batch_size: int, k: int) -> None:
    from tim_jax.objective import row_counts
    if k == 1:
        return
    big = row_counts(global_batch_size, obj_config)
    micro = row_counts(global_batch_size // k, obj_config)
    if tuple(k * m for m in micro) != tuple(big):
        log.warning("grad accumulation: micro-batches of %d rows have (n_diffusion, "
                    "n_consistency) = %s, i.e. %s over the step, vs %s for one batch of %d rows",
                    global_batch_size // k, micro, tuple(k * m for m in micro), big,
                    global_batch_size)


def train_step_fn(config: Any, graphdef, *, tx: optax.GradientTransformation,
                  schedule: Callable, apply_fn: Optional[Callable] = None,
                  loss_fn: Optional[LossFn] = None, objective_config: Any = None,
                  null: PyTree = None, param_shardings: PyTree = None,
                  batch_sharding: Optional[NamedSharding] = None, repa=None):
    """The pure step ``(state, batch, frozen=None) -> (state, metrics)`` (not jitted; see the
    module docstring).

    apply_fn: the network (default ``models.functional.make_apply_fn(graphdef)``).
    loss_fn: ``loss_fn(apply_fn, params, batch, rng, *, config, null_cond, ema_params)`` (default
    ``objective.tim_loss``). objective_config: default :func:`make_objective_config`.
    param_shardings / batch_sharding: optional sharding constraints for the accumulated
    gradients, the micro-batches and the network's row inputs/outputs
    (:func:`rows_sharded_apply_fn`); set by :func:`make_train_step`.
    repa: a :class:`tim_jax.training.repa.RepaEncoder`: the step replaces ``batch["image"]``
    by ``batch["repa_target"]`` computed with the encoder weights ``frozen``.
    """
    if apply_fn is None:
        from tim_jax.models.functional import make_apply_fn
        apply_fn = make_apply_fn(graphdef)
    if batch_sharding is not None:
        apply_fn = rows_sharded_apply_fn(apply_fn, batch_sharding)
    if loss_fn is None:
        from tim_jax.objective import tim_loss as loss_fn
    obj_config = objective_config if objective_config is not None else make_objective_config(config)
    null = null if null is not None else null_cond(config)
    decays = ema_decays(config)
    k = int(config.optim.grad_accum_steps)
    enhance = bool(getattr(obj_config, "enhance_target", False))
    first_ema = ema_key(decays[0]) if decays else None
    if enhance and first_ema is None:
        raise ValueError("transport.enhance_target needs at least one ema.decays entry")

    def constrain(tree, shardings):
        return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

    def step(state: TrainState, batch: PyTree, frozen: PyTree = None):
        if repa is not None:
            batch = dict(batch)
            batch["repa_target"] = repa.targets(frozen, batch.pop("image"))
        rng = step_rng(state)
        ema_for_target = state.ema_params[first_ema] if enhance else None

        def loss_of(params, micro, key):
            loss, metrics = loss_fn(apply_fn, params, micro, key, config=obj_config,
                                    null_cond=null, ema_params=ema_for_target)
            return loss.astype(jnp.float32), metrics

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if k == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, jax.random.fold_in(rng, 0))
        else:
            micro = split_micro_batches(batch, k)
            if batch_sharding is not None:
                micro_sh = NamedSharding(batch_sharding.mesh,
                                         PartitionSpec(None, *batch_sharding.spec))
                micro = jax.lax.with_sharding_constraint(micro, jax.tree.map(lambda _: micro_sh,
                                                                             micro))

            def body(acc, xs):
                mb, j = xs
                (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, j))
                acc = constrain(jax.tree.map(jnp.add, acc, g), param_shardings)
                return acc, (l, m)

            zeros = constrain(jax.tree.map(jnp.zeros_like, state.params), param_shardings)
            grads, (losses, metrics) = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
            grads = jax.tree.map(lambda g: g / k, grads)
            loss = jnp.mean(losses)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        grads = constrain(grads, param_shardings)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        guarded = isinstance(tx, optim.SkipsNonFinite)

        def apply_update(state, grads):
            # the norm is passed on: the clip of optim.make_optimizer reuses it instead of a
            # second reduction over all gradients (a plain optax transformation takes no extras)
            extra = ({"grad_norm": grad_norm}
                     if isinstance(tx, optax.GradientTransformationExtraArgs) else {})
            if guarded:
                extra["finite"] = finite
            updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
            params = optax.apply_updates(state.params, updates)
            ema = {}
            for d in decays:  # optax.incremental_update's weights; (0, 1) when not finite
                w_new, w_old = 1.0 - d, 1.0 - (1.0 - d)
                if guarded:
                    w_new, w_old = jnp.where(finite, w_new, 0.0), jnp.where(finite, w_old, 1.0)
                key = ema_key(d)
                ema[key] = jax.tree.map(lambda n, o: w_new * n + w_old * o, params,
                                        state.ema_params[key])
            step = state.step + (finite.astype(state.step.dtype) if guarded else 1)
            return state.replace(step=step, params=params, ema_params=ema, opt_state=opt_state)

        # a non-finite loss / gradient leaves the whole state untouched (step included): with
        # the CPU variant of optimizer.make_optimizer the update itself is an exact no-op then
        # (no cond, which XLA:CPU runs slower); any other optax transformation runs under
        # lax.cond
        if guarded:
            new_state = apply_update(state, grads)
        else:
            new_state = jax.lax.cond(finite, apply_update, lambda state, grads: state, state,
                                     grads)

        metrics = {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}
        metrics.update(loss=loss, grad_norm=grad_norm.astype(jnp.float32),
                       lr=jnp.asarray(schedule(state.step), jnp.float32),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return step


def make_train_step(config: Any, graphdef, mesh: Mesh, state_shardings: TrainState, *,
                    apply_fn: Optional[Callable] = None, loss_fn: Optional[LossFn] = None,
                    objective_config: Any = None, null: PyTree = None,
                    tx: Optional[optax.GradientTransformation] = None, donate: bool = True,
                    repa=None):
    """The jitted step ``step(state, batch) -> (state, metrics)`` on ``mesh``.

    repa: an optional :class:`tim_jax.training.repa.RepaEncoder` whose targets the step
    computes from ``batch["image"]``; its weights are replicated on the mesh once and passed to
    the jitted function as an argument (not baked into the program).

    in_shardings: ``(state_shardings, batch_sharding(mesh))``; out_shardings:
    ``(state_shardings, replicated)``; the state argument is donated (``donate=True``): do not
    reuse the state passed in. Raises ValueError (before anything is compiled) when
    ``data.global_batch_size`` does not split over devices x grad_accum_steps, and at call time
    when a batch leaf's leading dim is not ``data.global_batch_size``. Batch leaves not already
    laid out with ``batch_sharding(mesh)`` are ``device_put`` there first (single-process
    convenience; multi-host loops pass global arrays).

    tx must be the transformation the state was created with (default:
    ``optim.make_optimizer(config)``, deterministic in the config). The returned callable has the
    jitted function as ``.jitted`` (e.g. for ``.lower(...)``).
    """
    k = int(config.optim.grad_accum_steps)
    global_batch = int(config.data.global_batch_size)
    sharding.check_batch_size(global_batch, mesh, k)
    default_tx, schedule = optim.make_optimizer(config)
    tx = default_tx if tx is None else tx
    obj_config = objective_config if objective_config is not None else make_objective_config(config)
    if loss_fn is None:
        _check_row_layout(obj_config, global_batch, k)
    batch_sh = sharding.batch_sharding(mesh)
    step = train_step_fn(config, graphdef, tx=tx, schedule=schedule, apply_fn=apply_fn,
                         loss_fn=loss_fn, objective_config=obj_config, null=null,
                         param_shardings=state_shardings.params, batch_sharding=batch_sh,
                         repa=repa)
    frozen = None
    if repa is None:
        jitted = jax.jit(step, in_shardings=(state_shardings, batch_sh),
                         out_shardings=(state_shardings, sharding.replicated(mesh)),
                         donate_argnums=(0,) if donate else ())
    else:
        from tim_jax.training.repa import replicate

        frozen = replicate(repa.params, mesh)
        jitted = jax.jit(step, in_shardings=(state_shardings, batch_sh,
                                             jax.tree.map(lambda _: sharding.replicated(mesh),
                                                          frozen)),
                         out_shardings=(state_shardings, sharding.replicated(mesh)),
                         donate_argnums=(0,) if donate else ())

    def train_step(state: TrainState, batch: PyTree):
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
            shape = getattr(leaf, "shape", ())
            if not shape or shape[0] != global_batch:
                raise ValueError(f"batch{jax.tree_util.keystr(path)} has shape {tuple(shape)}; "
                                 f"expected leading dim data.global_batch_size={global_batch}")
        # no-op for arrays already laid out by the data pipeline; places host/uncommitted arrays
        # (single process) so that they hit the same compiled executable
        batch = jax.tree.map(
            lambda a: a if getattr(a, "sharding", None) == batch_sh else jax.device_put(a, batch_sh),
            batch)
        return jitted(state, batch) if repa is None else jitted(state, batch, frozen)

    train_step.jitted = jitted
    return train_step
