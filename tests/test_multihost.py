"""Several JAX processes on one CPU machine run the real train CLI like one process does.

Two local processes (``TIM_DISTRIBUTED=1``, a free localhost port as coordinator, 2 fake CPU
devices each: one 4-device ``data`` mesh, gloo collectives) run ``python -m tim_jax.train`` on
configs/debug_cpu.py; their losses (metrics.jsonl, written by process 0) are compared with a
single-process run on 4 fake devices (no ``jax.distributed``) over the same global batches:

  * default run: records (``data.source="arrayrecord"``, written here with
    tim_jax.data.records), 2 processes x 2 steps, no kill; and the data contract behind it,
    in-process: the process batches, concatenated in process order, are the one-process batch;
  * slow (``-m slow``), per source (synthetic, records): the two processes save, are both
    SIGKILLed right after the step-2 checkpoint is committed (the pause is injected from the
    test by wrapping ``Checkpointer.save``, as tests/test_train_cli.py does), are relaunched
    with the same command, resume, and steps 1-6 match the uninterrupted one-process run.

Tolerance: the global batches, rngs and forward passes are the same, but the cross-device sums
(gradient all-reduce, metric means) run as gloo all-reduces between the processes instead of
XLA:CPU's in-process reduction, in another order; measured: losses equal to the last bit or
1 ulp over 6 steps. Metrics must agree to rtol 1e-6 (about 8 float32 ulps); a wrong data
position or rng on resume changes them by ~1e-2. Every subprocess has a watchdog, so a hung
collective fails the test instead of hanging the run.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tim_jax.data import pipeline, records
from tim_jax.training import checkpointing

import train_runs  # tests/train_runs.py

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-6, 1e-7          # metrics: multi-process vs one process (see module docstring)
TIMING_KEYS = ("img_per_s", "s_per_step")
FAST_COMPILE = "--xla_backend_optimization_level=0"   # faster compiles (see conftest), both sides
NUM_RECORDS = 40                 # 5 global batches of 8 per epoch: 6 steps cross an epoch
TIMEOUT_S = 900                  # watchdog per launch (a compile takes ~1 min on 2 busy cores)

# A fault injected from the test, not from the training loop: on every process, the first
# periodic save waits for its commit, prints the marker, then sleeps until the SIGKILL.
_PAUSE_AFTER_FIRST_SAVE = train_runs.pause_after_first_save("test: paused after committed checkpoint",
                                                        sleep_s=3600)


# ---- inputs ------------------------------------------------------------------------------------
def _write_records(directory: Path, n: int = NUM_RECORDS) -> str:
    """A prepared record directory (tim_jax.data.records format) of n 8x8x4 latents, labels 0-9."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    blobs, rec = [], None
    for i in range(n):
        lat = rng.standard_normal((8, 8, 4)).astype(np.float16)
        rec = {"latent": lat, "latent_flip": np.ascontiguousarray(lat[:, ::-1]), "label": i % 10,
               "index": i, "key": f"r{i:03d}"}
        blobs.append(records.encode_record(rec))
    shards = []
    for s, (a, b) in enumerate([(0, n // 2), (n // 2, n)]):
        name = records.shard_file_name(s, 2)
        records.write_shard(str(directory / name), blobs[a:b])
        shards.append({"file": name, "num_records": b - a})
    records.write_manifest(str(directory), {
        "num_records": n, "shards": shards, "native": False, "latent_shape": [8, 8, 4],
        "fields": {k: records.field_spec(v) for k, v in rec.items()}, "num_classes": 10,
        "vae": {"name": "test"}})
    return str(directory)


def _source_args(source: str, tmp_path: Path) -> list[str]:
    if source == "synthetic":
        return []
    path = _write_records(tmp_path / "records")
    return ["--config.data.source=arrayrecord", f"--config.data.path={path}",
            "--config.data.use_repa_target=False"]


def _args(num_steps: int, source_args) -> list[str]:
    return ["--config", "configs/debug_cpu.py", f"--config.train.num_steps={num_steps}",
            "--config.train.log_every=1", "--config.ckpt.every_steps=2",
            "--config.log.tensorboard=False", *source_args]


# ---- processes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of every CLI run. The compilation cache is on: the one-process runs use it,
    and the CLI must turn it off for the multi-process ones (see maybe_initialize_distributed)."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("TIM_", "GLIBC_TUNABLES", "XLA_FLAGS", "JAX_COORDINATOR"))}
    e.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR") or
             str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LIVE: list = []  # groups started by the current test; killed when it ends, pass or fail


@pytest.fixture(autouse=True)
def _kill_leftovers():
    yield
    while _LIVE:
        _LIVE.pop().kill()


class _Group:
    """Processes of one launch, each logging (stdout + stderr) to its own file, each killed by
    a watchdog after ``timeout`` seconds."""

    def __init__(self, cmds_envs, log_prefix: Path, timeout: float = TIMEOUT_S):
        _LIVE.append(self)
        self.logs = [Path(f"{log_prefix}.p{i}.log") for i in range(len(cmds_envs))]
        self.procs, self.dogs = [], []
        for (cmd, e), log in zip(cmds_envs, self.logs):
            with open(log, "w") as f:
                p = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=f, stderr=subprocess.STDOUT, text=True)
            dog = threading.Timer(timeout, p.kill)
            dog.start()
            self.procs.append(p)
            self.dogs.append(dog)

    def tails(self, n: int = 4000) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text()[-n:]}" for log in self.logs)

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=60)
        for d in self.dogs:
            d.cancel()

    def wait_for(self, marker: str):
        """Until every process printed ``marker``; fails if one exits first."""
        while True:
            if all(marker in log.read_text() for log in self.logs):
                return
            if any(p.poll() is not None for p in self.procs):
                self.kill()
                raise AssertionError(f"a process exited before printing {marker!r}:\n{self.tails()}")
            time.sleep(0.5)

    def wait_ok(self):
        """Until all exit; the first failure kills the others (no waiting on a dead peer)."""
        while any(p.poll() is None for p in self.procs):
            if any(p.poll() not in (None, 0) for p in self.procs):
                break
            time.sleep(0.5)
        codes = [p.poll() for p in self.procs]
        self.kill()
        assert codes == [0] * len(self.procs), f"exit codes {codes}:\n{self.tails()}"


