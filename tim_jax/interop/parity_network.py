"""Parity of the TiM network and the any-step sampler against an official fixture directory.

Files (format: docs/parity-format.md): ``config.json`` (official constructor values) +
``model.safetensors`` (official state dict) + ``io.npz`` (network inputs/outputs, NCHW) and
optionally ``sampler.npz`` (+ ``sampler.json``): sampler trajectories.
"""
from __future__ import annotations

import functools
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.interop.parity_report import (
    TOLERANCES,
    CheckResult,
    ParityInputError,
    compare,
    load_json,
    load_npz,
    nchw_to_nhwc,
    need,
    nhwc_to_nchw,
)

__all__ = ["load_fixture_model", "check_network", "check_sampler"]


def load_fixture_model(directory: str | pathlib.Path, **config_overrides: Any):
    """Build the tim_jax network of a fixture directory: ``(model_config, apply_fn, params)``.

    Reads ``config.json`` (official constructor values) and ``model.safetensors`` (official
    state dict), fp32 compute with ``matmul_precision='highest'`` unless ``config_overrides`` says
    otherwise. Results are cached per (directory, file mtimes and sizes, overrides), so repeated
    checks reuse the compilations.
    """
    directory = pathlib.Path(directory).absolute()
    cfg_path, w_path = directory / "config.json", directory / "model.safetensors"
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None
                  for p in (cfg_path, w_path))
    key = (str(directory), stamp, tuple(sorted((k, repr(v)) for k, v in config_overrides.items())))
    if key not in _MODEL_CACHE:
        if len(_MODEL_CACHE) >= 4:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[key] = _load_fixture_model(cfg_path, w_path, config_overrides)
    return _MODEL_CACHE[key]


_MODEL_CACHE: dict = {}


def _load_fixture_model(cfg_path: pathlib.Path, w_path: pathlib.Path, config_overrides: dict):
    from tim_jax.interop.official_arch import model_config_from_official
    from tim_jax.interop.official_io import load_official_state_dict
    from tim_jax.interop.official_keys import official_to_params
    from tim_jax.models import functional

    official = load_json(cfg_path)
    if not isinstance(official, dict):
        raise ParityInputError(f"{cfg_path}: expected a JSON object of constructor values")
    # exact fp32 matmuls (GPUs/TPUs otherwise use TF32/bf16 passes for fp32 at default precision)
    overrides = {"dtype": "float32", "matmul_precision": "highest", **config_overrides}
    try:
        cfg = model_config_from_official(official, **overrides)
        sd = load_official_state_dict(w_path)
        params = official_to_params(sd, cfg, source=str(w_path))
    except ParityInputError:
        raise
    except ValueError as e:
        raise ParityInputError(str(e)) from e
    return cfg, _apply_fn_for(functional.abstract_model(cfg)[0]), params


@functools.lru_cache(maxsize=8)
def _apply_fn_for(graphdef):
    """One apply_fn per architecture, so equal architectures share jit compilations."""
    from tim_jax.models import functional

    return functional.make_apply_fn(graphdef)


@functools.lru_cache(maxsize=8)
def _jitted(apply_fn):
    """One jitted forward per apply_fn (the fixtures are run many times in tests)."""
    return jax.jit(apply_fn, static_argnames=("return_proj",))


def _cond_from_npz(data: dict, prefix: str, kind: str, path: pathlib.Path):
    """The condition pytree of one case: c2i labels (B,) int32, t2i caption features (B,L,D)."""
    if kind == "c2i":
        return np.asarray(need(data, f"{prefix}y", path)).astype(np.int32)
    return np.asarray(need(data, f"{prefix}y", path), dtype=np.float32)


def check_network(directory: str | pathlib.Path, *, model=None, **config_overrides) -> list[CheckResult]:
    """Network output F and REPA projector output on every ``caseK`` of ``io.npz``.

    Args:
      model: optional ``(model_config, apply_fn, params)`` from :func:`load_fixture_model`.
    """
    directory = pathlib.Path(directory)
    io_path = directory / "io.npz"
    data = load_npz(io_path)
    cfg, apply_fn, params = model or load_fixture_model(directory, **config_overrides)
    kind = getattr(cfg, "kind", None) or cfg.get("kind", "c2i")
    cases = sorted({k.split("/")[0] for k in data if "/" in k})
    if not cases:
        raise ParityInputError(f"{io_path}: no 'caseK/...' arrays")
    results = []
    for case in cases:
        pre = f"{case}/"
        x = nchw_to_nhwc(need(data, pre + "x", io_path)).astype(np.float32)
        t = np.asarray(need(data, pre + "t", io_path), dtype=np.float32)
        r = np.asarray(need(data, pre + "r", io_path), dtype=np.float32)
        cond = _cond_from_npz(data, pre, kind, io_path)
        out, h = _jitted(apply_fn)(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(r),
                                   jnp.asarray(cond), return_proj=True)
        results.append(compare(str(directory), f"network/{case}/out", nhwc_to_nchw(np.asarray(out)),
                               need(data, pre + "out", io_path), TOLERANCES["network"], "fp32"))
        if pre + "h_proj" in data:
            results.append(compare(str(directory), f"network/{case}/h_proj", np.asarray(h),
                                   data[pre + "h_proj"], TOLERANCES["projector"], "fp32"))
    return results


