"""Checking an official state dict against an architecture, with a readable report.

:func:`check_official_state_dict` compares the keys and shapes of a state dict with those a
tim_jax model config implies (:func:`~tim_jax.interop.official_arch.official_param_shapes`) and
reports the missing, unexpected and mis-shaped keys together with the architecture the
checkpoint appears to have (:func:`infer_official_config`), e.g. ``depth=2 vs 3``.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from tim_jax.interop.official_arch import OfficialArch, official_arch, official_param_shapes

__all__ = ["StateDictReport", "infer_official_config", "check_official_state_dict"]


def infer_official_config(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Guess the official constructor values from a state dict's keys and shapes.

    Only what the tensors determine is returned (``encoder_depth`` is not; ``num_heads`` only when
    qk_norm layers exist). Used to explain architecture mismatches.
    """
    g: dict[str, Any] = {}
    shape = lambda k: tuple(np.shape(sd[k])) if k in sd else None  # noqa: E731
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        g["depth"] = max(blocks) + 1
    if (w := shape("x_embedder.proj.weight")) and len(w) == 4:
        g["hidden_size"], g["in_channels"], g["patch_size"] = w[0], w[1], w[2]
    if (w := shape("blocks.0.attn.q_norm.weight")) is not None:
        g["qk_norm"] = True
        if "hidden_size" in g and w[0]:
            g["num_heads"] = g["hidden_size"] // w[0]
    elif blocks:
        g["qk_norm"] = False
    if blocks:
        g["distance_aware"] = "blocks.0.attn.qkv_d.weight" in sd
    g["use_new_embed"] = any(k.startswith("delta_embedder.") for k in sd)
    if "y_embedder.embedding_table.weight" in sd:
        g["kind"] = "c2i"
        g["label_rows"] = shape("y_embedder.embedding_table.weight")[0]
    elif any(k.startswith("y_embedder.") for k in sd) or any(".cross_attn." in k for k in sd):
        g["kind"] = "t2i"
        if (w := shape("y_embedder.norm.weight")) is not None:
            g["cap_feat_dim"] = w[0]
    if (w := shape("blocks.0.mlp.fc1_g.weight")) is not None and "hidden_size" in g:
        g["mlp_hidden"] = w[0]
    if (w := shape("blocks.0.adaLN_modulation.fc1_g.weight")) is not None:
        g["lora_hidden_size"] = w[0]
    if (w := shape("projector.0.weight")) is not None:
        g["projector_dim"] = w[0]
    if (w := shape("projector.4.weight")) is not None:
        g["z_dim"] = w[0]
    return g


def _arch_view(a: OfficialArch) -> dict[str, Any]:
    v = {
        "kind": a.kind, "depth": a.depth, "hidden_size": a.hidden_size, "in_channels": a.in_channels,
        "patch_size": a.patch_size, "qk_norm": a.qk_norm, "distance_aware": a.distance_aware,
        "use_new_embed": a.use_new_embed, "mlp_hidden": a.mlp_hidden,
        "lora_hidden_size": a.lora_hidden, "projector_dim": a.projector_dim, "z_dim": a.z_dim,
    }
    if a.qk_norm:
        v["num_heads"] = a.num_heads
    if a.kind == "c2i":
        v["label_rows"] = a.num_classes + int(a.class_dropout_prob > 0)
    else:
        v["cap_feat_dim"] = a.cap_feat_dim
    return v


def _group_keys(keys: list[str], limit: int = 16) -> list[str]:
    """Readable key lines: per-block keys grouped over block indices ('blocks.{3..5}.attn.proj.weight'),
    and a block missing (or extra) as a whole shown as one line ('blocks.2.* (21 keys per block: ...)')."""
    lines, per_rest = [], {}
    for k in keys:
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m:
            per_rest.setdefault(m.group(2), set()).add(int(m.group(1)))
        else:
            lines.append(k)
    by_idx: dict[tuple[int, ...], list[str]] = {}
    for rest, idx in per_rest.items():
        by_idx.setdefault(tuple(sorted(idx)), []).append(rest)
    for idx, rests in by_idx.items():
        ids = str(idx[0]) if len(idx) == 1 else "{" + _ranges(list(idx)) + "}"
        if len(rests) > 4:
            lines.append(f"blocks.{ids}.* ({len(rests)} keys per block: {', '.join(rests[:3])}, ...)")
        else:
            lines += [f"blocks.{ids}.{r}" for r in rests]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more lines"]
    return lines


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}..{a}")
            start = b
    return ",".join(out)


@dataclasses.dataclass
class StateDictReport:
    """Result of checking an official state dict against an architecture."""

    missing: list[str]
    unexpected: list[str]
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # key -> (got, expected)
    arch_diff: dict[str, tuple[Any, Any]]  # field -> (checkpoint, config)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, source: str = "checkpoint") -> str:
        lines = [f"{source} does not match the model config:"]
        if self.arch_diff:
            lines.append("  architecture (checkpoint vs config): " + ", ".join(
                f"{k}={a!r} vs {b!r}" for k, (a, b) in self.arch_diff.items()))
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}):")
            lines += [f"    {k}" for k in _group_keys(self.missing)]
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}):")
            lines += [f"    {k}" for k in _group_keys(self.unexpected)]
        if self.mismatched:
            lines.append(f"  mis-shaped keys ({len(self.mismatched)}), checkpoint vs expected:")
            items = list(self.mismatched.items())
            lines += [f"    {k}: {got} vs {exp}" for k, (got, exp) in items[:12]]
            if len(items) > 12:
                lines.append(f"    ... and {len(items) - 12} more")
        return "\n".join(lines)


def check_official_state_dict(
    sd: Mapping[str, np.ndarray], model_config: Any, *, raise_on_error: bool = True,
    source: str = "checkpoint",
) -> StateDictReport:
    """Compare an official state dict's keys and shapes with those the config implies.

    Raises:
      ValueError (when ``raise_on_error``) with :meth:`StateDictReport.format` as message.
    """
    arch = official_arch(model_config)
    expected = official_param_shapes(arch)
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    mismatched = {
        k: (tuple(np.shape(sd[k])), expected[k])
        for k in expected
        if k in sd and tuple(np.shape(sd[k])) != expected[k]
    }
    inferred = infer_official_config(sd)
    want = _arch_view(arch)
    arch_diff = {k: (inferred[k], want[k]) for k in want if k in inferred and inferred[k] != want[k]}
    report = StateDictReport(missing, unexpected, mismatched, arch_diff)
    if raise_on_error and not report.ok:
        raise ValueError(report.format(source))
    return report
