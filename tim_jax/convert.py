"""Official TiM checkpoints <-> tim_jax params, and the converted-weights directory format.

Official checkpoints (github WZDTHU/TiM) are flat PyTorch ``state_dict``s, shipped as ``.safetensors``
(C2I) or ``.bin`` (T2I). This module

* reads them without executing pickled code (:func:`load_official_state_dict`): safetensors through
  ``safetensors.numpy``; ``.bin``/``.pth``/``.pt`` only through ``torch.load(weights_only=True)``
  (torch is the optional ``tim-jax[torch]`` extra);
* strips the usual wrappers (``module.`` from DDP/FSDP, ``_orig_mod.`` from ``torch.compile``, nested
  ``ema`` / ``model`` / ``state_dict`` sub-dicts) -- :func:`normalize_state_dict`;
* checks the keys and shapes against the architecture in a tim_jax model config and fails with a
  readable report of missing / unexpected / mis-shaped keys and of the architecture the checkpoint
  appears to have (:func:`check_official_state_dict`, :func:`infer_official_config`);
* maps official tensors to tim_jax params and back (:func:`official_to_params`,
  :func:`params_to_official`, :func:`export_official_safetensors`).

Key mapping (it mirrors the model package's naming convention, ``tim_jax/models/__init__.py``):

====================================  =========================================================
official ``a.b.3.c.weight``           tim_jax path ``('a', 'b', 3, 'c', <leaf>)``
Linear ``weight`` (out, in)           ``kernel`` (in, out) = weight.T
Conv2d ``weight`` (out, in, kh, kw)   ``kernel`` (kh, kw, in, out)
LayerNorm ``weight`` (n,)             ``scale``
``embedding_table.weight`` (n, d)     ``embedding_table.embedding`` (n, d), no transpose
``bias``                              ``bias``
timm SwiGLU ``fc1_g`` + ``fc1_x``     fused ``fc1``: kernel (in, 2h) = [g.T | x.T], bias [g | x]
``blocks.<i>.*`` (list layout)        ``('blocks', i, ...)``; with ``scan_blocks`` the blocks are
                                      stacked: ``('blocks', ...)`` with a leading depth axis
====================================  =========================================================

Converted-weights directory (``python -m tim_jax.convert ... --out DIR``; :func:`save_converted`,
:func:`load_converted`)::

    DIR/model_config.json   the tim_jax model config (config.model fields) as JSON
    DIR/params/             Orbax StandardCheckpointer save of the params as a pure nested dict
                            (nnx.to_pure_dict layout; float32)
    DIR/conversion.json     provenance: source file, its sha256, ema flag, tim_jax version

It holds inference weights only (no optimizer / EMA / step); training checkpoints are a separate
format owned by ``tim_jax.checkpointing``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "OfficialArch",
    "StateDictReport",
    "load_official_state_dict",
    "normalize_state_dict",
    "official_arch",
    "official_param_shapes",
    "infer_official_config",
    "check_official_state_dict",
    "official_to_pure_params",
    "official_to_params",
    "params_to_official",
    "export_official_safetensors",
    "model_config_from_official",
    "model_config_to_official",
    "save_converted",
    "load_converted",
    "main",
]

TORCH_EXTS = (".bin", ".pth", ".pt", ".ckpt")
SAFETENSORS_EXTS = (".safetensors",)
# Per-key prefixes that wrappers add; never the start of an official key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Sub-dict names, in order of preference, that hold the raw (online) weights / the EMA weights.
RAW_SUBDICTS = ("model", "state_dict", "module", "model_state_dict", "net", "network")
EMA_SUBDICTS = ("ema", "ema_model", "model_ema", "ema_state_dict", "state_dict_ema")
FREQ_EMBED_DIM = 256  # the official TimestepEmbedder's sinusoid width
NEW_CONDITIONS = ("t-r", "r", "t,r", "t,t-r", "r,t-r", "t,r,t-r")


# ----------------------------------------------------------------------------------------------
# config access
# ----------------------------------------------------------------------------------------------
_MISSING = object()


def _cfg_get(cfg: Any, name: str, default: Any = _MISSING) -> Any:
    """Field ``name`` of a Mapping, ml_collections ConfigDict or attribute object."""
    if isinstance(cfg, Mapping):
        if name in cfg:
            return cfg[name]
    elif hasattr(cfg, name):
        return getattr(cfg, name)
    if default is _MISSING:
        raise ValueError(f"model config has no field {name!r}")
    return default


def _cfg_to_dict(cfg: Any) -> dict:
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ValueError(f"cannot read a model config of type {type(cfg).__name__}")


@dataclasses.dataclass(frozen=True)
class OfficialArch:
    """The constructor values of an official TiM network that decide its state-dict keys/shapes."""

    kind: str  # "c2i" | "t2i"
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    in_channels: int
    mlp_ratio: float
    lora_hidden_size: int | None
    encoder_depth: int
    projector_dim: int
    z_dim: int
    qk_norm: bool
    distance_aware: bool
    use_new_embed: bool
    new_condition: str
    num_classes: int = 1000  # c2i only
    class_dropout_prob: float = 0.1  # c2i only; > 0 adds the null-class row (label num_classes)
    cap_feat_dim: int = 2048  # t2i only

    @property
    def lora_hidden(self) -> int:
        return self.lora_hidden_size if self.lora_hidden_size else (self.hidden_size // 4) * 3

    @property
    def mlp_hidden(self) -> int:
        return (int(self.hidden_size * self.mlp_ratio) * 2) // 3

    @property
    def n_mod(self) -> int:
        return 6 if self.kind == "c2i" else 9


def official_arch(model_config: Any) -> OfficialArch:
    """Read an :class:`OfficialArch` from a tim_jax model config (config.model)."""
    g = lambda n, d=_MISSING: _cfg_get(model_config, n, d)  # noqa: E731
    kind = g("kind", "c2i")
    if kind not in ("c2i", "t2i"):
        raise ValueError(f"model config kind={kind!r}; allowed: 'c2i', 't2i'")
    new_condition = g("new_condition", "t-r")
    if new_condition not in NEW_CONDITIONS:
        raise ValueError(f"model config new_condition={new_condition!r}; allowed: {NEW_CONDITIONS}")
    lora = g("lora_hidden_size", None)
    return OfficialArch(
        kind=kind,
        depth=int(g("depth")),
        hidden_size=int(g("hidden_size")),
        num_heads=int(g("num_heads")),
        patch_size=int(g("patch_size")),
        in_channels=int(g("in_channels")),
        mlp_ratio=float(g("mlp_ratio", 4.0)),
        lora_hidden_size=None if lora is None else int(lora),
        encoder_depth=int(g("encoder_depth")),
        projector_dim=int(g("projector_dim")),
        z_dim=int(g("z_dim")),
        qk_norm=bool(g("qk_norm", False)),
        distance_aware=bool(g("distance_aware", False)),
        use_new_embed=bool(g("use_new_embed", False)),
        new_condition=new_condition,
        num_classes=int(g("num_classes", 1000)),
        class_dropout_prob=float(g("class_dropout_prob", 0.1)),
        cap_feat_dim=int(g("cap_feat_dim", 2048)),
    )


def _linear(shapes: dict, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def _swiglu(shapes: dict, name: str, n_in: int, n_hidden: int, n_out: int) -> None:
    _linear(shapes, f"{name}.fc1_g", n_in, n_hidden)
    _linear(shapes, f"{name}.fc1_x", n_in, n_hidden)
    _linear(shapes, f"{name}.fc2", n_hidden, n_out)


def _layernorm(shapes: dict, name: str, n: int) -> None:
    shapes[f"{name}.weight"] = (n,)
    shapes[f"{name}.bias"] = (n,)


def official_param_shapes(arch: OfficialArch | Any) -> dict[str, tuple[int, ...]]:
    """Every key of the official ``state_dict()`` of this architecture and its torch shape.

    Args:
      arch: an :class:`OfficialArch` or a tim_jax model config.
    Returns:
      ``{key: shape}`` in torch layout (Linear (out, in), Conv2d (out, in, kh, kw)).
    """
    a = arch if isinstance(arch, OfficialArch) else official_arch(arch)
    d, p, hd = a.hidden_size, a.patch_size, a.hidden_size // a.num_heads
    s: dict[str, tuple[int, ...]] = {}
    s["x_embedder.proj.weight"] = (d, a.in_channels, p, p)
    s["x_embedder.proj.bias"] = (d,)
    embedders = ["t_embedder"] + (["delta_embedder"] if a.use_new_embed else [])
    for e in embedders:
        _linear(s, f"{e}.mlp.0", FREQ_EMBED_DIM, d)
        _linear(s, f"{e}.mlp.2", d, d)
    if a.kind == "c2i":
        rows = a.num_classes + int(a.class_dropout_prob > 0)
        s["y_embedder.embedding_table.weight"] = (rows, d)
    else:
        _layernorm(s, "y_embedder.norm", a.cap_feat_dim)
        _swiglu(s, "y_embedder.mlp", a.cap_feat_dim, 4 * d, d)
    for i in range(a.depth):
        b = f"blocks.{i}"
        _linear(s, f"{b}.attn.qkv", d, 3 * d)
        if a.distance_aware:
            _linear(s, f"{b}.attn.qkv_d", d, 3 * d, bias=False)
        if a.qk_norm:
            _layernorm(s, f"{b}.attn.q_norm", hd)
            _layernorm(s, f"{b}.attn.k_norm", hd)
        _linear(s, f"{b}.attn.proj", d, d)
        if a.kind == "t2i":
            _linear(s, f"{b}.cross_attn.q", d, d)
            _linear(s, f"{b}.cross_attn.kv", d, 2 * d)
            if a.qk_norm:
                _layernorm(s, f"{b}.cross_attn.q_norm", hd)
                _layernorm(s, f"{b}.cross_attn.k_norm", hd)
            _linear(s, f"{b}.cross_attn.proj", d, d)
        _swiglu(s, f"{b}.mlp", d, a.mlp_hidden, d)
        _swiglu(s, f"{b}.adaLN_modulation", d, a.lora_hidden, a.n_mod * d)
    _linear(s, "projector.0", d, a.projector_dim)
    _linear(s, "projector.2", a.projector_dim, a.projector_dim)
    _linear(s, "projector.4", a.projector_dim, a.z_dim)
    _swiglu(s, "final_layer.adaLN_modulation", d, d // 2, 2 * d)
    _linear(s, "final_layer.linear", d, p * p * a.in_channels)
    return s


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or type(v).__name__ in ("Tensor", "Parameter")


def _torch_load(path: pathlib.Path) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"{path}: reading a PyTorch pickle ({path.suffix}) needs torch, which is not installed. "
            "Install the extra (`pip install 'tim-jax[torch]'`) or convert the file to .safetensors "
            "first (safetensors.torch.save_file(torch.load(p, weights_only=True), out))."
        ) from e
    try:
        # weights_only=True: tensors and plain containers only; never unpickles code.
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for bad files)
        raise ValueError(
            f"{path}: torch.load(weights_only=True) failed: {type(e).__name__}: {e}. The file is "
            "corrupt, is not a PyTorch checkpoint, or holds objects other than tensors."
        ) from e


def _to_numpy_tree(obj: Any) -> Any:
    """torch tensors -> numpy arrays (bf16 -> float32, since numpy lacks bf16); containers kept."""
    if isinstance(obj, Mapping):
        return {k: _to_numpy_tree(v) for k, v in obj.items()}
    if type(obj).__name__ in ("Tensor", "Parameter"):
        t = obj.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return obj


def load_official_state_dict(
    path: str | os.PathLike, *, ema: bool | None = None
) -> dict[str, np.ndarray]:
    """Read an official checkpoint file into a flat ``{official key: np.ndarray}`` dict.

    Args:
      path: ``.safetensors`` (read with safetensors.numpy, no torch needed) or ``.bin``/``.pth``/
        ``.pt``/``.ckpt`` (read with ``torch.load(weights_only=True)``; needs the torch extra).
      ema: which weights to take from a wrapper holding both raw and EMA weights (see
        :func:`normalize_state_dict`); ignored for a flat state dict such as the released files.
    Returns:
      the normalised flat state dict, arrays in their stored dtype (bf16 stored in a torch pickle is
      widened to float32).
    Raises:
      ValueError: missing/corrupt file, unsupported extension, torch missing for a pickle.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"official checkpoint {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTS:
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(path))
        except Exception as e:  # noqa: BLE001  (SafetensorError and friends)
            raise ValueError(
                f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                "corrupt or truncated"
            ) from e
    elif suffix in TORCH_EXTS:
        raw = _to_numpy_tree(_torch_load(path))
    else:
        raise ValueError(
            f"{path}: unsupported checkpoint extension {suffix!r}; allowed: "
            f"{SAFETENSORS_EXTS + TORCH_EXTS}"
        )
    return normalize_state_dict(raw, ema=ema, source=str(path))


