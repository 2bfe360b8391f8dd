"""Official state-dict keys <-> tim_jax params paths, and the tensor layouts on each side.

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

Params are handled as pure nested dicts (``nnx.to_pure_dict`` layout, list indices as int keys)
or ``nnx.State``; every array is float32.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from tim_jax.interop.official_arch import cfg_get
from tim_jax.interop.official_check import check_official_state_dict

__all__ = [
    "official_to_flat",
    "flat_to_official",
    "official_to_pure_params",
    "official_to_params",
    "params_for_model",
    "params_to_official",
    "pure_params",
]

Path = tuple  # a params path: str / int segments


def _module_path(parts: list[str]) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _path_str(path: Path) -> str:
    return ".".join(map(str, path))


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
        name = _path_str(path)
        need = [(a, b) for a in ("fc1_g", "fc1_x") for b in ("weight", "bias")]
        if absent := [f"{name}.{a}.{b}" for a, b in need if (a, b) not in parts]:
            raise ValueError(f"SwiGLU {name}: incomplete fc1_g/fc1_x pair, missing {absent}")
        out[path + ("fc1", "kernel")] = np.concatenate(
            [parts[("fc1_g", "weight")].T, parts[("fc1_x", "weight")].T], axis=-1)
        out[path + ("fc1", "bias")] = np.concatenate(
            [parts[("fc1_g", "bias")], parts[("fc1_x", "bias")]], axis=-1)
    return out


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


def pure_params(params: Any) -> dict:
    """nnx.State / pure dict -> pure nested dict; block indices that a checkpoint reader
    returned as digit strings (``'0'``) become ints, as ``nnx.to_pure_dict`` writes them."""
    if hasattr(params, "to_pure_dict") or not isinstance(params, Mapping):
        from flax import nnx

        params = nnx.to_pure_dict(params)
    params = dict(params)
    blocks = params.get("blocks")
    if isinstance(blocks, Mapping) and blocks and all(str(k).isdigit() for k in blocks):
        params["blocks"] = {int(k): v for k, v in blocks.items()}
    return params


def _is_list_layout(pure: Mapping) -> bool:
    blocks = pure.get("blocks")
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError("params have no 'blocks' entry: not the params of a TiM network")
    return all(isinstance(k, int) for k in blocks)


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
    pure = traverse_util.unflatten_dict(official_to_flat(sd))
    if bool(cfg_get(model_config, "scan_blocks", False)):
        import jax

        from tim_jax.models.functional import stack_block_params

        pure = stack_block_params(pure)
        pure["blocks"] = jax.tree.map(np.asarray, pure["blocks"])
    return pure


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
    return params_for_model(official_to_pure_params(state_dict, model_config, source=source),
                            model_config)


def params_for_model(pure: Mapping, model_config: Any):
    """A pure params dict -> the ``nnx.State`` (jax arrays) of ``model_config``'s network.

    Raises:
      ValueError: the tree or a shape differs from the network's params (the key mapping and
        tim_jax.models disagree, or the params belong to another architecture).
    """
    import jax
    import jax.numpy as jnp

    from tim_jax.models.functional import params_from_pure_dict

    try:
        return params_from_pure_dict(model_config, jax.tree.map(jnp.asarray, pure))
    except ValueError as e:
        raise ValueError(f"converted params do not fit the tim_jax model built from the config: {e}") from e


def params_to_official(params: Any, model_config: Any | None = None) -> dict[str, np.ndarray]:
    """tim_jax params (nnx.State or pure dict; list or scan layout) -> official state dict.

    Returns float32 numpy arrays in torch layout under the official key names. When
    ``model_config`` is given the result is validated against the official architecture.
    """
    flat = {p: np.asarray(v, dtype=np.float32)  # numpy first: slicing it costs no dispatch
            for p, v in traverse_util.flatten_dict(pure_params(params)).items()}
    pure = traverse_util.unflatten_dict(flat)
    if not _is_list_layout(pure):
        from tim_jax.models.functional import unstack_block_params

        pure = unstack_block_params(pure)
    sd = flat_to_official(traverse_util.flatten_dict(pure))
    if model_config is not None:
        check_official_state_dict(sd, model_config, source="exported params")
    return sd
