"""Numerics parity of tim_jax against numbers dumped from the official PyTorch TiM.

``python -m tim_jax.parity DIR [DIR ...]`` checks every fixture directory (format:
``tim_jax/PARITY_FORMAT.md``; any subset of the files may be present):

=========================================  ====================================================
files                                      checks
=========================================  ====================================================
config.json + model.safetensors + io.npz   network output F and REPA projector output, fp32
 ... + sampler.npz                         any-step sampler trajectories (fp32 state; with
                                           ``--state-f64`` also float64 state)
transports.npz + transports.json           interpolant, c_noise, targets, transition (float64),
                                           sample_t quantiles (Monte-Carlo test)
time_weights.npz                           interval loss weights (float32)
=========================================  ====================================================

and prints one table per directory (quantity, max abs err, max rel err, tolerance, PASS/FAIL).
Exit status: 0 all checks pass, 1 some check exceeds its tolerance, 2 unusable input (a missing
or unreadable directory, no recognised files, corrupt or inconsistent files).

Errors: ``max abs err = max |ours - ref|``; ``max rel err = max abs err / max |ref|`` (error
relative to the output scale). A check passes when the relative error is within its tolerance
(``TOLERANCES``). The sample_t check is a two-sample Monte-Carlo test: for each reference
quantile q the fraction of our draws below it must lie within ``MC_SIGMAS`` standard errors of q;
its columns hold the max |fraction - q| and the max z-score.

``--live`` (needs the torch extra, timm and the official ``tim`` package, ``--official-repo``)
runs the official network and tim_jax on random inputs with the same weights and reports
per-block differences in fp32 and bf16 (see :func:`live_compare`).

The library functions (:func:`check_directory` and the ``check_*`` functions) return
:class:`CheckResult` records; the CLI only formats them.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import zipfile
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CheckResult",
    "ParityInputError",
    "TOLERANCES",
    "MC_SIGMAS",
    "compare",
    "check_network",
    "check_sampler",
    "check_transports",
    "check_time_weights",
    "check_directory",
    "format_table",
    "live_compare",
    "main",
]

#: relative-to-scale tolerances per check family
TOLERANCES = {
    "network": 1e-5,      # fp32 network output F, relative to max |F_ref|
    "projector": 1e-5,    # fp32 REPA projector output
    "sampler": 1e-4,      # sampler trajectories (the state after every step)
    "transport": 1e-10,   # float64 transport formulas
    "time_weight": 1e-6,  # float32 interval weights
}
#: standard errors allowed for each sample_t quantile (two-sample test; 99 quantiles)
MC_SIGMAS = 5.0
#: draws of our sample_t for the quantile test
MC_DRAWS = 400_000


class ParityInputError(ValueError):
    """The fixture directory cannot be used (missing/corrupt/inconsistent files). Exit code 2."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One compared quantity.

    Attributes:
      directory: fixture directory.
      quantity: what was compared, e.g. ``"network/case0/out"``.
      max_abs_err: max |ours - ref|.
      max_rel_err: max_abs_err / max |ref| (the quantity the tolerance applies to).
      tolerance: bound on max_rel_err.
      passed: max_rel_err <= tolerance (and everything finite).
      note: extra detail (scale, dtype, settings).
    """

    directory: str
    quantity: str
    max_abs_err: float
    max_rel_err: float
    tolerance: float
    passed: bool
    note: str = ""


def compare(directory: str, quantity: str, ours: Any, ref: Any, tol: float, note: str = "") -> CheckResult:
    """Compare two arrays of equal shape in float64; see the module docstring for the metrics."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        raise ParityInputError(
            f"{directory}: {quantity}: tim_jax gives shape {ours.shape}, reference has {ref.shape}")
    err = np.abs(ours - ref)
    abs_err = float(np.max(err)) if err.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = abs_err / scale if scale > 0 else abs_err
    finite = bool(np.all(np.isfinite(ours)) and np.isfinite(abs_err))
    if not finite:
        abs_err = rel = float("inf")
    note = (note + "; " if note else "") + f"scale {scale:.3g}"
    return CheckResult(str(directory), quantity, abs_err, rel, tol, finite and rel <= tol, note)


