"""Parity of the pretrained encoders (VAEs, text encoder, REPA encoders) against Hub-folder
fixtures made with the reference libraries (diffusers, transformers).

A fixture folder is a ``save_pretrained`` folder plus ``io.npz``; its ``config.json`` names the
kind (``_class_name`` for diffusers, ``model_type`` for transformers), which selects the encoder
module whose ``parity_check(folder)`` runs it and returns its errors per output. A check passes
when each relative error (max |ours - ref| / max |ref|) is within the module's
``PARITY_TOLERANCE``, or ``TOLERANCES["encoder"]`` (1e-5) where the module sets none.
"""
from __future__ import annotations

import importlib
import math
import pathlib
from collections.abc import Mapping
from typing import Any

from tim_jax.interop.parity_report import TOLERANCES, CheckResult, ParityInputError

__all__ = ["ENCODER_KINDS", "encoder_module_for", "check_encoder", "results_from_report"]

#: (config.json field, value) -> the module whose ``parity_check(folder)`` checks that kind
ENCODER_KINDS: dict[tuple[str, str], str] = {
    ("_class_name", "AutoencoderKL"): "tim_jax.encoders.sd_vae",
    ("_class_name", "AutoencoderDC"): "tim_jax.encoders.dc_ae",
    ("model_type", "gemma3_text"): "tim_jax.encoders.gemma3",
    ("model_type", "dinov2"): "tim_jax.encoders.dinov2",
    ("model_type", "radio_vit"): "tim_jax.encoders.radio",
}
_ABS_KEYS = ("max_abs_err", "max_abs")
_REL_KEYS = ("max_rel_err", "max_rel")


def encoder_module_for(config: Mapping[str, Any], directory: str | pathlib.Path) -> str | None:
    """The module checking a folder with this ``config.json``; None when the config names no
    kind (no ``_class_name`` / ``model_type``: not an encoder folder).

    Raises:
      ParityInputError: the config names a kind no tim_jax module checks.
    """
    tags = {f: config[f] for f in ("_class_name", "model_type") if f in config}
    if not tags:
        return None
    for field, value in tags.items():
        if (field, value) in ENCODER_KINDS:
            return ENCODER_KINDS[(field, value)]
    known = ", ".join(f"{f}={v!r}" for f, v in ENCODER_KINDS)
    raise ParityInputError(
        f"{directory}: unknown fixture kind: config.json has "
        f"{', '.join(f'{f}={v!r}' for f, v in tags.items())}; tim_jax checks {known}")


def _first(entry: Mapping, keys: tuple[str, ...]):
    for k in keys:
        if k in entry:
            return float(entry[k])
    return None


def results_from_report(directory: str | pathlib.Path, module_name: str, report: Mapping,
                        tolerance: float) -> list[CheckResult]:
    """:class:`CheckResult` records from a ``parity_check`` report: ``{output: {"max_abs_err",
    "max_rel_err", ...}}`` (or one flat ``{"max_abs", "max_rel", ...}`` for a single output).
    An output passes when its relative error is finite and within ``tolerance`` and the report
    does not say ``"passed": False``.

    Raises:
      ParityInputError: an entry lacks a max relative error.
    """
    short = module_name.rsplit(".", 1)[-1]
    if not isinstance(report, Mapping) or not report:
        raise ParityInputError(f"{directory}: {module_name}.parity_check returned {report!r}, "
                               "not a dict of errors")
    nested = all(isinstance(v, Mapping) for v in report.values())
    entries = report.items() if nested else [("output", report)]
    results = []
    for name, entry in entries:
        rel, abs_ = _first(entry, _REL_KEYS), _first(entry, _ABS_KEYS)
        if rel is None:
            raise ParityInputError(
                f"{directory}: {module_name}.parity_check gives no max relative error for "
                f"{name!r} (keys {sorted(entry)}; expected one of {_REL_KEYS})")
        passed = math.isfinite(rel) and rel <= tolerance and entry.get("passed", True) is not False
        extra = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
                 if k not in _ABS_KEYS + _REL_KEYS + ("passed", "tolerance")]
        note = "; ".join([f"{module_name}.parity_check", *extra])
        results.append(CheckResult(str(directory), f"{short}/{name}",
                                   float("nan") if abs_ is None else abs_, rel, tolerance,
                                   bool(passed), note))
    return results


def check_encoder(directory: str | pathlib.Path, module_name: str) -> list[CheckResult]:
    """Run ``module_name.parity_check(directory)`` and turn its report into results.

    Raises:
      ParityInputError: the module or its ``parity_check`` is missing, or the check cannot read
        the folder (missing / inconsistent files).
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ParityInputError(f"{directory}: the checker {module_name} cannot be imported ({e})") from e
    check = getattr(module, "parity_check", None)
    if check is None:
        raise ParityInputError(f"{directory}: {module_name} has no parity_check(folder)")
    tolerance = float(getattr(module, "PARITY_TOLERANCE", TOLERANCES["encoder"]))
    try:
        report = check(pathlib.Path(directory))
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ParityInputError):
            raise
        raise ParityInputError(f"{directory}: {module_name}.parity_check: {type(e).__name__}: {e}") from e
    return results_from_report(directory, module_name, report, tolerance)
