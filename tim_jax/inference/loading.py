"""Loading a TiM network for inference from any of the three weight formats tim_jax reads.

``load_network(checkpoint, preset=None, dtype="float32")`` accepts

  * an official TiM checkpoint FILE (``.safetensors``; ``.bin``/``.pth`` need torch): the
    architecture comes from ``preset`` or, without one, from the one preset whose official keys
    and shapes the file has exactly (:func:`infer_preset`);
  * a converted-weights DIRECTORY (``model_config.json`` + ``params/``, written by
    ``python -m tim_jax.convert``);
  * a training run's EMA export DIRECTORY (``export.json`` + ``ema_params/``, written by
    ``python -m tim_jax.training.export``); its run config also gives the transport.

and returns a :class:`LoadedNetwork` (model config with the compute ``dtype`` applied and
``remat`` off, graphdef, float32 params, transport). Every problem is a ValueError (or
FileNotFoundError) naming the file and what is wrong, raised before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tim_jax import transports

__all__ = ["LoadedNetwork", "load_network", "infer_preset", "resolve_dtype", "DTYPES"]

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclasses.dataclass
class LoadedNetwork:
    """A TiM network ready for ``make_apply_fn(graphdef)(params, ...)``.

    ``source_kind``: "official" | "converted" | "ema_export"; ``preset``: the preset name used
    for an official file (None otherwise)."""

    model_config: ml_collections.ConfigDict
    graphdef: Any
    params: Any
    transport: transports.Transport
    source: str
    source_kind: str
    preset: str | None = None


def resolve_dtype(dtype: Any = "auto") -> str:
    """Compute dtype name: "auto" -> "bfloat16" on GPU/TPU (the official sampling dtype),
    "float32" on CPU; also accepts "float32"/"fp32"/"bfloat16"/"bf16" or a jnp dtype."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
    if not isinstance(dtype, str):
        try:
            dtype = jnp.dtype(dtype).name
        except TypeError as e:
            raise ValueError(f"dtype {dtype!r} is not a dtype") from e
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of "
                         f"{['auto', *sorted(set(DTYPES.values()))]}")
    return DTYPES[dtype]


def infer_preset(state_dict, source: str = "checkpoint") -> str:
    """The single tim_jax preset whose official keys and shapes ``state_dict`` has exactly.

    Raises:
      ValueError: no preset fits (message: the architecture the checkpoint appears to have) or
        several do (message: the candidates).
    """
    from tim_jax.interop import convert
    from tim_jax.models import model_config, preset_names

    fits = [name for name in preset_names()
            if convert.check_official_state_dict(state_dict, model_config(name),
                                                 raise_on_error=False).ok]
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise ValueError(f"{source}: its tensor shapes fit several presets {fits}; choose one "
                         "with --preset NAME (preset=...)")
    seen = convert.infer_official_config(state_dict)
    raise ValueError(
        f"{source}: its tensor shapes fit no tim_jax preset (it looks like {seen}); pass the "
        "architecture with --preset NAME, or convert it first with `python -m tim_jax.convert "
        "--official FILE --config-json CONFIG --out DIR` and sample from DIR")


def _transport_from_run_config(run_config: dict | None) -> transports.Transport:
    """The transport of a training run config (``config.transport``), fields the named
    transport does not have left out; OT_FM defaults when the config has none."""
    tr = dict((run_config or {}).get("transport") or {})
    name = tr.pop("name", "OT_FM")
    cls = transports.TRANSPORTS.get(name)
    if cls is None:
        raise ValueError(f"the run config names an unknown transport {name!r}; known: "
                         f"{sorted(transports.TRANSPORTS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    return transports.make_transport(name, **{k: v for k, v in tr.items() if k in fields})


def _inference_overrides(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "remat": "none"}


def _from_official_file(path: pathlib.Path, preset: str | None, dtype: str,
                        ema: bool | None) -> LoadedNetwork:
    from tim_jax.interop import convert
    from tim_jax.models import abstract_model, model_config

    state_dict = convert.load_official_state_dict(path, ema=ema)
    preset = preset or infer_preset(state_dict, source=str(path))
    cfg = model_config(preset, **_inference_overrides(dtype))
    params = convert.official_to_params(state_dict, cfg, source=str(path))
    graphdef, _ = abstract_model(cfg)
    return LoadedNetwork(cfg, graphdef, params, transports.OT_FM(), str(path), "official", preset)


def _from_converted_dir(path: pathlib.Path, dtype: str) -> LoadedNetwork:
    from tim_jax.interop import convert
    from tim_jax.models import abstract_model

    cfg, params = convert.load_converted(path, **_inference_overrides(dtype))
    graphdef, _ = abstract_model(cfg)
    return LoadedNetwork(cfg, graphdef, params, transports.OT_FM(), str(path), "converted")


def _from_ema_export(path: pathlib.Path, dtype: str) -> LoadedNetwork:
    from tim_jax.models import abstract_model, params_from_pure_dict
    from tim_jax.training.export import load_ema

    info = json.loads((path / "export.json").read_text())
    run_config = info.get("config") or {}
    if not run_config.get("model"):
        raise ValueError(f"{path}/export.json has no config.model: the export cannot say which "
                         "architecture its weights belong to")
    cfg = ml_collections.ConfigDict({**run_config["model"], **_inference_overrides(dtype)})
    pure, _ = load_ema(str(path))
    try:
        params = params_from_pure_dict(cfg, pure)
    except ValueError as e:
        raise ValueError(f"{path}: the EMA params do not fit the exported config.model: {e}") from e
    graphdef, _ = abstract_model(cfg)
    return LoadedNetwork(cfg, graphdef, params, _transport_from_run_config(run_config),
                         str(path), "ema_export")


def load_network(checkpoint, *, preset: str | None = None, dtype: Any = "auto",
                 ema: bool | None = None) -> LoadedNetwork:
    """Load ``checkpoint`` (see the module docstring) with compute dtype ``dtype``.

    ``preset`` applies to an official file only; ``ema`` picks the EMA weights of an official
    wrapper checkpoint that holds both (as ``python -m tim_jax.convert --ema``).
    """
    from tim_jax.models import preset_names

    dtype = resolve_dtype(dtype)
    path = pathlib.Path(checkpoint)
    if preset is not None and preset not in preset_names():
        raise ValueError(f"unknown preset {preset!r}; presets: {list(preset_names())}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        return _from_official_file(path, preset, dtype, ema)
    if preset is not None:
        raise ValueError(f"preset={preset!r} only applies to an official checkpoint file; "
                         f"{path} is a directory that records its own architecture")
    if (path / "model_config.json").is_file() and (path / "params").is_dir():
        return _from_converted_dir(path, dtype)
    if (path / "export.json").is_file() and (path / "ema_params").is_dir():
        return _from_ema_export(path, dtype)
    present = sorted(p.name for p in path.iterdir())[:12]
    raise ValueError(
        f"{path} is neither an official checkpoint file, a converted tim_jax directory "
        "(model_config.json + params/, from `python -m tim_jax.convert`) nor an EMA export "
        f"(export.json + ema_params/, from `python -m tim_jax.training.export`); it holds {present}")