def _strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for pre in WRAPPER_PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        if k in out:
            raise ValueError(f"two checkpoint keys map to {k!r} after removing wrapper prefixes")
        out[k] = v
    return out


def normalize_state_dict(
    raw: Mapping[str, Any], *, ema: bool | None = None, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """Unwrap a loaded checkpoint object into a flat official state dict.

    Accepted layouts: a flat ``{key: array}`` dict (the released files); keys prefixed by
    ``module.`` (DDP/FSDP), ``_orig_mod.`` (torch.compile) or ``model.`` (any order/repetition); a
    dict holding the state dict under a sub-key -- raw weights under one of
    ``model``/``state_dict``/``module``/``model_state_dict``/``net``/``network``, EMA weights under
    ``ema``/``ema_model``/``model_ema``/``ema_state_dict``/``state_dict_ema`` -- with non-array
    entries (step, optimizer, ...) ignored.

    Args:
      ema: ``True`` takes the EMA sub-dict (error if absent); ``False`` takes the raw sub-dict
        (error if absent); ``None`` (default) takes the raw weights where both exist and the only
        one present otherwise. Flat state dicts are returned whatever ``ema`` says.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(raw).__name__}")
    arrays = {k: v for k, v in raw.items() if _is_array(v)}
    subs = {k: v for k, v in raw.items() if isinstance(v, Mapping) and v}
    if arrays and not any(k in subs for k in RAW_SUBDICTS + EMA_SUBDICTS):
        # a flat state dict (official keys are dotted paths, never a bare 'model'/'ema')
        return _strip_prefixes({str(k): np.asarray(v) for k, v in arrays.items()})
    ema_keys = [k for k in EMA_SUBDICTS if k in subs]
    raw_keys = [k for k in RAW_SUBDICTS if k in subs]
    if ema is True:
        inner = subs[raw_keys[0]] if raw_keys else {}
        if not ema_keys and any(isinstance(inner.get(k), Mapping) for k in EMA_SUBDICTS):
            # a generic container ({'state_dict': {'model': ..., 'ema': ...}}): look inside
            return normalize_state_dict(inner, ema=True, source=f"{source}[{raw_keys[0]!r}]")
        if not ema_keys:
            raise ValueError(
                f"{source}: ema=True but no EMA sub-dict ({'/'.join(EMA_SUBDICTS)}) found; top-level "
                f"keys: {sorted(map(str, raw))[:20]}"
            )
        pick = ema_keys[0]
    elif ema is False:
        if not raw_keys:
            raise ValueError(
                f"{source}: ema=False but no raw-weights sub-dict ({'/'.join(RAW_SUBDICTS)}) found; "
                f"top-level keys: {sorted(map(str, raw))[:20]}"
                + (" (an EMA sub-dict exists: pass ema=True / --ema)" if ema_keys else "")
            )
        pick = raw_keys[0]
    else:
        candidates = raw_keys + ema_keys
        if not candidates:  # (arrays are absent here, else the flat branch returned)
            raise ValueError(
                f"{source}: no state dict found: neither flat tensors nor a known sub-dict "
                f"({'/'.join(RAW_SUBDICTS + EMA_SUBDICTS)}); top-level keys: {sorted(map(str, raw))[:20]}"
            )
        pick = candidates[0]
    return normalize_state_dict(subs[pick], ema=ema, source=f"{source}[{pick!r}]")


# ----------------------------------------------------------------------------------------------
# checking
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# mapping
# ----------------------------------------------------------------------------------------------
Path = tuple  # a params path: str / int segments


def _module_path(parts: list[str]) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in parts)


def official_to_flat(sd: Mapping[str, np.ndarray], dtype=np.float32) -> dict[Path, np.ndarray]:
    """Official state dict -> ``{params path: array}`` in tim_jax layout (list block layout)."""
    out: dict[Path, np.ndarray] = {}
    fused: dict[Path, dict[tuple[str, str], np.ndarray]] = {}
    for key, arr in sd.items():
        arr = np.asarray(arr, dtype=dtype)
        parts = key.split(".")
        mod, leaf = parts[:-1], parts[-1]
        if not mod or leaf not in ("weight", "bias"):
            raise ValueError(f"official key {key!r}: expected '<module>.weight' or '<module>.bias'")
        if mod[-1] in ("fc1_g", "fc1_x"):
            fused.setdefault(_module_path(mod[:-1]), {})[(mod[-1], leaf)] = arr
            continue
        path = _module_path(mod)
        if leaf == "bias":
            out[path + ("bias",)] = arr
        elif mod[-1] == "embedding_table":
            out[path + ("embedding",)] = arr
        elif arr.ndim == 1:
            out[path + ("scale",)] = arr
        elif arr.ndim == 2:
            out[path + ("kernel",)] = arr.T
        elif arr.ndim == 4:
            out[path + ("kernel",)] = arr.transpose(2, 3, 1, 0)
        else:
            raise ValueError(f"official key {key!r}: unsupported weight rank {arr.ndim}")
    for path, parts in fused.items():
        name = ".".join(map(str, path))
        need = [(a, b) for a in ("fc1_g", "fc1_x") for b in ("weight", "bias")]
        if absent := [f"{name}.{a}.{b}" for a, b in need if (a, b) not in parts]:
            raise ValueError(f"SwiGLU {name}: incomplete fc1_g/fc1_x pair, missing {absent}")
        out[path + ("fc1", "kernel")] = np.concatenate(
            [parts[("fc1_g", "weight")].T, parts[("fc1_x", "weight")].T], axis=-1)
        out[path + ("fc1", "bias")] = np.concatenate(
            [parts[("fc1_g", "bias")], parts[("fc1_x", "bias")]], axis=-1)
    return out


def _path_str(path: Path) -> str:
    return ".".join(map(str, path))


def flat_to_official(flat: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`official_to_flat` (list block layout) -> official keys, torch layout."""
    out: dict[str, np.ndarray] = {}
    for path, arr in flat.items():
        arr = np.asarray(arr, dtype=np.float32)
        mod, leaf = path[:-1], path[-1]
        if mod and mod[-1] == "fc1":
            base, h = _path_str(mod[:-1]), arr.shape[-1] // 2
            if arr.shape[-1] % 2:
                raise ValueError(f"fused SwiGLU {_path_str(path)} has odd width {arr.shape[-1]}")
            g, x = arr[..., :h], arr[..., h:]
            if leaf == "kernel":
                g, x, leaf_name = g.T, x.T, "weight"
            elif leaf == "bias":
                leaf_name = "bias"
            else:
                raise ValueError(f"unexpected fused SwiGLU leaf {_path_str(path)}")
            out[f"{base}.fc1_g.{leaf_name}"] = g
            out[f"{base}.fc1_x.{leaf_name}"] = x
            continue
        name = _path_str(mod)
        if leaf == "bias":
            out[f"{name}.bias"] = arr
        elif leaf in ("scale", "embedding"):
            out[f"{name}.weight"] = arr
        elif leaf == "kernel":
            if arr.ndim == 2:
                out[f"{name}.weight"] = arr.T
            elif arr.ndim == 4:
                out[f"{name}.weight"] = arr.transpose(3, 2, 0, 1)
            else:
                raise ValueError(f"{_path_str(path)}: unsupported kernel rank {arr.ndim}")
        else:
            raise ValueError(f"params leaf {_path_str(path)!r}: unknown leaf name {leaf!r}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _stack_blocks(flat: dict[Path, np.ndarray], depth: int) -> dict[Path, np.ndarray]:
    """List layout ('blocks', i, ...) -> scan layout ('blocks', ...) with a leading depth axis."""
    per_block: dict[Path, list] = {}
    out = {}
    for path, arr in flat.items():
        if path[0] == "blocks":
            per_block.setdefault(path[2:], [None] * depth)[path[1]] = arr
        else:
            out[path] = arr
    for rest, arrs in per_block.items():
        if any(a is None for a in arrs):
            raise ValueError(f"blocks.*.{_path_str(rest)} is missing in some blocks")
        out[("blocks",) + rest] = np.stack(arrs, axis=0)
    return out


def _unstack_blocks(flat: Mapping[Path, np.ndarray]) -> dict[Path, np.ndarray]:
    out = {}
    for path, arr in flat.items():
        if path[0] == "blocks" and not isinstance(path[1], int):
            for i in range(arr.shape[0]):
                out[("blocks", i) + path[1:]] = arr[i]
        else:
            out[path] = arr
    return out


def _nest(flat: Mapping[Path, Any]) -> dict:
    root: dict = {}
    for path, v in flat.items():
        node = root
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return root


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _pure(params: Any) -> dict:
    """nnx.State / pure dict -> nested pure dict of arrays."""
    if isinstance(params, Mapping) and not hasattr(params, "to_pure_dict"):
        return params  # already a pure dict (or FrozenDict-like)
    from flax import nnx

    return nnx.to_pure_dict(params)


def official_to_pure_params(
    sd: Mapping[str, np.ndarray], model_config: Any, *, check: bool = True,
    source: str = "checkpoint",
) -> dict:
    """Official state dict -> nested pure dict of float32 numpy arrays in tim_jax layout.

    The block layout follows ``model_config.scan_blocks`` (stacked leading depth axis when true).
    With ``check`` the state dict is first validated (:func:`check_official_state_dict`).
    """
    if check:
        check_official_state_dict(sd, model_config, source=source)
    flat = official_to_flat(sd)
    if bool(_cfg_get(model_config, "scan_blocks", False)):
        flat = _stack_blocks(flat, official_arch(model_config).depth)
    return _nest(flat)


def _abstract_params(model_config: Any):
    from tim_jax.models import functional

    return functional.abstract_params(model_config)


def _check_against_model(pure: Mapping, abstract_pure: Mapping) -> None:
    got, want = _flatten(pure), _flatten(abstract_pure)
    problems = []
    for p in sorted(set(want) - set(got), key=str):
        problems.append(f"  model param {_path_str(p)} has no checkpoint tensor")
    for p in sorted(set(got) - set(want), key=str):
        problems.append(f"  converted tensor {_path_str(p)} has no model param")
    for p in sorted(set(got) & set(want), key=str):
        if tuple(np.shape(got[p])) != tuple(want[p].shape):
            problems.append(f"  {_path_str(p)}: converted {np.shape(got[p])} vs model {tuple(want[p].shape)}")
    if problems:
        raise ValueError(
            "converted params do not fit the tim_jax model built from the config (the key mapping "
            "and tim_jax.models disagree):\n" + "\n".join(problems[:30]))


def official_to_params(
    state_dict: Mapping[str, np.ndarray], model_config: Any, *, source: str = "checkpoint"
):
    """Official state dict -> tim_jax params (an ``nnx.State`` of float32 jax arrays).

    The result has exactly the structure of ``nnx.split(build_model(model_config))[1]`` for the
    config's block layout (list or ``scan_blocks``), so it plugs into ``make_apply_fn(graphdef)``.

    Raises:
      ValueError: the state dict does not fit the architecture (missing / unexpected / mis-shaped
        keys, with the architecture the checkpoint appears to have).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    pure = official_to_pure_params(state_dict, model_config, source=source)
    state = _abstract_params(model_config)
    _check_against_model(pure, nnx.to_pure_dict(state))
    pure = jax.tree.map(jnp.asarray, pure)
    nnx.replace_by_pure_dict(state, pure)
    return state


def params_to_official(params: Any, model_config: Any | None = None) -> dict[str, np.ndarray]:
    """tim_jax params (nnx.State or pure dict; list or scan layout) -> official state dict.

    Returns float32 numpy arrays in torch layout under the official key names. When
    ``model_config`` is given the result is validated against the official architecture.
    """
    flat = _flatten(_pure(params))
    flat = {p: np.asarray(v, dtype=np.float32) for p, v in flat.items()}
    sd = flat_to_official(_unstack_blocks(flat))
    if model_config is not None:
        check_official_state_dict(sd, model_config, source="exported params")
    return sd


def export_official_safetensors(params: Any, model_config: Any, path: str | os.PathLike) -> pathlib.Path:
    """Write params as an official-layout float32 ``.safetensors`` that the official
    ``init_from_ckpt`` / ``load_state_dict`` loads with no missing or unexpected keys."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    sd = params_to_official(params, model_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(sd.items())), str(path), metadata={"format": "pt", "producer": "tim_jax"})
    return path


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
# Constructor defaults of the official networks (tim/models/{c2i,t2i}/tim_model.py), used for the
# fields an official config leaves out. qk_norm has no official default (the constructor needs it).
OFFICIAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "c2i": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, encoder_depth=8,
                depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                z_dim=768, projector_dim=2048, new_condition="t-r", use_new_embed=False,
                distance_aware=False, lora_hidden_size=None),
    "t2i": dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, encoder_depth=8,
                depth=28, num_heads=16, mlp_ratio=4.0, cap_feat_dim=2048, z_dim=768,
                projector_dim=2048, new_condition="t-r", use_new_embed=False,
                distance_aware=False, lora_hidden_size=None),
}
# Official constructor arguments with no effect on the inference network or its weights.
IGNORED_OFFICIAL_FIELDS = ("use_checkpoint",)