# ----------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------
def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ParityInputError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e


def _load_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParityInputError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from e


def _need(d: dict, key: str, path: pathlib.Path) -> np.ndarray:
    if key not in d:
        raise ParityInputError(f"{path}: missing array {key!r} (present: {sorted(d)[:12]} ...)")
    return d[key]


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -3, -1)


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, -3)


# ----------------------------------------------------------------------------------------------
# network
# ----------------------------------------------------------------------------------------------
def load_fixture_model(directory: str | pathlib.Path, **config_overrides: Any):
    """Build the tim_jax network of a fixture directory: ``(model_config, apply_fn, params)``.

    Reads ``config.json`` (official constructor values) and ``model.safetensors`` (official
    state dict), fp32 compute with ``matmul_precision='highest'`` unless ``config_overrides`` says
    otherwise. Results are cached per
    (directory, file mtimes and sizes, overrides), so repeated checks reuse the compilations.
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
    from tim_jax import convert
    from tim_jax.models import functional

    official = _load_json(cfg_path)
    if not isinstance(official, dict):
        raise ParityInputError(f"{cfg_path}: expected a JSON object of constructor values")
    # exact fp32 matmuls (GPUs/TPUs otherwise use TF32/bf16 passes for fp32 at default precision)
    overrides = {"dtype": "float32", "matmul_precision": "highest", **config_overrides}
    try:
        cfg = convert.model_config_from_official(official, **overrides)
        sd = convert.load_official_state_dict(w_path)
        params = convert.official_to_params(sd, cfg, source=str(w_path))
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
        return np.asarray(_need(data, f"{prefix}y", path)).astype(np.int32)
    return np.asarray(_need(data, f"{prefix}y", path), dtype=np.float32)


def check_network(directory: str | pathlib.Path, *, model=None, **config_overrides) -> list[CheckResult]:
    """Network output F and REPA projector output on every ``caseK`` of ``io.npz``.

    Args:
      model: optional ``(model_config, apply_fn, params)`` from :func:`load_fixture_model`.
    """
    directory = pathlib.Path(directory)
    io_path = directory / "io.npz"
    data = _load_npz(io_path)
    cfg, apply_fn, params = model or load_fixture_model(directory, **config_overrides)
    kind = getattr(cfg, "kind", None) or cfg.get("kind", "c2i")
    cases = sorted({k.split("/")[0] for k in data if "/" in k})
    if not cases:
        raise ParityInputError(f"{io_path}: no 'caseK/...' arrays")
    results = []
    for case in cases:
        pre = f"{case}/"
        x = nchw_to_nhwc(_need(data, pre + "x", io_path)).astype(np.float32)
        t = np.asarray(_need(data, pre + "t", io_path), dtype=np.float32)
        r = np.asarray(_need(data, pre + "r", io_path), dtype=np.float32)
        cond = _cond_from_npz(data, pre, kind, io_path)
        out, h = _jitted(apply_fn)(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(r), jnp.asarray(cond),
                          return_proj=True)
        results.append(compare(str(directory), f"network/{case}/out", nhwc_to_nchw(np.asarray(out)),
                               _need(data, pre + "out", io_path), TOLERANCES["network"], "fp32"))
        if pre + "h_proj" in data:
            results.append(compare(str(directory), f"network/{case}/h_proj", np.asarray(h),
                                   data[pre + "h_proj"], TOLERANCES["projector"], "fp32"))
    return results


# ----------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------
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
    data = _load_npz(path)
    cfg, apply_fn, params = model or load_fixture_model(directory, **config_overrides)
    kind = getattr(cfg, "kind", None) or cfg.get("kind", "c2i")
    z = nchw_to_nhwc(_need(data, "z", path)).astype(np.float32)
    if kind == "c2i":
        y = np.asarray(_need(data, "y", path)).astype(np.int32)
        y_null = np.asarray(_need(data, "y_null", path)).astype(np.int32)
    else:
        y = np.asarray(_need(data, "y", path), dtype=np.float32)
        y_null = np.asarray(_need(data, "y_null", path), dtype=np.float32)
    meta_path = directory / "sampler.json"
    meta = _load_json(meta_path) if meta_path.exists() else {}
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
            ref = _need(data, f"{s}/traj", path)
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


# ----------------------------------------------------------------------------------------------
# transports
# ----------------------------------------------------------------------------------------------
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


def _sample_t_check(directory, name, tr, ref_q: np.ndarray, n_ref: int = 200_000) -> CheckResult:
    qs = np.arange(1, ref_q.size + 1, dtype=np.float64) / (ref_q.size + 1)
    draws = np.sort(np.asarray(tr.sample_t(jax.random.key(0), (MC_DRAWS,)), dtype=np.float64))
    frac = np.searchsorted(draws, np.asarray(ref_q, np.float64), side="right") / draws.size
    se = np.sqrt(qs * (1 - qs) * (1.0 / n_ref + 1.0 / draws.size))
    dev = np.abs(frac - qs)
    z = float(np.max(dev / se))
    return CheckResult(str(directory), f"transports/{name}/sample_t", float(np.max(dev)), z,
                       MC_SIGMAS, bool(np.isfinite(z) and z <= MC_SIGMAS),
                       f"quantiles {ref_q.size}; cols: max|P(ours<=q_ref)-q|, max z-score vs {MC_SIGMAS:g}σ")


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
    data = _load_npz(npz_path)
    cfgs = _load_json(json_path)
    if not isinstance(cfgs, dict) or not cfgs:
        raise ParityInputError(f"{json_path}: expected {{transport name: constructor values}}")
    tol = TOLERANCES["transport"]
    results = []
    d = str(directory)
    for name, values in cfgs.items():
        if not isinstance(values, dict):
            raise ParityInputError(f"{json_path}: {name}: expected an object of constructor values")
        a = {k: _need(data, f"{name}/{k}", npz_path) for k in TRANSPORT_ARRAYS}
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
            results.append(_sample_t_check(d, name, tr, data[f"{name}/sample_t_quantiles"]))
    return results


# ----------------------------------------------------------------------------------------------
# time weights
# ----------------------------------------------------------------------------------------------
def check_time_weights(directory: str | pathlib.Path) -> list[CheckResult]:
    """Interval weights of every ``type/warp/base`` in ``time_weights.npz`` (float32).

    ``sigma_d`` and ``n_diffusion`` come from an optional ``time_weights.json``; defaults:
    sigma_d = 1.0 and n_diffusion = the number of leading rows with r == t.
    """
    from tim_jax.time_weighting import BASES, WARPS, WEIGHT_TYPES, time_weighting

    directory = pathlib.Path(directory)
    path = directory / "time_weights.npz"
    data = _load_npz(path)
    t = np.asarray(_need(data, "t", path), dtype=np.float32)
    r = np.asarray(_need(data, "r", path), dtype=np.float32)
    meta_path = directory / "time_weights.json"
    meta = _load_json(meta_path) if meta_path.exists() else {}
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


# ----------------------------------------------------------------------------------------------
# directory
# ----------------------------------------------------------------------------------------------
def check_directory(
    directory: str | pathlib.Path, *, state_dtypes: Sequence[str] = ("float32",), **config_overrides
) -> list[CheckResult]:
    """Run every check whose files are present in ``directory``.

    Raises:
      ParityInputError: missing directory, no recognised fixture files, corrupt/inconsistent files.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ParityInputError(f"{directory}: not a directory")
    has = lambda *names: all((directory / n).is_file() for n in names)  # noqa: E731
    results: list[CheckResult] = []
    ran = False
    if has("io.npz") or has("sampler.npz"):
        if not has("config.json", "model.safetensors"):
            raise ParityInputError(
                f"{directory}: io.npz/sampler.npz need config.json and model.safetensors beside them")
        model = load_fixture_model(directory, **config_overrides)
        if has("io.npz"):
            results += check_network(directory, model=model)
        if has("sampler.npz"):
            results += check_sampler(directory, model=model, state_dtypes=state_dtypes)
        ran = True
    if has("transports.npz") or has("transports.json"):
        if not has("transports.npz", "transports.json"):
            raise ParityInputError(f"{directory}: transports.npz and transports.json go together")
        results += check_transports(directory)
        ran = True
    if has("time_weights.npz"):
        results += check_time_weights(directory)
        ran = True
    if not ran:
        present = sorted(p.name for p in directory.iterdir())[:12]
        raise ParityInputError(
            f"{directory}: no fixture files (io.npz, sampler.npz, transports.npz, time_weights.npz); "
            f"found {present}")
    return results