def check_sampler(
    directory: str | pathlib.Path, *, model=None, state_dtypes: Sequence[str] = ("float32",),
    settings: Sequence[str] | None = None, **config_overrides,
) -> list[CheckResult]:
    """Sampler trajectories of ``sampler.npz`` (deterministic; transport from the optional
    ``sampler.json``, default OT-FM with T_max=1, T_min=0).

    Every setting ``sK`` is re-run with ``tim_jax.sampler.sample`` in each of ``state_dtypes``
    ("float32" and/or "float64"; the official sampler keeps the state in float64 and calls the
    network in float32) and the whole trajectory (num_steps + 1, B, C, H, W) is compared.
    ``settings`` restricts the run to some of the ``sK`` names (default: all).
    """
    from tim_jax import sampler
    from tim_jax.transports import make_transport

    directory = pathlib.Path(directory)
    path = directory / "sampler.npz"
    data = load_npz(path)
    cfg, apply_fn, params = model or load_fixture_model(directory, **config_overrides)
    kind = getattr(cfg, "kind", None) or cfg.get("kind", "c2i")
    z = nchw_to_nhwc(need(data, "z", path)).astype(np.float32)
    if kind == "c2i":
        y = np.asarray(need(data, "y", path)).astype(np.int32)
        y_null = np.asarray(need(data, "y_null", path)).astype(np.int32)
    else:
        y = np.asarray(need(data, "y", path), dtype=np.float32)
        y_null = np.asarray(need(data, "y_null", path), dtype=np.float32)
    meta_path = directory / "sampler.json"
    meta = load_json(meta_path) if meta_path.exists() else {}
    try:
        transport = make_transport(meta.get("transport", "OT_FM"),
                                   **meta.get("transport_params", {"T_max": 1.0, "T_min": 0.0}))
    except ValueError as e:
        raise ParityInputError(f"{meta_path}: {e}") from e
    present = sorted({k.split("/")[0] for k in data if k.endswith("/settings")},
                     key=lambda s: (len(s), s))
    if not present:
        raise ParityInputError(f"{path}: no 'sK/settings' arrays")
    if settings is not None and (absent := set(settings) - set(present)):
        raise ValueError(f"sampler settings {sorted(absent)} not in {path} (has {present})")
    settings = present if settings is None else [s for s in present if s in settings]
    results = []
    for dtype_name in state_dtypes:
        if dtype_name not in ("float32", "float64"):
            raise ValueError(f"state_dtypes entries must be 'float32' or 'float64', got {dtype_name!r}")
        for s in settings:
            st = np.asarray(data[f"{s}/settings"], dtype=np.float64).ravel()
            if st.size < 4:
                raise ParityInputError(f"{path}: {s}/settings needs >= 4 values, got {st.size}")
            num_steps, cfg_scale, cfg_low, cfg_high = int(st[0]), float(st[1]), float(st[2]), float(st[3])
            mode = "transition" if st.size < 5 or st[4] else "diffusion"
            ref = need(data, f"{s}/traj", path)
            with jax.enable_x64(dtype_name == "float64"):
                state_dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
                # z stays float32: its dtype is the network input dtype (as officially)
                _, traj = sampler.sample(
                    apply_fn, params, jnp.asarray(z), jnp.asarray(y), jnp.asarray(y_null),
                    transport=transport, num_steps=num_steps, cfg_scale=cfg_scale, cfg_low=cfg_low,
                    cfg_high=cfg_high, mode=mode, return_trajectory=True, state_dtype=state_dtype)
                traj = np.asarray(traj)
            note = (f"{dtype_name} state; steps={num_steps} cfg={cfg_scale:g} "
                    f"[{cfg_low:g},{cfg_high:g}] {mode}")
            results.append(compare(str(directory), f"sampler/{s}/traj[{dtype_name}]",
                                   nhwc_to_nchw(traj), ref, TOLERANCES["sampler"], note))
    return results