def _official_fields(kind: str) -> tuple[str, ...]:
    return tuple(OFFICIAL_DEFAULTS[kind]) + ("qk_norm",)


def _jax_knob_defaults(kind: str) -> dict[str, Any]:
    """tim_jax-only model-config fields (dtype, scan_blocks, ...) at their preset defaults."""
    from tim_jax.models import presets

    ref = presets.model_config("c2i_tiny" if kind == "c2i" else "t2i_tiny").to_dict()
    return {k: v for k, v in ref.items() if k != "kind" and k not in _official_fields(kind)}


def model_config_from_official(
    official: Mapping[str, Any], *, kind: str | None = None, **overrides: Any
):
    """An official network constructor dict (the YAML ``network.params`` / fixture config.json,
    or a whole ``network:`` node with ``target``/``params``) -> a tim_jax model config
    (``ml_collections.ConfigDict``, the ``config.model`` fields).

    Fields the official dict leaves out take the official constructor defaults; tim_jax-only
    fields take the preset defaults (float32 compute, list blocks) unless given in ``overrides``.
    ``kind`` defaults to "t2i" for a t2i target or when ``cap_feat_dim`` is present, else "c2i".

    Raises:
      ValueError: unknown official fields, bad kind, missing qk_norm.
    """
    import ml_collections

    official = dict(official)
    if "target" in official and "params" in official:  # a whole `network:` YAML node
        kind = kind or ("t2i" if ".t2i." in str(official["target"]) else "c2i")
        official = dict(official["params"])
    kind = kind or ("t2i" if "cap_feat_dim" in official else "c2i")
    if kind not in OFFICIAL_DEFAULTS:
        raise ValueError(f"kind={kind!r}; allowed: {sorted(OFFICIAL_DEFAULTS)}")
    fields = _official_fields(kind)
    unknown = set(official) - set(fields) - set(IGNORED_OFFICIAL_FIELDS)
    if unknown:
        raise ValueError(
            f"official {kind} config has fields tim_jax does not know: {sorted(unknown)}; known: "
            f"{sorted(fields + IGNORED_OFFICIAL_FIELDS)}")
    if "qk_norm" not in official and "qk_norm" not in overrides:
        raise ValueError("official config lacks qk_norm (the official constructor requires it)")
    values = {"kind": kind, **OFFICIAL_DEFAULTS[kind], **_jax_knob_defaults(kind)}
    values.update({k: v for k, v in official.items() if k in fields})
    values.update(overrides)
    from tim_jax.models import presets

    presets.model_kwargs(values)  # validates field names for the kind
    return ml_collections.ConfigDict(values)