def format_table(results: Iterable[CheckResult], title: str | None = None) -> str:
    rows = [("quantity", "max abs err", "max rel err", "tolerance", "result", "note")]
    for r in results:
        rows.append((r.quantity, f"{r.max_abs_err:.3e}", f"{r.max_rel_err:.3e}", f"{r.tolerance:.0e}",
                     "PASS" if r.passed else "FAIL", r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [title] if title else []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * 5 + 4))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# live comparison with the official torch model
# ----------------------------------------------------------------------------------------------
#: tolerance of the bf16 live comparison (tim_jax bf16 vs official bf16 autocast), relative
LIVE_BF16_TOL = 5e-2


def _install_stub_modules() -> list[str]:
    """Make the official model code importable without its GPU-only / heavy deps.

    * ``flash_attn`` (imported at module top, unused with ``attn_type='fused_attn'``): a stub whose
      ``flash_attn_func`` raises.
    * ``timm`` (only ``SwiGLU`` and ``PatchEmbed`` are used): minimal re-implementations with
      timm's parameter names and forward (``fc2(act(fc1_g(x)) * fc1_x(x))``; a stride-p conv
      flattened to tokens).
    Only modules that cannot be imported are stubbed. Returns the names stubbed.
    """
    import importlib.util
    import types

    import torch
    from torch import nn

    def missing(name: str) -> bool:
        if name in sys.modules:  # imported already (possibly our stub from an earlier call)
            return False
        return importlib.util.find_spec(name) is None

    if missing("flash_attn"):
        mod = types.ModuleType("flash_attn")

        def flash_attn_func(*_, **__):
            raise RuntimeError("flash_attn is stubbed by tim_jax.parity; use attn_type='fused_attn'")

        mod.flash_attn_func = flash_attn_func
        mod._tim_jax_stub = True
        sys.modules["flash_attn"] = mod
    if missing("timm"):
        class SwiGLU(nn.Module):
            def __init__(self, in_features, hidden_features=None, out_features=None,
                         act_layer=nn.SiLU, norm_layer=None, bias=True, drop=0.0):
                super().__init__()
                hidden_features = hidden_features or in_features
                out_features = out_features or in_features
                self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias)
                self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias)
                self.act = act_layer()
                self.norm = norm_layer(hidden_features) if norm_layer else nn.Identity()
                self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

            def forward(self, x):
                return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))

        class PatchEmbed(nn.Module):
            def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True,
                         strict_img_size=True, **_):
                super().__init__()
                self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

            def forward(self, x):
                return self.proj(x).flatten(2).transpose(1, 2)

        class _Unused(nn.Module):
            def __init__(self, *_, **__):
                raise RuntimeError("this timm class is stubbed by tim_jax.parity")

        names = {"timm": {}, "timm.layers": {}, "timm.layers.mlp": {"SwiGLU": SwiGLU, "Mlp": _Unused},
                 "timm.models": {},
                 "timm.models.vision_transformer": {"PatchEmbed": PatchEmbed, "Attention": _Unused}}
        for name, attrs in names.items():
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            mod._tim_jax_stub = True
            sys.modules[name] = mod
    del torch
    return [n for n in ("flash_attn", "timm") if getattr(sys.modules.get(n), "_tim_jax_stub", False)]


