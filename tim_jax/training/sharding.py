"""Device mesh and logical-axis sharding for training (FSDP over ``fsdp``, data parallel over all).

The mesh has two named axes, ``("data", "fsdp")`` (:data:`MESH_AXES`), both of
``jax.sharding.AxisType.Auto``: XLA's sharding propagation (GSPMD/Shardy) places the
intermediates, and ``jax.lax.with_sharding_constraint`` may pin activations. We deliberately do
NOT use Explicit axes: the step is a plain ``jax.jit`` with in/out shardings, the models carry
no sharding-in-types annotations, and Explicit mode would turn every un-annotated
contraction over a sharded dim into an error.

* Batch rows are split over every device: ``PartitionSpec(("data", "fsdp"))`` on dim 0.
* Parameters, their EMA copies and the optimizer moments are sharded (ZeRO-3 style) by their
  *logical* axis names (the ``out_sharding`` metadata the models put on every ``nnx.Param``)
  through ``config.sharding_rules.rules`` (logical name -> mesh axis / axes / None); arrays with
  fewer than ``min_shard_size`` elements are replicated. A mesh axis is used at most once per
  array (the first dim that asks for it gets it) and a dim whose size the mesh axes do not divide
  is replicated, so any rule set yields a valid sharding.

Public API
----------
``MESH_AXES``                                  the mesh axis names ("data", "fsdp")
``mesh_shape(mesh_config, num_devices)``       -> {"data": n, "fsdp": m}, -1 auto-filled, checked
``make_mesh(config, devices=None)``            -> jax.sharding.Mesh (Auto axes) from config.mesh
``batch_sharding(mesh)``                       -> NamedSharding splitting dim 0 over all devices
``replicated(mesh)``                           -> NamedSharding replicated on every device
``rules_from_config(config)``                  -> (rules dict, min_shard_size), validated
``logical_to_spec(names, shape, mesh, rules, min_shard_size=0)`` -> PartitionSpec
``logical_to_sharding(names, shape, mesh, rules, min_shard_size=0)`` -> NamedSharding
``logical_axes(state)``                        -> pytree of logical-name tuples from nnx Variables
``tree_shardings(abstract, names, mesh, rules, min_shard_size)`` -> NamedSharding pytree
``check_batch_size(global_batch_size, mesh, grad_accum_steps=1)`` -> ValueError when not divisible
``describe_shardings(tree)``                   -> {"path": "spec"} for logging
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
MeshAxes = Union[None, str, Sequence[str]]
Rules = Mapping[str, tuple[str, ...]]

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

__all__ = [
    "MESH_AXES", "BATCH_AXES", "mesh_shape", "make_mesh", "batch_sharding", "replicated",
    "rules_from_config", "normalize_rules", "logical_to_spec", "logical_to_sharding",
    "logical_axes", "tree_shardings", "check_batch_size", "describe_shardings",
]


# ----------------------------------------------------------------------------------------------
# mesh
def mesh_shape(mesh_config: Any, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes ``{"data": n, "fsdp": m}`` from ``config.mesh`` for ``num_devices``.

    Each size is a positive int or -1 (at most one -1, filled with what is left). The sizes
    must multiply to ``num_devices``; otherwise a ValueError names the sizes and the count.
    """
    sizes = {}
    for name in MESH_AXES:
        value = mesh_config[name] if isinstance(mesh_config, Mapping) else getattr(mesh_config, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or (
                value < 1 and value != -1):
            raise ValueError(f"mesh.{name} must be a positive int or -1 (auto), got {value!r}")
        sizes[name] = int(value)
    auto = [n for n, v in sizes.items() if v == -1]
    if len(auto) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (auto), got mesh={sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if auto:
        if num_devices % fixed:
            raise ValueError(f"mesh={sizes}: the fixed axis sizes (product {fixed}) do not divide "
                             f"the device count {num_devices}")
        sizes[auto[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh={sizes}: axis sizes multiply to {math.prod(sizes.values())}, "
                         f"but there are {num_devices} devices")
    return sizes


def make_mesh(config: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The ("data", "fsdp") mesh of ``config.mesh`` (the full config or its ``mesh`` section).

    ``devices`` defaults to ``jax.devices()`` (all devices of all processes). Axis types are
    ``AxisType.Auto`` (see the module docstring); the device order comes from
    ``jax.make_mesh`` (topology-aware on TPU/GPU).
    """
    mesh_config = config.mesh if hasattr(config, "mesh") else config
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[n] for n in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dim 0 (rows) split over every device of the mesh; other dims replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding (scalars, rng keys, step counters)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """Raise ValueError unless ``global_batch_size`` splits into ``grad_accum_steps`` equal
    micro-batches that each split evenly over all ``mesh.size`` devices."""
    if not isinstance(grad_accum_steps, (int, np.integer)) or grad_accum_steps < 1:
        raise ValueError(f"optim.grad_accum_steps must be a positive int, got {grad_accum_steps!r}")
    n = mesh.size * int(grad_accum_steps)
    if global_batch_size < 1 or global_batch_size % n:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} must be a positive multiple of "
            f"devices ({mesh.size}) x optim.grad_accum_steps ({grad_accum_steps}) = {n}")


# ----------------------------------------------------------------------------------------------
# logical axis rules
def _as_axes(value: MeshAxes) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def normalize_rules(rules: Any, mesh: Optional[Mesh] = None) -> dict[str, tuple[str, ...]]:
    """``{logical: (mesh axes...)}`` from a sequence of ``(logical, axes)`` pairs or a mapping.

    Raises ValueError for a malformed rule, a duplicate logical name or (given ``mesh``) a mesh
    axis that the mesh does not have.
    """
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"sharding rule must be a (logical_name, mesh_axes) pair, got {pair!r}")
        name, axes = pair[0], _as_axes(pair[1])
        if name in out:
            raise ValueError(f"sharding_rules: logical axis {name!r} appears twice")
        if mesh is not None:
            bad = [a for a in axes if a not in mesh.axis_names]
            if bad:
                raise ValueError(f"sharding_rules: {name!r} -> {bad}: mesh has only axes "
                                 f"{tuple(mesh.axis_names)}")
        out[name] = axes
    return out


def rules_from_config(config: Any, mesh: Optional[Mesh] = None) -> tuple[dict, int]:
    """``(rules, min_shard_size)`` of ``config.sharding_rules`` (validated against ``mesh``)."""
    sr = config.sharding_rules
    min_size = int(sr.min_shard_size)
    if min_size < 0:
        raise ValueError(f"sharding_rules.min_shard_size must be >= 0, got {min_size}")
    return normalize_rules(sr.rules, mesh), min_size


def logical_to_spec(names: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh,
                    rules: Rules, min_shard_size: int = 0) -> PartitionSpec:
    """The PartitionSpec of one array from its logical axis names.

    names: one logical name (or None) per dim of ``shape``; None/empty means unannotated
    (replicated). Replicated when the array has fewer than ``min_shard_size`` elements. A mesh
    axis is given to the first dim that asks for it; a dim whose size is not divisible by the
    product of its mesh axes is left unsharded. Raises ValueError when ``len(names)`` is not the
    array's rank.
    """
    shape = tuple(int(s) for s in shape)
    if not names:
        return PartitionSpec()
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match an array of shape {shape}")
    if math.prod(shape) < min_shard_size:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = tuple(a for a in rules.get(name, ()) if a not in used) if name is not None else ()
        # keep the longest prefix of the axes that divides the dim
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_to_sharding(names: Optional[Sequence[Optional[str]]], shape: Sequence[int],
                        mesh: Mesh, rules: Rules, min_shard_size: int = 0) -> NamedSharding:
    """:func:`logical_to_spec` as a NamedSharding on ``mesh``."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules, min_shard_size))


def _is_variable(x) -> bool:
    from flax import nnx
    return isinstance(x, nnx.Variable)


def logical_axes(state: PyTree) -> PyTree:
    """Logical names of every array of an nnx State (or a Module's split state).

    Returns a pure nested dict shaped like ``nnx.to_pure_dict(state)`` whose leaves are tuples
    of logical names (from each Variable's ``out_sharding`` metadata) or None (unannotated).
    """
    from flax import nnx

    def names(v):
        meta = v.get_metadata() if _is_variable(v) else {}
        axes = meta.get("out_sharding")
        return tuple(axes) if axes else None

    if not isinstance(state, nnx.State):
        state = nnx.state(state)            # a Module
    mapped = jax.tree.map(lambda v: v.replace(_Leaf(names(v))), state, is_leaf=_is_variable)
    pure = nnx.to_pure_dict(mapped)
    return jax.tree.map(lambda leaf: leaf.value, pure)


class _Leaf:
    """Opaque (non-pytree) holder so tuples of names survive tree maps as single leaves."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def tree_shardings(abstract: PyTree, names: PyTree, mesh: Mesh, rules: Rules,
                   min_shard_size: int = 0) -> PyTree:
    """NamedShardings for every array of ``abstract`` (arrays or ShapeDtypeStructs) given a
    matching pytree ``names`` of logical-name tuples (None leaves = replicated)."""
    is_names = lambda x: x is None or (isinstance(x, tuple) and all(
        isinstance(n, (str, type(None))) for n in x))
    flat_names, names_def = jax.tree.flatten(names, is_leaf=is_names)
    flat_arrays, arrays_def = jax.tree.flatten(abstract)
    if len(flat_names) != len(flat_arrays):
        raise ValueError(f"logical-axes tree ({len(flat_names)} leaves) does not match the "
                         f"array tree ({len(flat_arrays)} leaves)")
    out = [logical_to_sharding(n, a.shape, mesh, rules, min_shard_size)
           for n, a in zip(flat_names, flat_arrays)]
    return jax.tree.unflatten(arrays_def, out)


def describe_shardings(tree: PyTree) -> dict[str, str]:
    """``{"a/b/kernel": "PartitionSpec(...)"}`` for a pytree of shardings or sharded arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = leaf if isinstance(leaf, jax.sharding.Sharding) else getattr(leaf, "sharding", None)
        key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p))))
                       for p in path)
        out[key] = str(getattr(sharding, "spec", sharding))
    return out
