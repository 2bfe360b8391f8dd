"""Parity of the formulas: the five transports (float64) and the interval loss weights (float32).

Files (format: docs/parity-format.md): ``transports.npz`` + ``transports.json``;
``time_weights.npz`` (+ optional ``time_weights.json``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.interop.parity_report import (
    MC_SIGMAS,
    TOLERANCES,
    CheckResult,
    ParityInputError,
    compare,
    load_json,
    load_npz,
    need,
)

__all__ = ["check_transports", "check_time_weights", "sample_t_check", "MC_DRAWS"]

#: draws of our sample_t for the quantile test
MC_DRAWS = 400_000


TRANSPORT_ARRAYS = ("t", "r", "x", "z", "dF", "F", "F_cond", "F_uncond", "x_t", "v_t",
                    "c_noise_t", "target", "target_enhanced", "x_r")


def _make_transport_from_json(name: str, values: dict, path: pathlib.Path, **extra):
    """make_transport with the JSON's constructor fields; derived values (T_max/T_min of VP/VE)
    are checked against the transport's properties instead of passed."""
    from tim_jax.transports import TRANSPORTS, make_transport

    if name not in TRANSPORTS:
        raise ParityInputError(f"{path}: unknown transport {name!r}; tim_jax has {sorted(TRANSPORTS)}")
    fields = {f.name for f in dataclasses.fields(TRANSPORTS[name])}
    kwargs = {k: v for k, v in values.items() if k in fields}
    kwargs.update(extra)
    tr = make_transport(name, **kwargs)
    for k, v in values.items():
        if k in fields:
            continue
        have = getattr(tr, k, None)
        if have is None or not math.isclose(float(have), float(v), rel_tol=1e-12):
            raise ParityInputError(
                f"{path}: {name}.{k}={v!r} is neither a tim_jax field nor equal to the derived value "
                f"({have!r})")
    return tr


def sample_t_check(directory, name, tr, ref_q: np.ndarray, n_ref: int = 200_000) -> CheckResult:
    """Two-sample Monte-Carlo test of ``tr.sample_t`` against ``n_ref`` reference draws summarised
    by their quantiles ``ref_q`` at k/(Q+1): each fraction of our draws below ``ref_q[k]`` must be
    within ``MC_SIGMAS`` standard errors of k/(Q+1)."""
    qs = np.arange(1, ref_q.size + 1, dtype=np.float64) / (ref_q.size + 1)
    draws = np.sort(np.asarray(tr.sample_t(jax.random.key(0), (MC_DRAWS,)), dtype=np.float64))
    frac = np.searchsorted(draws, np.asarray(ref_q, np.float64), side="right") / draws.size
    se = np.sqrt(qs * (1 - qs) * (1.0 / n_ref + 1.0 / draws.size))
    dev = np.abs(frac - qs)
    z = float(np.max(dev / se))
    return CheckResult(str(directory), f"transports/{name}/sample_t", float(np.max(dev)), z,
                       MC_SIGMAS, bool(np.isfinite(z) and z <= MC_SIGMAS),
                       f"{ref_q.size} quantiles; here max abs err = max|P(ours<=q_ref)-q|, max rel err = "
                       f"max z-score, tolerance in standard errors")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _transport_outputs(tr, tr_enh, j: dict) -> dict:
    """Every transport formula on the reference inputs ``j`` (float64 under x64)."""
    t, r = j["t"], j["r"]
    alpha, sigma, d_alpha, d_sigma = tr.interpolant(t)
    b = lambda v: jnp.reshape(v, (-1,) + (1,) * (j["x"].ndim - 1))  # noqa: E731
    return {
        "x_t": b(alpha) * j["x"] + b(sigma) * j["z"],
        "v_t": b(d_alpha) * j["x"] + b(d_sigma) * j["z"],
        "c_noise_t": tr.c_noise(t),
        # targets and transition take the reference x_t / v_t so each formula is checked alone
        "target": tr.target(j["x_t"], j["v_t"], j["x"], j["z"], t, r, j["dF"]),
        "target_enhanced": tr_enh.target(j["x_t"], j["v_t"], j["x"], j["z"], t, r, j["dF"],
                                         F_cond=j["F_cond"], F_uncond=j["F_uncond"]),
        "x_r": tr.transition(j["x_t"], t, r, j["F"]),
    }


