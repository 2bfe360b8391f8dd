"""Mesh construction, logical-axis rules and the train-state shardings (no compilation: the
state shardings come from ``abstract_train_state``, i.e. ``eval_shape`` of the real debug model).
Actual sharded arrays of a created state are checked in test_train_step.py."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs import base, debug_cpu
from tim_jax.training import sharding
from tim_jax.training import state as train_state


@pytest.mark.parametrize("data,fsdp,expect", [
    (-1, 1, (8, 1)), (-1, 4, (2, 4)), (2, -1, (2, 4)), (2, 4, (2, 4)), (1, -1, (1, 8)),
])
def test_mesh_shape_autofill(data, fsdp, expect):
    sizes = sharding.mesh_shape({"data": data, "fsdp": fsdp}, 8)
    assert (sizes["data"], sizes["fsdp"]) == expect


@pytest.mark.parametrize("data,fsdp,match", [
    (2, 3, "multiply to 6, but there are 8 devices"),
    (-1, -1, "at most one mesh axis may be -1"),
    (-1, 3, "do not divide the device count 8"),
    (0, 8, "mesh.data must be a positive int or -1"),
    (2, 4.0, "mesh.fsdp must be a positive int or -1"),
    (True, 8, "mesh.data must be a positive int or -1"),
])
def test_mesh_shape_errors(data, fsdp, match):
    with pytest.raises(ValueError, match=match):
        sharding.mesh_shape({"data": data, "fsdp": fsdp}, 8)


def test_make_mesh_from_config_has_auto_axes():
    cfg = base.get_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, -1
    mesh = sharding.make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    one = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:2])
    assert dict(one.shape) == {"data": 2, "fsdp": 1}
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.replicated(mesh).spec == P()


def test_check_batch_size():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    sharding.check_batch_size(16, mesh, 2)
    with pytest.raises(ValueError, match="global_batch_size=12 must be a positive multiple of "
                                         r"devices \(8\)"):
        sharding.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match=r"grad_accum_steps \(4\) = 32"):
        sharding.check_batch_size(16, mesh, 4)
    with pytest.raises(ValueError, match="grad_accum_steps must be a positive int"):
        sharding.check_batch_size(16, mesh, 0)


def test_logical_to_spec_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rules = sharding.normalize_rules(
        [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "fsdp"), ("vocab", None)], mesh)
    spec = lambda names, shape, min_size=0: sharding.logical_to_spec(names, shape, mesh, rules,
                                                                      min_size)
    assert spec(("embed", "mlp"), (64, 256)) == P("fsdp")            # first dim that asks wins
    assert spec(("mlp", "embed"), (256, 64)) == P("fsdp")
    assert spec(("vocab", "embed"), (11, 64)) == P(None, "fsdp")
    assert spec(("embed", "mlp"), (6, 256)) == P(None, "fsdp")        # 6 % 4: next dim takes it
    assert spec(("embed",), (6,)) == P()                              # not divisible: replicated
    assert spec(("batch", None), (16, 3)) == P(("data", "fsdp"))
    assert spec(("batch",), (6,)) == P("data")                        # longest dividing prefix
    assert spec(("embed", "mlp"), (64, 256), min_size=64 * 256 + 1) == P()   # small: replicated
    assert spec(None, (64, 256)) == P()                               # unannotated
    assert spec(("unknown", None), (64, 256)) == P()                  # unlisted name
    with pytest.raises(ValueError, match="do not match an array of shape"):
        spec(("embed",), (64, 256))


def test_rule_validation():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match="mesh has only axes"):
        sharding.normalize_rules([("embed", "tensor")], mesh)
    with pytest.raises(ValueError, match="appears twice"):
        sharding.normalize_rules([("embed", "fsdp"), ("embed", None)], mesh)
    with pytest.raises(ValueError, match="must be a .logical_name, mesh_axes. pair"):
        sharding.normalize_rules([("embed",)], mesh)
    cfg = base.get_config()
    cfg.sharding_rules.min_shard_size = -1
    with pytest.raises(ValueError, match="min_shard_size must be >= 0"):
        sharding.rules_from_config(cfg, mesh)


def _debug_config(scan_blocks=False):
    cfg = debug_cpu.get_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.data.global_batch_size = 16
    cfg.sharding_rules.min_shard_size = 256
    cfg.model.scan_blocks = scan_blocks
    cfg.ema.decays = (0.999, 0.9)
    return cfg


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_train_state_shardings_of_the_debug_model(scan_blocks):
    """Every param >= min_shard_size with an 'embed'-like dim divisible by 4 is FSDP-sharded;
    smaller ones are replicated; EMA copies and Adam moments share the params' shardings; the
    abstract state carries the shardings (what Orbax's restore needs)."""
    cfg = _debug_config(scan_blocks)
    mesh = sharding.make_mesh(cfg)
    abstract, shardings, _ = train_state.abstract_train_state(cfg, mesh)
    flat = jax.tree_util.tree_flatten_with_path(abstract.params)[0]
    n_sharded = 0
    for path, leaf in flat:
        spec = leaf.sharding.spec
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
        if leaf.size < 256:
            assert spec == P(), name
        if "fsdp" in jax.tree.leaves(tuple(spec)):
            n_sharded += 1
            dim = [i for i, s in enumerate(spec) if s == "fsdp"][0]
            assert leaf.shape[dim] % 4 == 0, name
        if scan_blocks and "blocks" in name:
            assert leaf.shape[0] == cfg.model.depth and (len(spec) == 0 or spec[0] is None), name
    assert n_sharded >= len(flat) // 3, [jax.tree_util.keystr(p) for p, _ in flat]
    big = max(flat, key=lambda kv: kv[1].size)[1]
    assert "fsdp" in str(big.sharding.spec)
    for key in ("0.999", "0.9"):
        assert abstract.ema_params[key] == abstract.params
    adam = shardings.opt_state[1][0]
    assert adam.mu == shardings.params and adam.nu == shardings.params
    for s in (shardings.step, shardings.rng, adam.count, shardings.opt_state[1][2].count):
        assert s.spec == P()
    assert abstract.step.dtype == np.int32 and abstract.rng.shape == (2,)


def test_params_without_mesh_axes_are_replicated():
    """fsdp=1 (pure data parallel): the specs may name 'fsdp' but every array is whole on
    every device."""
    cfg = _debug_config()
    cfg.mesh.data, cfg.mesh.fsdp = 8, 1
    mesh = sharding.make_mesh(cfg)
    abstract, _, _ = train_state.abstract_train_state(cfg, mesh)
    for leaf in jax.tree.leaves(abstract.params):
        assert leaf.sharding.shard_shape(leaf.shape) == leaf.shape
