"""Orbax checkpoints of the train state, with exact resume, resharding and EMA export.

Layout of a run directory (``workdir``)::

    workdir/config.json                 resolved config of the latest (re)start (train CLI)
    workdir/checkpoints/<step>/state    the train state pytree (Orbax PyTree format, sharded)
    workdir/checkpoints/<step>/config   the resolved config it was trained with (JsonSave)
    workdir/checkpoints/<step>/data     data-iterator state, one JSON per process (Grain handler)

:class:`Checkpointer` wraps an async ``ocp.CheckpointManager``:

  * :meth:`Checkpointer.save` every ``every_steps`` steps (and at ``keep_steps``), or any step
    with ``force=True`` (end of run, SIGTERM / preemption). The call returns once the arrays
    are copied off device; the write runs in a background thread. ``keep`` newest checkpoints
    are kept, plus ``keep_steps`` forever.
  * Atomic commits: Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
    when every item is written (``commit_success.txt`` as well on non-atomic-rename file
    systems). A process killed mid-save leaves only the tmp dir, which is ignored (and removed
    by the next :class:`Checkpointer` on that directory), so the previous step stays the
    latest restorable one (checked by ``tests/test_checkpointing.py``).
  * :meth:`Checkpointer.restore` reads into an *abstract* target (``jax.ShapeDtypeStruct``
    leaves carrying the target ``NamedSharding``), so arrays land directly in the current
    mesh's layout: a checkpoint written on a (data=8, fsdp=1) mesh restores onto (2, 4) or onto
    a different device count.
  * :meth:`Checkpointer.check_compatible` compares the saved config's ``model`` section and
    the saved array shapes with the current run and raises a ValueError naming the
    differences (run before anything is compiled or written).

:mod:`tim_jax.training.export` writes the EMA params of one checkpoint as a standalone
inference checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "CHECKPOINT_SUBDIR",
    "RUNTIME_MODEL_KEYS",
    "Checkpointer",
    "config_to_dict",
    "diff_model_config",
    "latest_step",
]

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
RUNTIME_MODEL_KEYS = frozenset({"dtype", "remat", "attention_impl"})
"""``config.model`` fields that change how the network runs, not its parameters: a run may
resume with different values of these."""

_ITEMS = ("state", "config", "data")


# ----------------------------------------------------------------------------------------------
# config helpers
def config_to_dict(config) -> dict:
    """ConfigDict / mapping -> plain JSON-compatible dict (tuples become lists)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def diff_model_config(saved: Mapping, current: Mapping,
                      ignore: Iterable[str] = RUNTIME_MODEL_KEYS) -> list[str]:
    """Human-readable differences between two ``model`` config sections (JSON dicts)."""
    ignore = set(ignore)
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"model.{key}: checkpoint has {a!r}, this run has {b!r}")
    return out