def model_config_to_official(model_config: Any) -> dict[str, Any]:
    """tim_jax model config -> the official constructor kwargs (``TiM(**kwargs)``)."""
    a = official_arch(model_config)
    return {k: _cfg_get(model_config, k, OFFICIAL_DEFAULTS[a.kind].get(k))
            for k in _official_fields(a.kind)}


def _config_from_json(obj: Mapping[str, Any]):
    import ml_collections

    from tim_jax.models import presets

    presets.model_kwargs(dict(obj))  # validates kind and field names
    return ml_collections.ConfigDict(dict(obj))


# ----------------------------------------------------------------------------------------------
# converted directory
# ----------------------------------------------------------------------------------------------
def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_converted(
    directory: str | os.PathLike, model_config: Any, params: Any, *, provenance: Mapping | None = None
) -> pathlib.Path:
    """Write a converted-weights directory (see module docstring). Overwrites ``params/``."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    pure = _pure(params)
    ckpt_dir = directory / "params"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt_dir, pure, force=True)
        ckptr.wait_until_finished()
    (directory / "model_config.json").write_text(json.dumps(_cfg_to_dict(model_config), indent=1))
    from tim_jax import __version__

    meta = {"tim_jax_version": __version__, **(provenance or {})}
    (directory / "conversion.json").write_text(json.dumps(meta, indent=1))
    return directory


def load_converted(directory: str | os.PathLike, **config_overrides: Any):
    """Read a converted-weights directory -> ``(model_config, params)``.

    ``params`` is an ``nnx.State`` shaped like the model's params (fp32). ``config_overrides``
    replace model-config fields that do not change the params (e.g. ``dtype``,
    ``attention_impl``); changing ``scan_blocks`` restacks the blocks.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    directory = pathlib.Path(directory).absolute()
    cfg_file, ckpt_dir = directory / "model_config.json", directory / "params"
    if not cfg_file.is_file() or not ckpt_dir.is_dir():
        raise ValueError(
            f"{directory} is not a converted tim_jax checkpoint: expected model_config.json and params/ "
            "(made by `python -m tim_jax.convert`)")
    stored = json.loads(cfg_file.read_text())
    stored_cfg = _config_from_json(stored)
    cfg = _config_from_json({**stored, **config_overrides})
    stored_state = _abstract_params(stored_cfg)
    target = nnx.to_pure_dict(stored_state)
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(ckpt_dir, target)
    if bool(_cfg_get(cfg, "scan_blocks", False)) != bool(_cfg_get(stored_cfg, "scan_blocks", False)):
        flat = _unstack_blocks({p: np.asarray(v) for p, v in _flatten(pure).items()})
        if bool(_cfg_get(cfg, "scan_blocks", False)):
            flat = _stack_blocks(flat, official_arch(cfg).depth)
        pure = _nest(flat)
    state = _abstract_params(cfg)
    _check_against_model(pure, nnx.to_pure_dict(state))
    import jax
    import jax.numpy as jnp

    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return cfg, state


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.convert",
        description="Convert an official TiM checkpoint into a tim_jax converted-weights directory, "
        "or (--export) a converted directory back into an official-layout .safetensors.",
    )
    p.add_argument("--official", required=True,
                   help="official checkpoint file (.safetensors, or .bin/.pth/.pt with the torch extra); "
                   "with --export: the .safetensors file to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="tim_jax preset name of the architecture (tim_jax.models.presets)")
    src.add_argument("--config-json",
                     help="JSON file with the official network constructor values (e.g. the fixture "
                     "config.json, or the YAML's network.params written as JSON)")
    p.add_argument("--kind", choices=("c2i", "t2i"),
                   help="network kind for --config-json (default: t2i if cap_feat_dim is given)")
    p.add_argument("--out", help="converted-weights directory to write (import) or read (--export)")
    p.add_argument("--ema", action="store_true",
                   help="take the EMA weights of a wrapper checkpoint that holds both raw and EMA "
                   "weights (default: the raw weights; flat state dicts are used as they are)")
    p.add_argument("--scan-blocks", action="store_true",
                   help="store the blocks stacked (scan layout) instead of as a list")
    p.add_argument("--export", action="store_true",
                   help="reverse direction: read --out and write --official as official .safetensors")
    return p


def _config_for_cli(args) -> Any:
    overrides = {"scan_blocks": bool(args.scan_blocks)}
    if args.config_json:
        official = json.loads(pathlib.Path(args.config_json).read_text())
        return model_config_from_official(official, kind=args.kind, **overrides)
    from tim_jax.models import presets

    return presets.model_config(args.preset, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if not args.out:
        print("error: --out DIR is required", file=sys.stderr)
        return 2
    try:
        if args.export:
            cfg, params = load_converted(args.out)
            path = export_official_safetensors(params, cfg, args.official)
            print(f"wrote {path} ({len(params_to_official(params))} tensors)")
            return 0
        if not (args.preset or args.config_json):
            print("error: one of --preset / --config-json is required", file=sys.stderr)
            return 2
        cfg = _config_for_cli(args)
        src = pathlib.Path(args.official)
        sd = load_official_state_dict(src, ema=True if args.ema else None)
        params = official_to_params(sd, cfg, source=str(src))
        out = save_converted(args.out, cfg, params, provenance={
            "source": str(src.absolute()), "source_sha256": _sha256(src), "ema": bool(args.ema),
            "num_tensors": len(sd)})
        print(f"converted {src} ({len(sd)} tensors) -> {out}")
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
