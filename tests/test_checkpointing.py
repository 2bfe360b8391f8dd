"""Orbax checkpoints: cadence/retention, exact data position, resharding restore, architecture
checks, crash safety of async saves, EMA export."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tim_jax.training import checkpointing, export
from tim_jax.data import pipeline as data
from tim_jax.training.checkpointing import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(data_size, fsdp):
    return Mesh(np.array(jax.devices()).reshape(data_size, fsdp), ("data", "fsdp"))


def _toy_state(mesh, scale=1.0):
    w_sh = NamedSharding(mesh, P("fsdp", None))
    rep = NamedSharding(mesh, P())
    state = {"params": {"w": jnp.arange(64.0).reshape(16, 4) * scale, "b": jnp.ones(4)},
             "ema_params": {"0.999": {"w": jnp.full((16, 4), 0.5), "b": jnp.zeros(4)}},
             "step": jnp.int32(3), "rng": jax.random.PRNGKey(1)}
    sh = {"params": {"w": w_sh, "b": rep}, "ema_params": {"0.999": {"w": w_sh, "b": rep}},
          "step": rep, "rng": rep}
    return jax.device_put(state, sh), sh


def _abstract(state, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def _tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_cadence_retention_data_position_and_resharding(tmp_path):
    mesh8 = _mesh(8, 1)
    state, _ = _toy_state(mesh8)
    src = data.SyntheticSource(shape=(2, 2, 1), num_classes=3)
    bsh = NamedSharding(mesh8, P(("data", "fsdp")))
    it = data.DevicePrefetcher(iter(data.make_dataset(src, local_batch_size=8)),
                               lambda b: data.to_global(b, bsh), size=2)
    config = {"model": {"hidden_size": 4}}
    with Checkpointer(tmp_path, every_steps=2, keep=2) as ck:
        saved = []
        for step in range(1, 8):
            next(it)
            saved.append(ck.save(step, state, config=config, data_iter=it))
            if step == 6:
                after_6 = jax.device_get(next(it))  # the batch step 7 would train on
        assert saved == [False, True, False, True, False, True, False]
        ck.wait()
        assert ck.all_steps() == [4, 6]          # keep=2
        assert ck.save(7, state, force=True)      # forced (end of run / SIGTERM)
        assert not ck.save(7, state, force=True)  # an existing step is never overwritten
        ck.wait()
        assert ck.all_steps() == [6, 7]
        assert ck.saved_config(6) == config

    # Restore step 6 onto a (2, 4) mesh: the arrays land in the new shardings, bit-equal, and the
    # data iterator resumes at the batch that followed step 6.
    mesh24 = _mesh(2, 4)
    _, sh24 = _toy_state(mesh24)
    it2 = data.DevicePrefetcher(iter(data.make_dataset(src, local_batch_size=8)),
                                lambda b: data.to_global(b, NamedSharding(mesh24, P(("data", "fsdp")))))
    with Checkpointer(tmp_path, every_steps=2, keep=2) as ck:
        restored = ck.restore(_abstract(state, sh24), step=6, data_iter=it2)
    assert _tree_equal(restored, state)
    assert restored["params"]["w"].sharding == sh24["params"]["w"]
    assert restored["params"]["w"].sharding.mesh.shape == {"data": 2, "fsdp": 4}
    assert len(restored["params"]["w"].addressable_shards) == 8
    nxt = jax.device_get(next(it2))
    assert all(np.array_equal(nxt[k], after_6[k]) for k in nxt)


def test_train_state_restores_onto_another_mesh(tmp_path):
    """The real TrainState of configs/debug_cpu.py: saved from data x fsdp = 8 x 1, restored
    into abstract arrays carrying the 2 x 4 shardings -> the same values, the new layout."""
    from configs import debug_cpu
    from tim_jax.training import sharding
    from tim_jax.training import state as ts

    cfg8 = debug_cpu.get_config()
    cfg8.mesh.data, cfg8.mesh.fsdp = 8, 1
    abstract8, sh8, _ = ts.abstract_train_state(cfg8, sharding.make_mesh(cfg8))
    # Random values (no init compile needed): every leaf distinct, placed in the 8 x 1 layout.
    rng = np.random.default_rng(0)
    state8 = jax.tree.map(
        lambda a, s: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype) if
                                    np.issubdtype(a.dtype, np.floating) else
                                    rng.integers(0, 1000, a.shape).astype(a.dtype), s),
        abstract8, sh8)
    with Checkpointer(tmp_path, every_steps=1) as ck:
        ck.save(5, state8, config=cfg8)
    cfg24 = debug_cpu.get_config()
    cfg24.mesh.data, cfg24.mesh.fsdp = 2, 4
    mesh24 = sharding.make_mesh(cfg24)
    abstract24, sh24, _ = ts.abstract_train_state(cfg24, mesh24)
    with Checkpointer(tmp_path, read_only=True) as ck:
        ck.check_compatible(cfg24, abstract24)  # a mesh change is not an architecture change
        state24 = ck.restore(abstract24)
    assert _tree_equal(state24, state8)
    flat24 = jax.tree.leaves(state24)
    flat_sh = jax.tree.leaves(sh24, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert all(a.sharding == s for a, s in zip(flat24, flat_sh))
    # at least one param is actually split over the 4-way fsdp axis now
    assert any("fsdp" in str(a.sharding.spec) and a.sharding.mesh.shape["fsdp"] == 4
               for a in jax.tree.leaves(state24.params))


def test_check_compatible_names_the_differences(tmp_path):
    mesh = _mesh(8, 1)
    state, sh = _toy_state(mesh)
    config = {"model": {"hidden_size": 4, "depth": 2, "dtype": "float32"}}
    with Checkpointer(tmp_path, every_steps=1) as ck:
        ck.save(1, state, config=config)
    before = sorted(os.walk(tmp_path))
    with Checkpointer(tmp_path, read_only=True) as ck:
        # runtime knobs (dtype, remat, attention_impl) may change between runs
        ck.check_compatible({"model": {"hidden_size": 4, "depth": 2, "dtype": "bfloat16"}},
                            _abstract(state, sh))
        with pytest.raises(ValueError, match=r"another architecture[\s\S]*model.hidden_size: "
                                             r"checkpoint has 4, this run has 8"):
            ck.check_compatible({"model": {"hidden_size": 8, "depth": 2}})
        other = dict(state)
        other["params"] = {"w": jnp.zeros((8, 4)), "b": jnp.ones(4), "extra": jnp.ones(2)}
        with pytest.raises(ValueError) as err:
            ck.check_compatible(config, other)
        assert "params/w: checkpoint shape (16, 4), this run (8, 4)" in str(err.value)
        assert "params/extra: absent from the checkpoint" in str(err.value)
    assert sorted(os.walk(tmp_path)) == before  # read-only: nothing touched


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from tim_jax.training.checkpointing import Checkpointer
    ck = Checkpointer(sys.argv[1], every_steps=1, keep=5)
    big = lambda v: {"w%d" % i: jnp.full((4, 2**20), v, jnp.float32) for i in range(24)}  # 384 MB
    ck.save(1, big(1.0)); ck.wait()
    print("committed 1", flush=True)
    ck.save(2, big(2.0))
    print("in flight", ck.is_saving(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_during_async_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, str(script), str(workdir)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "committed 1" in proc.stdout and "in flight True" in proc.stdout, proc.stdout
    ckdir = workdir / checkpointing.CHECKPOINT_SUBDIR
    names = os.listdir(ckdir)
    assert "1" in names and "2" not in names, names  # step 2 never committed (tmp dir at most)
    assert checkpointing.latest_step(workdir) == 1
    with Checkpointer(workdir, every_steps=1, keep=5) as ck:  # cleans the tmp dir up
        assert ck.all_steps() == [1]
        target = {f"w{i}": jax.ShapeDtypeStruct((4, 2**20), jnp.float32) for i in range(24)}
        restored = ck.restore(target)
        assert all(np.all(np.asarray(v) == 1.0) for v in restored.values())
        assert ck.save(2, {"w0": jnp.zeros(3)})  # the interrupted step can be written again
        ck.wait()
        assert ck.all_steps() == [1, 2]
    assert sorted(os.listdir(ckdir)) == ["1", "2"]


def test_export_ema_and_load(tmp_path):
    mesh = _mesh(8, 1)
    state, _ = _toy_state(mesh)
    state["ema_params"]["0.9999"] = {"w": jnp.full((16, 4), 2.0), "b": jnp.full(4, 3.0)}
    config = {"model": {"hidden_size": 4}}
    with Checkpointer(tmp_path / "run", every_steps=1) as ck:
        ck.save(3, state, config=config)
    with pytest.raises(ValueError, match=r"several EMA copies \['0.999', '0.9999'\]"):
        export.export_ema(tmp_path / "run", None, tmp_path / "out")
    out = export.export_ema(tmp_path / "run", 3, tmp_path / "out", decay="0.9999")
    params, info = export.load_ema(out)
    assert info == {"step": 3, "decay": "0.9999", "config": config}
    assert set(params) == {"w", "b"} and isinstance(params["w"], np.ndarray)
    assert np.all(params["w"] == 2.0) and np.all(params["b"] == 3.0)
    # straight onto a (2, 4) mesh
    sh = NamedSharding(_mesh(2, 4), P("fsdp", None))
    target = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sh),
              "b": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(sh.mesh, P()))}
    placed, _ = export.load_ema(out, target)
    assert placed["w"].sharding == sh and np.all(np.asarray(placed["w"]) == 2.0)
    with pytest.raises(ValueError, match="no checkpoint"):
        export.export_ema(tmp_path / "empty", None, tmp_path / "out2")
