"""The official TiM architectures: which state-dict keys and shapes a network has, and the
official constructor kwargs <-> tim_jax model configs (``config.model``).

* :func:`official_arch` reads the constructor values that decide the keys/shapes from a tim_jax
  model config; :func:`official_param_shapes` lists every official key with its torch shape
  (Linear ``(out, in)``, Conv2d ``(out, in, kh, kw)``).
* :func:`model_config_from_official` / :func:`model_config_to_official` translate between the
  official constructor dict (the YAML ``network.params``, a fixture ``config.json``) and a
  tim_jax model config.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = [
    "OfficialArch",
    "FREQ_EMBED_DIM",
    "NEW_CONDITIONS",
    "OFFICIAL_DEFAULTS",
    "official_arch",
    "official_param_shapes",
    "model_config_from_official",
    "model_config_to_official",
    "model_config_from_json",
]

FREQ_EMBED_DIM = 256  # the official TimestepEmbedder's sinusoid width
NEW_CONDITIONS = ("t-r", "r", "t,r", "t,t-r", "r,t-r", "t,r,t-r")
_MISSING = object()


def cfg_get(cfg: Any, name: str, default: Any = _MISSING) -> Any:
    """Field ``name`` of a Mapping, ml_collections ConfigDict or attribute object."""
    if isinstance(cfg, Mapping):
        if name in cfg:
            return cfg[name]
    elif hasattr(cfg, name):
        return getattr(cfg, name)
    if default is _MISSING:
        raise ValueError(f"model config has no field {name!r}")
    return default


def cfg_to_dict(cfg: Any) -> dict:
    """A model config (ConfigDict, dataclass or Mapping) as a plain dict."""
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
    g = lambda n, d=_MISSING: cfg_get(model_config, n, d)  # noqa: E731
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
# official constructor kwargs <-> tim_jax model config
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
    return {k: cfg_get(model_config, k, OFFICIAL_DEFAULTS[a.kind].get(k))
            for k in _official_fields(a.kind)}


def model_config_from_json(obj: Mapping[str, Any]):
    """A tim_jax model config (``ConfigDict``) from its JSON dict; ValueError on a bad kind or
    unknown field."""
    import ml_collections

    from tim_jax.models import presets

    presets.model_kwargs(dict(obj))  # validates kind and field names
    return ml_collections.ConfigDict(dict(obj))