def _launch(env, workdir: Path, args, *, processes: int = 2, pause: bool = False) -> _Group:
    """``processes`` CLI processes over 4 fake CPU devices in all, as one distributed run."""
    port = _free_port()
    entry = ["-c", _PAUSE_AFTER_FIRST_SAVE] if pause else ["-m", "tim_jax.train"]
    cmds = []
    for i in range(processes):
        e = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes} "
                                f"{FAST_COMPILE}",
                 TIM_DISTRIBUTED="1", TIM_NUM_PROCESSES=str(processes), TIM_PROCESS_ID=str(i),
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")  # (jax's default: [::]:port)
        cmds.append(([sys.executable, *entry, *args, "--workdir", str(workdir)], e))
    tag = "pause" if pause else "run"
    return _Group(cmds, workdir.parent / f"{workdir.name}.{tag}", timeout=TIMEOUT_S)


def _single(env, workdir: Path, args) -> _Group:
    """The reference: one process, 4 fake CPU devices, no jax.distributed (started, not awaited:
    it runs beside the multi-process launch, whose compiles leave a core idle at times)."""
    e = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
    return _Group([([sys.executable, "-m", "tim_jax.train", *args, "--workdir", str(workdir)], e)],
                  workdir.parent / f"{workdir.name}.single")


def _records(workdir: Path):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _assert_same_metrics(got, want):
    """Per step, every logged value but the timings: rtol 1e-6 (see the module docstring)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    worst = 0.0
    for g, w in zip(got, want):
        keys = sorted(k for k in w if k not in TIMING_KEYS)
        assert sorted(k for k in g if k not in TIMING_KEYS) == keys
        a, b = np.array([g[k] for k in keys], np.float64), np.array([w[k] for k in keys], np.float64)
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"step {w['step']}: {keys}")
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30))))
    return worst


# ---- the data contract (in-process, no devices) ------------------------------------------------
def _debug_config(**data):
    from configs import debug_cpu

    config = debug_cpu.get_config()
    for k, v in data.items():
        setattr(config.data, k, v)
    return config


@pytest.mark.parametrize("source", ["synthetic",
                                    "arrayrecord"])
def test_process_batches_are_blocks_of_the_one_process_batch(source, tmp_path):
    if source == "synthetic":
        config = _debug_config()
    else:
        config = _debug_config(source="arrayrecord", path=_write_records(tmp_path / "rec"),
                               use_repa_target=False)
    whole = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    parts = [pipeline.make_train_iterator(config, process_index=p, process_count=2) for p in range(2)]
    for _ in range(6):  # crosses an epoch of the records
        want = next(whole)
        got = [next(it) for it in parts]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], err_msg=key)


# ---- end to end: the real CLI ------------------------------------------------------------------
def test_two_processes_train_like_one(env, tmp_path):
    """Default run: 2 processes x 2 steps on records, no kill: same losses as one process."""
    args = _args(2, _source_args("arrayrecord", tmp_path))
    reference, workdir = tmp_path / "single", tmp_path / "multi"
    single = _single(env, reference, args)
    group = _launch(env, workdir, args)
    group.wait_ok()
    single.wait_ok()
    log0 = group.logs[0].read_text()
    assert "mesh {'data': 4, 'fsdp': 1}" in log0 and "checkpoint committed: step 2" in log0
    assert "[p1] INFO" not in group.logs[1].read_text()  # process 1 logs warnings only
    got, want = _records(workdir), _records(reference)
    assert [r["step"] for r in got] == [1, 2]
    _assert_same_metrics(got, want)
    data = sorted(os.listdir(workdir / checkpointing.CHECKPOINT_SUBDIR / "2" / "data"))
    assert [d for d in data if d.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["synthetic",
                                    "arrayrecord"])
def test_two_processes_killed_after_a_checkpoint_resume_like_one(env, tmp_path, source):
    args = _args(6, _source_args(source, tmp_path))
    reference, workdir = tmp_path / "single", tmp_path / "multi"
    single = _single(env, reference, args)

    group = _launch(env, workdir, args, pause=True)
    try:
        group.wait_for("test: paused after committed checkpoint 2")
    finally:
        group.kill()  # SIGKILL both
    single.wait_ok()
    assert [p.returncode for p in group.procs] == [-signal.SIGKILL] * 2
    assert checkpointing.latest_step(str(workdir)) == 2
    assert [r["step"] for r in _records(workdir)] == [1, 2]

    resumed = _launch(env, workdir, args)  # relaunch both with the same command
    resumed.wait_ok()
    log0 = resumed.logs[0].read_text()
    assert "resumed from" in log0 and "at step 2" in log0, log0[-3000:]
    got, want = _records(workdir), _records(reference)
    assert [r["step"] for r in got] == list(range(1, 7))
    worst = _assert_same_metrics(got, want)
    print(f"{source}: worst relative metric difference multi-process vs one process: {worst:.3g}")
    assert checkpointing.latest_step(str(workdir)) == 6
