"""EMA export for inference: the EMA params of one training checkpoint (one decay) as a
standalone checkpoint (numpy, no sharding, no optimizer state) plus its config.

    python -m tim_jax.training.export WORKDIR OUT_DIR [--step N] [--decay D]

writes ``OUT_DIR/ema_params/`` (Orbax) and ``OUT_DIR/export.json`` (step, decay, config);
:func:`load_ema` reads it back, optionally straight into target shardings, and
:func:`load_ema_model` also rebuilds the network: ``(graphdef, params, config)``.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tim_jax.training.checkpointing import CHECKPOINT_SUBDIR, _path, latest_step

__all__ = ["export_ema", "load_ema", "load_ema_model", "main"]

EMA_ITEM = "ema_params"



def _select_ema(tree: Mapping, ema_key: str, decay: str | None):
    """The subtree of one EMA copy: ``tree[ema_key]`` or ``tree[ema_key][decay]``."""
    if ema_key not in tree:
        raise ValueError(f"the checkpoint state has no {ema_key!r} entry (has {sorted(tree)})")
    sub = tree[ema_key]
    decays = sorted(sub) if isinstance(sub, Mapping) else []
    looks_keyed = decays and all(_is_decay_key(k) for k in decays)
    if not looks_keyed:
        if decay is not None:
            raise ValueError(f"the checkpoint keeps a single EMA copy; decay={decay!r} not applicable")
        return None, sub
    if decay is None:
        decay = decays[0] if len(decays) == 1 else None
        if decay is None:
            raise ValueError(f"several EMA copies {decays}: pass decay= one of them")
    decay = str(decay)
    if decay not in sub:
        raise ValueError(f"no EMA copy with decay {decay!r}; the checkpoint has {decays}")
    return decay, sub[decay]


def _is_decay_key(k) -> bool:
    try:
        return 0.0 < float(k) < 1.0
    except (TypeError, ValueError):
        return False


def export_ema(workdir, step: int | None, out_dir, *, decay: str | None = None,
               ema_key: str = "ema_params") -> epath.Path:
    """Write the EMA params of checkpoint ``step`` (None: the newest) to ``out_dir``.

    ``out_dir/ema_params`` is an Orbax StandardCheckpointer directory of numpy arrays (no
    sharding; loadable on any device count) and ``out_dir/export.json`` holds
    ``{"step", "decay", "config"}`` (config = the run's resolved config). ``decay`` picks one
    EMA copy when the state keeps several (``state[ema_key][decay]``). Returns ``out_dir``.
    Only the EMA leaves are read from the checkpoint.
    """
    ckpt_dir = _path(workdir) / CHECKPOINT_SUBDIR
    step = latest_step(workdir) if step is None else int(step)
    if step is None:
        raise ValueError(f"no checkpoint in {ckpt_dir}")
    state_dir = ckpt_dir / str(step) / "state"
    if not state_dir.is_dir():
        raise ValueError(f"no checkpoint for step {step} in {ckpt_dir}")
    reader = ocp.PyTreeCheckpointer()
    meta = reader.metadata(state_dir).item_metadata
    tree = getattr(meta, "tree", meta)
    decay, ema_meta = _select_ema(tree, ema_key, decay)
    sel = {ema_key: {decay: ema_meta}} if decay is not None else {ema_key: ema_meta}
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), sel)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), sel)
    got = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    params = got[ema_key][decay] if decay is not None else got[ema_key]
    config = None
    cfg_dir = ckpt_dir / str(step) / "config"
    if cfg_dir.is_dir():
        config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(cfg_dir, args=ocp.args.JsonRestore())
    out_dir = _path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params_dir = out_dir / EMA_ITEM
    if params_dir.exists():
        params_dir.rmtree()
    with ocp.StandardCheckpointer() as writer:
        writer.save(params_dir, params)
    (out_dir / "export.json").write_text(
        json.dumps({"step": step, "decay": decay, "config": config}, indent=1))
    return out_dir


def load_ema(export_dir: str, target=None) -> tuple[Any, dict]:
    """Load an :func:`export_ema` directory -> ``(params, info)``.

    ``target``: optional pytree of ``jax.ShapeDtypeStruct`` (with ``sharding`` to place the
    arrays directly on a mesh) or arrays; without it the params come back as numpy arrays.
    ``info``: ``{"step", "decay", "config"}``. Without a target, all-digit dict keys come back
    as ints (``{"blocks": {0: ...}}``), as ``nnx.to_pure_dict`` writes list indices.
    """
    export_dir = _path(export_dir)
    info = json.loads((export_dir / "export.json").read_text())
    params_dir = export_dir / EMA_ITEM
    with ocp.StandardCheckpointer() as reader:
        if target is None:
            meta = reader.metadata(params_dir).item_metadata
            tree = getattr(meta, "tree", meta)
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
            params = reader.restore(params_dir, target)
            params = _int_keys(jax.tree.map(np.asarray, params))
        else:
            params = reader.restore(params_dir, target)
    return params, info


def _int_keys(tree):
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}
    return tree


def load_ema_model(export_dir, mesh=None, shardings=None):
    """``(graphdef, params, config)`` of an :func:`export_ema` directory, ready for inference.

    Builds the network of the exported run's ``config.model`` abstractly (no allocation),
    restores the EMA params into that structure (numpy arrays; with ``shardings``, a pytree of
    ``jax.sharding.Sharding`` matching the params, straight onto the devices), and returns the
    graphdef for ``tim_jax.models.functional.make_apply_fn(graphdef)`` and the config as a
    ``ConfigDict``. ``mesh`` + the config's sharding rules give the shardings when
    ``shardings`` is None and a mesh is passed.
    """
    import ml_collections

    from tim_jax.training import sharding as sharding_lib
    from tim_jax.training import state as train_state

    info = json.loads((_path(export_dir) / "export.json").read_text())
    if not info.get("config"):
        raise ValueError(f"{export_dir}: the export has no config (exported from a checkpoint "
                         "saved without one); use load_ema with your own target")
    config = ml_collections.ConfigDict(info["config"])
    graphdef, abstract, names = train_state.abstract_run_params(config)
    if shardings is None and mesh is not None:
        rules, min_size = sharding_lib.rules_from_config(config, mesh)
        shardings = sharding_lib.tree_shardings(abstract, names, mesh, rules, min_size)
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    params, _ = load_ema(export_dir, abstract)
    return graphdef, params, config


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tim_jax.training.export WORKDIR OUT_DIR [--step N] [--decay D]``."""
    import argparse
    import sys

    ex = argparse.ArgumentParser(prog="python -m tim_jax.training.export",
                                 description="Write the EMA params of one training checkpoint "
                                             "for inference (ema_params/ + export.json).")
    ex.add_argument("workdir", help="run directory (holds checkpoints/)")
    ex.add_argument("out_dir", help="where to write ema_params/ and export.json")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ex.add_argument("--decay", default=None, help="EMA decay key when the run keeps several")
    args = ex.parse_args(argv)
    try:
        out = export_ema(args.workdir, args.step, args.out_dir, decay=args.decay)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "export.json").read_text())
    print(f"exported EMA {info['decay']} of step {info['step']} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