def _official_model(official_cfg: dict, kind: str, state_dict: dict, official_repo: str | None):
    try:
        import torch
    except ImportError as e:
        raise ParityInputError(
            "--live needs torch: pip install 'tim-jax[torch]' (torch==2.13.0)") from e
    if official_repo:
        repo = str(pathlib.Path(official_repo).absolute())
        if not (pathlib.Path(repo) / "tim").is_dir():
            raise ParityInputError(f"--official-repo {official_repo}: no 'tim' package inside")
        if repo not in sys.path:
            sys.path.insert(0, repo)
    stubbed = _install_stub_modules()
    import importlib

    try:
        module = importlib.import_module(f"tim.models.{kind}.tim_model")
    except ImportError as e:
        raise ParityInputError(
            f"cannot import the official tim.models.{kind}.tim_model ({e}); pass --official-repo PATH "
            "of a WZDTHU/TiM checkout") from e
    net = module.TiM(**official_cfg)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state_dict.items()}
    net.load_state_dict(tensors, strict=True)
    return net.eval().float(), stubbed


def _tim_jax_intermediates(model, x, t, r, cond, kind: str) -> dict:
    """Same computation as the model's forward, returning every stage (list block layout)."""
    from tim_jax.models import layers as L

    b, h_img, w_img, _ = x.shape
    p = model.patch_size
    h, w = h_img // p, w_img // p
    out = {}
    tokens = model.x_embedder(x).astype(jnp.float32)
    out["x_embedder"] = tokens
    emb_t, delta = model.time_embeddings(t, r)
    emb_t, delta = emb_t[:, None, :], delta[:, None, :]
    if kind == "c2i":
        c, extra = emb_t + delta + model.y_embedder(cond)[:, None, :], ()
    else:
        c, extra = emb_t + delta, (model.y_embedder(cond),)
        out["y_embedder"] = extra[0]
    rope = L.rope_tables(h, w, model.head_dim)
    for i in range(model.depth):
        tokens = model.blocks[i](tokens, *extra, c, delta, rope)
        out[f"block{i}"] = tokens
        if i + 1 == model.encoder_depth:
            out["projector"] = model.projector(tokens).astype(jnp.float32)
    out["final_layer"] = model.final_layer(tokens, c)
    return out


