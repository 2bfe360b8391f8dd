"""Autodiff plumbing of the flash-attention kernels: three JAX primitives with their rules.

``jax.custom_jvp`` and ``jax.custom_vjp`` do not compose on one function (a custom_jvp rule
takes precedence in every mode, and ``jax.jvp`` of a custom_vjp function is an error). To have
``jax.jvp`` run the one-pass JVP kernel and ``jax.grad`` run the backward kernels, the public
function is a ``custom_jvp`` whose rule binds ``jvp_p``, and reverse mode is obtained by JAX's
linearize-then-transpose of that rule, steered by the rules below:

* ``jvp_p(q, k, v, *tangents) -> (o, do)``: evaluated (``jax.jvp``) it runs the JVP kernel.
  Under partial evaluation with known primals and unknown tangents (``jax.grad``,
  ``jax.linearize``, ``jax.checkpoint``) it splits into the known ``fwd_p`` and the staged,
  linear ``tangent_p``, so the primal output never waits on a tangent.
* ``fwd_p(q, k, v) -> (o, lse)``: the forward kernel; ``lse`` (B, H, Lq) float32, base 2, is
  the residual saved for the backward (with q, k, v and o).
* ``tangent_p(q, k, v, [o, lse], *tangents) -> do``: linear in the tangents. Its transpose is
  the backward kernels (dq kernel, dk/dv kernel) fed with the saved ``lse``; evaluated (e.g. the
  function returned by ``jax.linearize``) it runs the JVP kernel. Under ``jax.checkpoint`` with
  a policy that does not save it, ``o``/``lse`` are not residuals (``saved=False``) and the
  transpose reruns the forward kernel first.

None of the three has a derivative of its own: differentiating a JVP tangent (``jax.grad`` of a
function of the ``jax.jvp`` tangent) or any second-order use raises a NotImplementedError that
says so. Batching (``jax.vmap``) folds the mapped axis into the batch axis.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import Saveable
from jax.extend import core as jcore
from jax.interpreters import ad, batching, mlir
from jax.interpreters import partial_eval as pe

from tim_jax.models.kernels.flash_attention_bwd import flash_backward
from tim_jax.models.kernels.flash_attention_fwd import flash_forward
from tim_jax.models.kernels.flash_attention_jvp import flash_jvp

fwd_p = jcore.Primitive("flash_attention_fwd")
fwd_p.multiple_results = True
jvp_p = jcore.Primitive("flash_attention_jvp")
jvp_p.multiple_results = True
tangent_p = jcore.Primitive("flash_attention_tangent")


# --------------------------------------------------------------------------- implementations
def _fwd_impl(q, k, v, *, cfg):
    return list(flash_forward(q, k, v, cfg))


def _jvp_impl(q, k, v, *tangents, cfg, has):
    return list(flash_jvp(q, k, v, tangents, cfg, has))


def _tangent_impl(q, k, v, *rest, cfg, has, saved):
    tangents = rest[2:] if saved else rest
    return flash_jvp(q, k, v, tangents, cfg, has)[1]


IMPLS = {fwd_p: _fwd_impl, jvp_p: _jvp_impl, tangent_p: _tangent_impl}


def _like(x, shape=None, dtype=None):
    return jax.core.ShapedArray(x.shape if shape is None else shape,
                                x.dtype if dtype is None else dtype)


fwd_p.def_abstract_eval(lambda q, k, v, *, cfg: [_like(q), _like(q, q.shape[:3], jnp.float32)])
jvp_p.def_abstract_eval(lambda q, k, v, *t, cfg, has: [_like(q), _like(q)])
tangent_p.def_abstract_eval(lambda q, k, v, *r, cfg, has, saved: _like(q))


def _batch_rule(prim, args, dims, **params):
    """vmap: move the mapped axis to the front and fold it into the batch axis B."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)

    def fold(a, d):
        a = jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        return a.reshape((size * a.shape[1], *a.shape[2:]))

    outs = prim.bind(*map(fold, args, dims), **params)
    unfold = lambda o: o.reshape((size, o.shape[0] // size, *o.shape[1:]))
    if prim.multiple_results:
        return [unfold(o) for o in outs], [0] * len(outs)
    return unfold(outs), 0


def _no_derivative(name):
    def rule(primals, tangents, **params):
        raise NotImplementedError(
            f"flash_attention: {name} has no derivative of its own, so second-order autodiff "
            "through the Pallas kernels is not supported: e.g. jax.grad (or jax.jvp) of a "
            "function of the jax.jvp tangent of flash_attention, jax.hessian, or jax.jvp of "
            "jax.grad. First order works: jax.grad / jax.vjp (backward kernels) and jax.jvp "
            "(JVP kernel). Put the JVP under jax.lax.stop_gradient (as the TiM objective does), "
            "or use attention impl 'xla' for higher-order derivatives.")
    return rule


for _p in IMPLS:
    _p.def_impl(IMPLS[_p])
    mlir.register_lowering(_p, mlir.lower_fun(IMPLS[_p], multiple_results=_p.multiple_results))
    batching.primitive_batchers[_p] = functools.partial(_batch_rule, _p)
    ad.primitive_jvps[_p] = _no_derivative(_p.name)


# ----------------------------------------------------------------------- partial evaluation
def _jvp_partial_eval(trace, *tracers, cfg, has):
    """JaxprTrace rule (jax.grad / jax.linearize): known primals, unknown tangents -> known
    fwd_p outputs and a staged tangent_p reading the saved residuals."""
    primals, tangents = tracers[:3], tracers[3:]
    if all(t.is_known() for t in primals) and not all(t.is_known() for t in tangents):
        q, k, v = (t.pval.get_known() for t in primals)
        o, lse = fwd_p.bind(q, k, v, cfg=cfg)
        o_t, lse_t = trace.new_const(o), trace.new_const(lse)
        do_t = trace.default_process_primitive(
            tangent_p, [*primals, o_t, lse_t, *tangents], dict(cfg=cfg, has=has, saved=True))
        return [o_t, do_t]
    return trace.default_process_primitive(jvp_p, tracers, dict(cfg=cfg, has=has))


def _policy_saves(decision) -> bool:
    if isinstance(decision, bool):
        return decision
    return decision is Saveable


def _jvp_partial_eval_custom(saveable, unks_in, inst_in, eqn):
    """partial_eval_jaxpr_custom rule (jax.checkpoint / remat): same split as above; o and lse
    are residuals when the remat policy saves ``fwd_p``, else the transpose recomputes them."""
    cfg, has = eqn.params["cfg"], eqn.params["has"]
    is_var = lambda x: isinstance(x, jcore.Var)
    if any(unks_in[:3]) or not any(unks_in[3:]):
        if not any(unks_in):
            return eqn, None, [False, False], [False, False], []
        res = [x for x, inst in zip(eqn.invars, inst_in) if is_var(x) and not inst]
        return None, eqn, [True, True], [True, True], res
    q, k, v = eqn.invars[:3]
    o, do = eqn.outvars
    if isinstance(o, jcore.DropVar):
        o = jcore.Var(o.aval)
    lse = jcore.Var(_like(o.aval, o.aval.shape[:3], jnp.float32))
    fwd_eqn = jcore.new_jaxpr_eqn([q, k, v], [o, lse], fwd_p, dict(cfg=cfg), jcore.no_effects,
                                  eqn.source_info, eqn.ctx)
    saves = _policy_saves(saveable(fwd_p, *(x.aval for x in (q, k, v)), cfg=cfg))
    staged_in = [q, k, v, *([o, lse] if saves else []), *eqn.invars[3:]]
    tangent_eqn = jcore.new_jaxpr_eqn(staged_in, [do], tangent_p,
                                      dict(cfg=cfg, has=has, saved=saves), jcore.no_effects,
                                      eqn.source_info, eqn.ctx)
    res = [o, lse] if saves else []
    res += [x for x, inst in zip(eqn.invars, inst_in) if is_var(x) and not inst]
    return fwd_eqn, tangent_eqn, [False, True], [False, True], res


pe.custom_partial_eval_rules[jvp_p] = _jvp_partial_eval
pe.partial_eval_jaxpr_custom_rules[jvp_p] = _jvp_partial_eval_custom


# -------------------------------------------------------------------------------- transpose
def _tangent_transpose(ct, q, k, v, *rest, cfg, has, saved):
    """Cotangent of do -> cotangents of the tangent operands: the backward kernels."""
    n_res = 5 if saved else 3
    residuals = (q, k, v, *rest[:n_res - 3])
    tangents = rest[n_res - 3:]
    if any(ad.is_undefined_primal(x) for x in residuals):
        raise NotImplementedError(
            "flash_attention: the tangent map is linear in the tangents only; q, k, v (and the "
            "saved o, lse) cannot be transposed (second-order autodiff is not supported).")
    if type(ct) is ad.Zero:
        return [None] * (n_res + len(tangents))
    which = [i for i, present in enumerate(has) if present]       # primal index per operand
    linear = [ad.is_undefined_primal(t) for t in tangents]
    wanted = {i for i, lin in zip(which, linear) if lin}
    o, lse = (rest[0], rest[1]) if saved else flash_forward(q, k, v, cfg)
    grads = flash_backward(q, k, v, o, lse, ct, cfg, need_dq=0 in wanted,
                           need_dkv=bool(wanted & {1, 2}))
    return [None] * n_res + [grads[i] if lin else None for i, lin in zip(which, linear)]


ad.primitive_transposes[tangent_p] = _tangent_transpose


# ------------------------------------------------------------------------------ diagnostics
def kernel_calls(jaxpr) -> dict[str, int]:
    """Count the Pallas kernels a jaxpr runs, by name (``flash_attention_fwd`` / ``_jvp`` /
    ``_dq`` / ``_dkdv``): ``pallas_call`` equations, including those inside sub-jaxprs and
    inside the primitives above (expanded by tracing their implementation)."""
    counts: dict[str, int] = {}

    def visit(jx):
        jx = getattr(jx, "jaxpr", jx)
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                name = str(getattr(eqn.params.get("name"), "name", eqn.params.get("name")))
                counts[name] = counts.get(name, 0) + 1
                continue
            if eqn.primitive in IMPLS:
                avals = [jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype) for x in eqn.invars]
                visit(jax.make_jaxpr(functools.partial(IMPLS[eqn.primitive], **eqn.params))(
                    *avals))
                continue
            for sub in jcore.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr)
    return counts
