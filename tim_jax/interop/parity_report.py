"""The records, metrics and file readers shared by the parity checks.

Errors: ``max abs err = max |ours - ref|``; ``max rel err = max abs err / max |ref|`` (error
relative to the output scale). A check passes when the relative error is within its tolerance
and everything is finite.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import zipfile
from typing import Any, Iterable

import numpy as np

__all__ = [
    "CheckResult",
    "ParityInputError",
    "TOLERANCES",
    "MC_SIGMAS",
    "compare",
    "format_line",
    "format_table",
    "load_npz",
    "load_json",
    "need",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
]

#: relative-to-scale tolerances per check family
TOLERANCES = {
    "network": 1e-5,      # fp32 network output F, relative to max |F_ref|
    "projector": 1e-5,    # fp32 REPA projector output
    "sampler": 1e-4,      # sampler trajectories (the state after every step)
    "transport": 1e-10,   # float64 transport formulas
    "time_weight": 1e-6,  # float32 interval weights
    "encoder": 1e-5,      # fp32 encoder outputs, unless the encoder module sets PARITY_TOLERANCE
    "resize": 1e-6,       # float32 resizes: two 4-tap passes, torch and tim_jax differ by ulps
}
#: standard errors allowed for each sample_t quantile (two-sample test; 99 quantiles)
MC_SIGMAS = 5.0


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


def format_line(r: CheckResult) -> str:
    """One line per check: ``PASS  DIR  quantity  max abs err ...  max rel err ... <= tol  note``."""
    verdict = "PASS" if r.passed else "FAIL"
    rel_op = "<=" if r.passed else "> "
    note = f"  ({r.note})" if r.note else ""
    return (f"{verdict}  {pathlib.Path(r.directory).name}  {r.quantity}  "
            f"max abs err {r.max_abs_err:.3e}  max rel err {r.max_rel_err:.3e} {rel_op} "
            f"{r.tolerance:.0e}{note}")


def format_table(results: Iterable[CheckResult], title: str | None = None) -> str:
    """The results as lines of :func:`format_line`, under an optional title line."""
    lines = [title] if title else []
    return "\n".join(lines + [format_line(r) for r in results])


def load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    """All arrays of a plain ``.npz`` (no pickles); ParityInputError when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ParityInputError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e


def load_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParityInputError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from e


def need(d: dict, key: str, path: pathlib.Path) -> np.ndarray:
    """``d[key]``, or a ParityInputError naming the file and the keys present."""
    if key not in d:
        raise ParityInputError(f"{path}: missing array {key!r} (present: {sorted(d)[:12]} ...)")
    return d[key]


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -3, -1)


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(x), -1, -3)
