"""Validation of one sampling request (conditions, size, sampler settings), before any compile.

:func:`make_request` turns the user's arguments into a :class:`SampleRequest` or raises a
ValueError that names the problem: a label outside the model's classes, prompts for a class
model or labels for a text model, an image size that is not a multiple of VAE factor x patch
size (with the nearest valid sizes), a bad step count, guidance scale or window.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import numpy as np

from tim_jax.inference.images import check_size

__all__ = ["SampleRequest", "make_request", "random_labels"]

MODES = ("transition", "diffusion")


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """A validated request. ``labels`` (c2i) or ``prompts`` (t2i) hold one entry per sample;
    ``latent_hw`` = (height, width) // VAE factor; ``cfg_low``/``cfg_high`` are fractions of
    T_max (guidance where cfg_low*T_max < t < cfg_high*T_max and cfg_scale > 1)."""

    labels: tuple[int, ...] | None
    prompts: tuple[str, ...] | None
    height: int
    width: int
    latent_hw: tuple[int, int]
    num_steps: int
    cfg_scale: float
    cfg_low: float
    cfg_high: float
    stochasticity: float
    mode: str
    seed: int
    batch_size: int | None

    @property
    def num_samples(self) -> int:
        return len(self.labels if self.labels is not None else self.prompts)

    def settings(self) -> dict[str, Any]:
        """The request as a JSON-ready dict (what ``settings.json`` records)."""
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def random_labels(num: int, num_classes: int, seed: int = 0) -> list[int]:
    """``num`` class labels drawn uniformly from [0, num_classes) (as the official C2I sampler
    draws them, here from numpy's generator seeded with ``seed``)."""
    if num < 1:
        raise ValueError(f"the number of random labels must be >= 1, got {num}")
    return [int(v) for v in np.random.default_rng(int(seed)).integers(0, num_classes, num)]


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def _real(name: str, v, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    v = float(v)
    bad = not np.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (
        hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo if lo is not None else '-inf'}, "
                         f"{hi if hi is not None else 'inf'}{rb}, got {v}")
    return v


def _labels(labels, kind: str, num_classes: int | None) -> tuple[int, ...]:
    if kind != "c2i":
        raise ValueError("this is a text-to-image (t2i) model: give prompts, not class labels")
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"labels must be a sequence of integers, got the string {labels!r}")
    labels = list(np.asarray(labels).reshape(-1)) if isinstance(labels, np.ndarray) else list(labels)
    if not labels:
        raise ValueError("labels is empty: give at least one class label")
    bad = [v for v in labels if not _is_int(v)]
    if bad:
        raise ValueError(f"class labels must be integers, got {bad[:5]}")
    out = tuple(int(v) for v in labels)
    outside = [v for v in out if not 0 <= v < num_classes]
    if outside:
        raise ValueError(f"label(s) {outside[:8]} outside the model's classes 0..{num_classes - 1}")
    return out


def _prompts(prompts, kind: str) -> tuple[str, ...]:
    if kind != "t2i":
        raise ValueError("this is a class-conditional (c2i) model: give class labels, not prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {bad[:3]}")
    return tuple(prompts)


def make_request(
    *,
    kind: str,
    num_classes: int | None,
    spatial_factor: int,
    patch_size: int,
    default_size: tuple[int, int],
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_steps: int = 4,
    cfg_scale: float = 1.0,
    cfg_interval: Sequence[float] = (0.0, 1.0),
    stochasticity: float = 0.0,
    mode: str = "transition",
    seed: int = 0,
    batch_size: int | None = None,
    has_null: bool = True,
    stochastic_ok: bool = True,
) -> SampleRequest:
    """Validate one request for a model of ``kind`` ("c2i" / "t2i"); see the module docstring.
    ``default_size`` (height, width) applies where height / width is None."""
    if (labels is None) == (prompts is None):
        raise ValueError("give exactly one of labels (class model) or prompts (text model)")
    labs = _labels(labels, kind, num_classes) if labels is not None else None
    prms = _prompts(prompts, kind) if prompts is not None else None
    height = default_size[0] if height is None else height
    width = default_size[1] if width is None else width
    latent_hw = check_size(height, width, spatial_factor, patch_size)
    if not _is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    cfg_scale = _real("cfg_scale", cfg_scale, lo=0.0)
    try:
        low, high = (float(v) for v in cfg_interval)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval must be two numbers (low, high), got {cfg_interval!r}") from None
    low, high = _real("cfg_interval low", low), _real("cfg_interval high", high)
    if not low < high:
        raise ValueError(f"cfg_interval needs low < high, got ({low}, {high})")
    if cfg_scale > 1.0 and not has_null:
        raise ValueError("cfg_scale > 1 needs the model's null class (class_dropout_prob > 0); "
                         "this model has none")
    stochasticity = _real("stochasticity", stochasticity, lo=0.0, hi=1.0, hi_open=True)
    if stochasticity > 0 and not stochastic_ok:
        raise ValueError("stochasticity > 0 is only supported by the OT_FM transport")
    mode = {"ddiffusion": "diffusion"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {list(MODES)}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    return SampleRequest(labs, prms, int(height), int(width), latent_hw, int(num_steps), cfg_scale,
                         low, high, stochasticity, mode, int(seed),
                         None if batch_size is None else int(batch_size))