def _leaf_paths(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def _is_key_dtype(dtype) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


# ----------------------------------------------------------------------------------------------
class Checkpointer:
    """Async Orbax checkpoint manager for one run directory (see the module docstring).

    Args:
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      every_steps: save cadence (steps that are multiples of it); 0 saves only on force.
      keep: number of newest checkpoints to keep (>= 1).
      keep_steps: steps kept forever (also saved when reached).
      async_save: write in a background thread.
      read_only: only read (no directory creation, no tmp-dir cleanup, no saves): for
        inspecting a run directory without touching it.
    """

    def __init__(
        self,
        workdir,
        *,
        every_steps: int = 1000,
        keep: int = 2,
        keep_steps: Sequence[int] = (),
        async_save: bool = True,
        read_only: bool = False,
    ):
        if every_steps < 0:
            raise ValueError(f"ckpt.every_steps must be >= 0, got {every_steps}")
        if keep < 1:
            raise ValueError(f"ckpt.keep must be >= 1, got {keep}")
        self.workdir = _path(workdir)
        self.directory = self.workdir / CHECKPOINT_SUBDIR
        keep_steps = tuple(int(s) for s in keep_steps)
        preservation = ocp.checkpoint_managers.LatestN(n=int(keep))
        if keep_steps:
            preservation = ocp.checkpoint_managers.AnyPreservationPolicy(
                [preservation, ocp.checkpoint_managers.CustomSteps(keep_steps)])
        cm = ocp.checkpoint_managers
        # No InitialSavePolicy (Orbax's default would save the first step of a fresh run).
        policies = [cm.PreemptionCheckpointingPolicy()]
        if every_steps > 0:
            policies.append(cm.FixedIntervalPolicy(int(every_steps)))
        if keep_steps:
            policies.append(cm.SpecificStepsPolicy(keep_steps))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.AnySavePolicy(policies),
            preservation_policy=preservation,
            enable_async_checkpointing=bool(async_save),
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=bool(read_only),
        )
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=_ITEMS,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handler_registry()),
                "config": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    # -- queries ---------------------------------------------------------------------------
    @property
    def manager(self) -> ocp.CheckpointManager:
        return self._mngr

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def _step_dir(self, step: int) -> str:
        return self.directory / str(int(step))

    def has_item(self, step: int, item: str) -> bool:
        return (self._step_dir(step) / item).is_dir()

    def saved_config(self, step: int | None = None) -> dict | None:
        """The config saved with ``step`` (default: latest), or None if none was saved."""
        step = self.latest_step() if step is None else step
        if step is None or not self.has_item(step, "config"):
            return None
        return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def saved_shapes(self, step: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{"path/to/leaf": (shape, dtype)}`` of the state saved at ``step`` (default latest)."""
        step = self.latest_step() if step is None else step
        meta = self._mngr.item_metadata(step)["state"]
        tree = getattr(meta, "tree", meta)
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in _leaf_paths(tree).items()}

    # -- compatibility -----------------------------------------------------------------------
    def check_compatible(self, config, abstract_state=None, step: int | None = None) -> None:
        """Raise ValueError if the checkpoint at ``step`` (default latest) is of another model.

        Compares the saved ``model`` config section (ignoring :data:`RUNTIME_MODEL_KEYS`) and,
        when ``abstract_state`` is given, the saved leaf paths and shapes with the current
        ones. Does nothing when there is no checkpoint. Reads only metadata.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return
        where = str(self._step_dir(step))
        saved = self.saved_config(step)
        current = config_to_dict(config)
        problems = []
        if saved is not None and "model" in saved and "model" in current:
            problems += diff_model_config(saved["model"], current["model"])
        if abstract_state is not None and not problems:
            saved_shapes = self.saved_shapes(step)
            cur = {k: v for k, v in _leaf_paths(abstract_state).items()}
            missing = sorted(set(cur) - set(saved_shapes))
            extra = sorted(set(saved_shapes) - set(cur))
            for k in missing[:5]:
                problems.append(f"{k}: absent from the checkpoint")
            if len(missing) > 5:
                problems.append(f"... and {len(missing) - 5} more leaves absent from the checkpoint")
            for k in extra[:5]:
                problems.append(f"{k}: in the checkpoint but not in this run's state")
            if len(extra) > 5:
                problems.append(f"... and {len(extra) - 5} more leaves only in the checkpoint")
            n_shape = 0
            for k in sorted(set(cur) & set(saved_shapes)):
                leaf = cur[k]
                if _is_key_dtype(leaf.dtype):
                    continue  # PRNG keys are stored as their raw uint32 data
                if tuple(leaf.shape) != saved_shapes[k][0]:
                    n_shape += 1
                    if n_shape <= 5:
                        problems.append(f"{k}: checkpoint shape {saved_shapes[k][0]}, this run "
                                        f"{tuple(leaf.shape)}")
            if n_shape > 5:
                problems.append(f"... and {n_shape - 5} more shape mismatches")
        if problems:
            raise ValueError(
                f"the workdir holds a checkpoint of another architecture ({where}):\n  "
                + "\n  ".join(problems)
                + "\nUse a new --workdir, or match the model config of that run."
            )

    # -- save / restore ----------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` (without force) would write at ``step``."""
        return self._mngr.should_save(int(step))

    def save(self, step: int, state, *, config=None, data_iter=None, force: bool = False) -> bool:
        """Save ``state`` (a pytree of jax arrays) as ``step`` if due (or ``force``).

        ``config`` (ConfigDict or dict) is stored beside it; ``data_iter`` (an iterator with
        ``get_state``/``set_state``, e.g. a Grain iterator or :class:`tim_jax.data.DevicePrefetcher`)
        has its position stored too. Returns whether a save was started. Async: call
        :meth:`wait` before relying on it on disk. A step that already exists is not
        overwritten (returns False).
        """
        step = int(step)
        if step in self._mngr.all_steps():
            return False
        items = {"state": ocp.args.PyTreeSave(state)}
        if config is not None:
            items["config"] = ocp.args.JsonSave(config_to_dict(config))
        if data_iter is not None and _supports_state(data_iter):
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, *, step: int | None = None, data_iter=None):
        """Restore the state saved at ``step`` (default: latest) into ``abstract_state``'s layout.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (the target
        shardings, possibly of another mesh than the one saved from), or of concrete arrays.
        ``data_iter``: restored in place to the saved position when both it and the
        checkpoint support that. Returns the restored state.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise ValueError(f"no checkpoint to restore in {self.directory}")
        items = {"state": ocp.args.PyTreeRestore(
            item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        restore_data = (data_iter is not None and _supports_state(data_iter)
                        and self.has_item(step, "data"))
        if data_iter is not None and _supports_state(data_iter) and not restore_data:
            log.warning("checkpoint %d has no data-iterator state; the data restarts from its start", step)
        if restore_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            if restore_data and "does not exist" in str(e):
                raise ValueError(
                    f"checkpoint {step}: the data-iterator state was saved with a different number "
                    f"of processes than this run has ({jax.process_count()}); Grain iterator "
                    f"states are per process ({e})") from e
            raise
        return restored.state

    def wait(self) -> None:
        """Block until any in-flight async save is committed (raises its error, if any)."""
        self._mngr.wait_until_finished()

    def is_saving(self) -> bool:
        return self._mngr.is_saving_in_progress()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _type_handler_registry():
    """Orbax's default type handlers, with replica-parallel array saving only on multi-process
    runs.

    Replica-parallel saving splits every replicated array over its replicas so that several
    hosts share the writing; each split is an eager slice that compiles once per shape. On a
    single process there is nobody to share with, and those compiles made the first save of a
    tiny model take ~20 s instead of ~0.7 s (8 CPU devices, 232 leaves).
    """
    base = ocp.type_handlers.get_type_handler(jax.Array)
    arrays = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        array_metadata_store=getattr(base, "_array_metadata_store", None))
    others = [(ty, ocp.type_handlers.get_type_handler(ty))
              for ty in ocp.type_handlers.supported_types() if ty is not jax.Array]
    return ocp.type_handlers.create_type_handler_registry(*others, (jax.Array, arrays))


def _path(p) -> epath.Path:
    """A local path (made absolute) or a remote one (``gs://...``) as an ``epath.Path``."""
    p = os.fspath(p)
    return epath.Path(p if "://" in p else os.path.abspath(os.path.expanduser(p)))


def _supports_state(it) -> bool:
    if hasattr(it, "supports_state"):
        return bool(it.supports_state)
    return hasattr(it, "get_state") and hasattr(it, "set_state")


def latest_step(workdir: str) -> int | None:
    """Newest committed checkpoint step of a run directory (None if none), read-only."""
    directory = _path(workdir) / CHECKPOINT_SUBDIR
    if not directory.is_dir():
        return None
    steps = []
    for child in directory.iterdir():
        if child.name.isdigit() and (child / "state").is_dir():
            steps.append(int(child.name))
    return max(steps) if steps else None