def check_transports(directory: str | pathlib.Path) -> list[CheckResult]:
    """All five transports' formulas in float64 against ``transports.npz`` / ``transports.json``."""
    directory = pathlib.Path(directory)
    npz_path, json_path = directory / "transports.npz", directory / "transports.json"
    data = load_npz(npz_path)
    cfgs = load_json(json_path)
    if not isinstance(cfgs, dict) or not cfgs:
        raise ParityInputError(f"{json_path}: expected {{transport name: constructor values}}")
    tol = TOLERANCES["transport"]
    results = []
    d = str(directory)
    for name, values in cfgs.items():
        if not isinstance(values, dict):
            raise ParityInputError(f"{json_path}: {name}: expected an object of constructor values")
        a = {k: need(data, f"{name}/{k}", npz_path) for k in TRANSPORT_ARRAYS}
        with jax.enable_x64(True):
            tr = _make_transport_from_json(name, values, json_path)
            tr_enh = _make_transport_from_json(name, values, json_path, enhance_target=True)
            j = {k: jnp.asarray(v, jnp.float64) for k, v in a.items()}
            ours = {k: np.asarray(v) for k, v in _transport_outputs(tr, tr_enh, j).items()}
        for k, v in ours.items():
            if v.dtype != np.float64:
                raise AssertionError(f"{name}.{k} computed in {v.dtype}, not float64")
            results.append(compare(d, f"transports/{name}/{k}", v, a[k], tol, "float64"))
        if f"{name}/sample_t_quantiles" in data:
            results.append(sample_t_check(d, name, tr, data[f"{name}/sample_t_quantiles"]))
    return results


def check_time_weights(directory: str | pathlib.Path) -> list[CheckResult]:
    """Interval weights of every ``type/warp/base`` in ``time_weights.npz`` (float32).

    ``sigma_d`` and ``n_diffusion`` come from an optional ``time_weights.json``; defaults:
    sigma_d = 1.0 and n_diffusion = the number of leading rows with r == t.
    """
    from tim_jax.time_weighting import BASES, WARPS, WEIGHT_TYPES, time_weighting

    directory = pathlib.Path(directory)
    path = directory / "time_weights.npz"
    data = load_npz(path)
    t = np.asarray(need(data, "t", path), dtype=np.float32)
    r = np.asarray(need(data, "r", path), dtype=np.float32)
    meta_path = directory / "time_weights.json"
    meta = load_json(meta_path) if meta_path.exists() else {}
    sigma_d = float(meta.get("sigma_d", 1.0))
    n_diff = meta.get("n_diffusion")
    if n_diff is None:
        n_diff = int(np.argmax(np.append(t != r, True)))
    results = []
    keys = [k for k in data if k.count("/") == 2]
    if not keys:
        raise ParityInputError(f"{path}: no 'type/warp/base' arrays")
    for key in keys:
        wtype, warp, base = key.split("/")
        if wtype not in WEIGHT_TYPES or warp not in WARPS or base not in BASES:
            raise ParityInputError(
                f"{path}: {key!r} is not type/warp/base with type in {WEIGHT_TYPES}, warp in "
                f"{WARPS}, base in {BASES}")
        w = time_weighting(t, r, sigma_d=sigma_d, weight_type=wtype, warp=warp, base=base,
                           n_diffusion=n_diff)
        results.append(compare(str(directory), f"time_weights/{key}", np.asarray(w), data[key],
                               TOLERANCES["time_weight"], f"float32, sigma_d={sigma_d:g}"))
    return results