def live_compare(
    directory: str | pathlib.Path, *, official_repo: str | None = None, batch: int = 2, seed: int = 0,
    precisions: Sequence[str] = ("fp32", "bf16"), **config_overrides,
) -> list[CheckResult]:
    """Official torch network vs tim_jax on random inputs, stage by stage, fp32 and/or bf16.

    ``directory`` holds ``config.json`` + ``model.safetensors`` (any official checkpoint of that
    architecture, converted to safetensors). The official network runs on CPU with
    ``attn_type='fused_attn'``; forward hooks capture x_embedder, y_embedder (t2i), every block,
    the projector and the final layer (tokens before unpatchify), compared with the tim_jax
    stages of the same weights. fp32 rows must be within 1e-5 of the scale; bf16 rows (tim_jax
    ``dtype='bfloat16'`` vs torch CPU bf16 autocast) within ``LIVE_BF16_TOL``, their note gives
    the official bf16-vs-fp32 error as the inherent bf16 noise level.
    """
    import torch
    from flax import nnx

    from tim_jax import convert

    directory = pathlib.Path(directory)
    official_cfg = _load_json(directory / "config.json")
    cfg, _, params = load_fixture_model(directory, **{**config_overrides, "scan_blocks": False})
    kind = cfg.kind
    sd = convert.load_official_state_dict(directory / "model.safetensors")
    net, stubbed = _official_model(official_cfg, kind, sd, official_repo)

    rng = np.random.default_rng(seed)
    size, ch = int(cfg.input_size), int(cfg.in_channels)
    x = rng.standard_normal((batch, ch, size, size)).astype(np.float32)
    t = rng.uniform(0.05, 1.0, batch).astype(np.float32)
    r = (t * rng.uniform(0.0, 1.0, batch)).astype(np.float32)
    r[0] = t[0]  # a diffusion row
    if kind == "c2i":
        rows = int(cfg.num_classes) + int(float(cfg.class_dropout_prob) > 0)
        cond = rng.integers(0, rows, batch).astype(np.int64)
    else:
        cond = rng.standard_normal((batch, 7, int(cfg.cap_feat_dim))).astype(np.float32)

    def run_official(autocast: bool) -> dict:
        got = {}
        hooks = [net.x_embedder.register_forward_hook(lambda m, i, o: got.__setitem__("x_embedder", o)),
                 net.projector.register_forward_hook(lambda m, i, o: got.__setitem__("projector", o)),
                 net.final_layer.register_forward_hook(lambda m, i, o: got.__setitem__("final_layer", o))]
        if kind == "t2i":
            hooks.append(net.y_embedder.register_forward_hook(
                lambda m, i, o: got.__setitem__("y_embedder", o)))
        for i, blk in enumerate(net.blocks):
            hooks.append(blk.register_forward_hook(
                lambda m, inp, o, i=i: got.__setitem__(f"block{i}", o)))
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(r),
                    torch.from_numpy(cond), attn_type="fused_attn", return_zs=True)
        finally:
            for hk in hooks:
                hk.remove()
        return {k: v.float().numpy() for k, v in got.items()}

    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise ValueError(f"precisions must be a non-empty subset of ('fp32', 'bf16'); got {precisions}")
    ref32 = run_official(False)
    ref16 = run_official(True) if "bf16" in precisions else None
    results = []
    x_nhwc = jnp.asarray(nchw_to_nhwc(x))
    jcond = jnp.asarray(cond.astype(np.int32) if kind == "c2i" else cond)
    note_stub = f"stubbed: {'+'.join(stubbed)}" if stubbed else ""
    for tag, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        if tag not in precisions:
            continue
        model_cfg = cfg.copy_and_resolve_references()
        model_cfg.dtype = dtype
        from tim_jax.models import functional

        graphdef = functional.abstract_model(model_cfg)[0]

        @jax.jit
        def stages(params, x_, t_, r_, c_):
            return _tim_jax_intermediates(nnx.merge(graphdef, params), x_, t_, r_, c_, kind)

        ours = {k: np.asarray(v, np.float32) for k, v in
                stages(params, x_nhwc, jnp.asarray(t), jnp.asarray(r), jcond).items()}
        ref = ref32 if tag == "fp32" else ref16
        for k in ref:
            if tag == "fp32":
                note = note_stub
                tol = TOLERANCES["network"]
            else:
                inherent = compare(str(directory), k, ref16[k], ref32[k], 1.0).max_rel_err
                note = f"official bf16 vs fp32: {inherent:.2e}" + (f"; {note_stub}" if note_stub else "")
                tol = LIVE_BF16_TOL
            results.append(compare(str(directory), f"live/{k}[{tag}]", ours[k], ref[k], tol, note))
    return results


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.parity",
        description="Check tim_jax against official-TiM fixture directories (tim_jax/PARITY_FORMAT.md).")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="fixture directories")
    p.add_argument("--state-f64", action="store_true",
                   help="also run the sampler with a float64 state (as the official sampler)")
    p.add_argument("--scan-blocks", action="store_true", help="build the network with scanned blocks")
    p.add_argument("--live", action="store_true",
                   help="instead of fixtures: run the official torch model of each DIR's config.json/"
                   "model.safetensors and tim_jax on random inputs, per-block errors (needs torch)")
    p.add_argument("--official-repo", help="path of an official TiM checkout (added to sys.path) for --live")
    p.add_argument("--batch", type=int, default=2, help="--live: batch size of the random inputs")
    p.add_argument("--seed", type=int, default=0, help="--live: seed of the random inputs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"scan_blocks": True} if args.scan_blocks else {}
    failed = unusable = False
    for d in args.dirs:
        try:
            if args.live:
                results = live_compare(d, official_repo=args.official_repo, batch=args.batch,
                                       seed=args.seed, **overrides)
            else:
                results = check_directory(
                    d, state_dtypes=("float32", "float64") if args.state_f64 else ("float32",), **overrides)
        except ParityInputError as e:
            print(f"{d}: UNUSABLE INPUT\n  {e}", file=sys.stderr)
            unusable = True
            continue
        print(format_table(results, title=f"== {d}"))
        n_fail = sum(not r.passed for r in results)
        print(f"{len(results) - n_fail}/{len(results)} passed\n")
        failed |= n_fail > 0
    if unusable:
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
