"""Weights directories of tim_jax: the converted-weights directory, and export of tim_jax weights
to an official-layout ``.safetensors``.

Converted-weights directory (``python -m tim_jax.convert --official FILE ... --out DIR``;
:func:`save_converted`, :func:`load_converted`)::

    DIR/model_config.json   the tim_jax model config (config.model fields) as JSON
    DIR/params/             Orbax StandardCheckpointer save of the params as a pure nested dict
                            (nnx.to_pure_dict layout; float32)
    DIR/conversion.json     provenance: source file, its sha256, ema flag, tim_jax version

It holds inference weights only (no optimizer / EMA / step); training checkpoints are a separate
format owned by ``tim_jax.training.checkpointing``. :func:`load_weights_dir` also reads the EMA
export of a training run (``python -m tim_jax.training.export``: ``export.json`` +
``ema_params/``), so either can be exported back to the official layout
(:func:`export_official_safetensors`, ``python -m tim_jax.convert --export DIR --out FILE``).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from tim_jax.interop.official_arch import cfg_get, cfg_to_dict, model_config_from_json
from tim_jax.interop.official_keys import params_for_model, params_to_official, pure_params

__all__ = [
    "save_converted",
    "load_converted",
    "load_weights_dir",
    "export_official_safetensors",
    "file_sha256",
]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (read in 4 MiB chunks)."""
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
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", pure_params(params), force=True)
        ckptr.wait_until_finished()
    (directory / "model_config.json").write_text(json.dumps(cfg_to_dict(model_config), indent=1))
    from tim_jax import __version__

    meta = {"tim_jax_version": __version__, **(provenance or {})}
    (directory / "conversion.json").write_text(json.dumps(meta, indent=1))
    return directory


def _is_converted(directory: pathlib.Path) -> bool:
    return (directory / "model_config.json").is_file() and (directory / "params").is_dir()


def _is_ema_export(directory: pathlib.Path) -> bool:
    return (directory / "export.json").is_file() and (directory / "ema_params").is_dir()


def load_converted(directory: str | os.PathLike, **config_overrides: Any):
    """Read a converted-weights directory -> ``(model_config, params)``.

    ``params`` is an ``nnx.State`` shaped like the model's params (fp32). ``config_overrides``
    replace model-config fields that do not change the params (e.g. ``dtype``,
    ``attention_impl``); changing ``scan_blocks`` restacks the blocks.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    from tim_jax.models import functional

    directory = pathlib.Path(directory).absolute()
    if not _is_converted(directory):
        raise ValueError(
            f"{directory} is not a converted tim_jax checkpoint: expected model_config.json and params/ "
            "(made by `python -m tim_jax.convert`)")
    stored = json.loads((directory / "model_config.json").read_text())
    stored_cfg = model_config_from_json(stored)
    cfg = model_config_from_json({**stored, **config_overrides})
    target = nnx.to_pure_dict(functional.abstract_params(stored_cfg))
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(directory / "params", target)
    was_scanned, scan = (bool(cfg_get(c, "scan_blocks", False)) for c in (stored_cfg, cfg))
    if scan and not was_scanned:
        pure = functional.stack_block_params(pure)
    elif was_scanned and not scan:
        pure = functional.unstack_block_params(jax.tree.map(np.asarray, pure))
    return cfg, params_for_model(pure, cfg)


def load_weights_dir(directory: str | os.PathLike) -> tuple[Any, dict]:
    """``(model_config, pure params)`` of a converted-weights directory (model_config.json +
    params/) or of a training run's EMA export (export.json + ema_params/).

    Raises:
      ValueError: neither layout, or an EMA export without its run config.
    """
    directory = pathlib.Path(directory).absolute()
    if _is_converted(directory):
        cfg, params = load_converted(directory)
        return cfg, pure_params(params)
    if _is_ema_export(directory):
        from tim_jax.training.export import load_ema

        params, info = load_ema(str(directory))
        model = (info.get("config") or {}).get("model")
        if not model:
            raise ValueError(f"{directory}/export.json has no config.model: the export cannot say "
                             "which architecture its weights belong to")
        return model_config_from_json(model), pure_params(params)
    present = sorted(p.name for p in directory.iterdir())[:12] if directory.is_dir() else None
    raise ValueError(
        f"{directory} is neither a converted tim_jax directory (model_config.json + params/, from "
        "`python -m tim_jax.convert --official ...`) nor an EMA export (export.json + ema_params/, "
        "from `python -m tim_jax.training.export`)"
        + ("; it does not exist" if present is None else f"; it holds {present}"))


def export_official_safetensors(params: Any, model_config: Any, path: str | os.PathLike) -> pathlib.Path:
    """Write params as an official-layout float32 ``.safetensors`` that the official
    ``init_from_ckpt`` / ``load_state_dict`` loads with no missing or unexpected keys."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"export target {path} must end in .safetensors")
    sd = params_to_official(params, model_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(sd.items())), str(path), metadata={"format": "pt", "producer": "tim_jax"})
    return path
