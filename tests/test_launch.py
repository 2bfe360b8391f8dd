"""The launch/*.sh scripts: `bash -n` of each, and each one's --dry-run output.

A dry run prints every command a script would execute, one per line as "+ <shell words>",
and executes none of them; the tests parse those lines back into argv lists (shlex) and check
them: the train command line (``python -m tim_jax.train --config=... --workdir=...`` plus the
overrides, on every TPU worker with ``--worker=all``, with ``TIM_DISTRIBUTED=1``), the GPU
multi-node environment (coordinator address, process count and id; no srun/torchrun in the
command itself), and that no dry run needs gcloud, credentials or writes a file.
"""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh"))
SOURCED = {"common.sh", "tpu_env.sh"}  # helpers, sourced by the others
TPU_ENV = dict(PROJECT="my-proj", ZONE="europe-west4-b", TPU_NAME="tim-v5p-64", ACCELERATOR="v5p-64",
               RUNTIME_VERSION="v2-alpha-tpuv5")
TRAIN = ["python", "-m", "tim_jax.train"]


def _env(tmp_path, **extra):
    """A clean environment: no gcloud on PATH (a dry run must not need it), no cluster vars."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("gcloud", "srun", "torchrun", "nvidia-smi"):  # fail loudly if ever executed
        f = bin_dir / tool
        f.write_text(f"#!/bin/sh\necho 'EXECUTED {tool}' >&2\nexit 99\n")
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TIM_", "JAX_", "COORDINATOR", "NUM_NODES", "NODE_RANK",
                                "PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR", "DRY_RUN"))}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(tmp_path / "home")
    env.update(extra)
    return env


def _dry_run(tmp_path, script, *args, env=None, cwd=None):
    """Runs `launch/<script> args` (args should contain --dry-run); returns the printed argv lists."""
    before = set(os.listdir(cwd or tmp_path))
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd or tmp_path,
                          env=env or _env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "EXECUTED" not in proc.stderr, proc.stderr
    assert set(os.listdir(cwd or tmp_path)) == before  # wrote nothing
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines]


def _flag(argv, name):
    """Value of `--name value` or `--name=value` in argv."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def _gcloud_ssh(argv):
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    assert argv[5] == TPU_ENV["TPU_NAME"]
    assert _flag(argv, "--project") == TPU_ENV["PROJECT"] and _flag(argv, "--zone") == TPU_ENV["ZONE"]
    return _flag(argv, "--worker"), _flag(argv, "--command")


# ---- syntax ------------------------------------------------------------------------------------
def test_every_script_is_listed():
    for name in ("tpu_create.sh", "tpu_sync.sh", "tpu_setup.sh", "tpu_train.sh", "tpu_stop.sh",
                 "tpu_logs.sh", "tpu_delete.sh", "gpu_multinode.sh", "bench_gpu.sh", "test.sh"):
        assert name in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - SOURCED))
def test_every_runnable_script_documents_dry_run(script):
    text = (LAUNCH / script).read_text()
    assert "--dry-run" in text, script


# ---- TPU ---------------------------------------------------------------------------------------
def test_tpu_train_dry_run_is_the_train_cli_on_every_worker(tmp_path):
    env = _env(tmp_path, **TPU_ENV)
    cmds = _dry_run(tmp_path, "tpu_train.sh", "configs/c2i_xl2_256.py", "gs://bucket/tim/xl2",
                    "--config.train.num_steps=1000", "--dry-run", "--config.data.path=gs://b/my data",
                    env=env)
    assert len(cmds) == 1
    worker, remote = _gcloud_ssh(cmds[0])
    assert worker == "all"
    words = shlex.split(remote)
    assert "TIM_DISTRIBUTED=1" in words and "TIM_JAX_NO_REEXEC=1" in words
    i = words.index("python")
    assert words[i:i + 3] == TRAIN
    assert words[i + 3:i + 7] == ["--config=configs/c2i_xl2_256.py", "--workdir=gs://bucket/tim/xl2",
                                  "--config.train.num_steps=1000", "--config.data.path=gs://b/my data"]
    assert words[i - 1] == "nohup" and "~/tim_logs/train.pid" in remote
    assert ". ~/tim_venv/bin/activate" in remote and "cd ~/tim_jax" in remote


def test_tpu_train_needs_config_and_workdir(tmp_path):
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_train.sh"), "--dry-run", "configs/x.py"],
                          cwd=tmp_path, env=_env(tmp_path, **TPU_ENV), capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr and not proc.stdout


def test_tpu_scripts_need_project(tmp_path):
    proc = subprocess.run(["bash", str(LAUNCH / "tpu_create.sh"), "--dry-run"], cwd=tmp_path,
                          env=_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode != 0 and "set PROJECT" in proc.stderr and not proc.stdout


def test_tpu_create_and_delete_dry_run(tmp_path):
    env = _env(tmp_path, **TPU_ENV)
    [create] = _dry_run(tmp_path, "tpu_create.sh", "--spot", "--dry-run", env=env)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tim-v5p-64"]
    assert _flag(create, "--accelerator-type") == "v5p-64"
    assert _flag(create, "--version") == "v2-alpha-tpuv5" and create[-1] == "--spot"
    assert _flag(create, "--zone") == "europe-west4-b" and _flag(create, "--project") == "my-proj"
    [delete] = _dry_run(tmp_path, "tpu_delete.sh", "--dry-run", env=env)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "tim-v5p-64"]
    assert "--quiet" in delete


def test_tpu_sync_setup_stop_logs_dry_run(tmp_path):
    env = _env(tmp_path, **TPU_ENV)
    tar, scp, unpack = _dry_run(tmp_path, "tpu_sync.sh", "--dry-run", env=env)
    assert tar[:2] == ["sh", "-c"] and "git ls-files -z | tar --null -czf" in tar[2]
    tarball = scp[5]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and tarball in tar[2]
    assert not os.path.exists(tarball)  # the dry run made no tarball
    assert scp[6] == "tim-v5p-64:tim_jax_src.tar.gz" and _flag(scp, "--worker") == "all"
    worker, remote = _gcloud_ssh(unpack)
    assert worker == "all" and "tar -xzf ~/tim_jax_src.tar.gz -C ~/tim_jax" in remote

    [setup] = _dry_run(tmp_path, "tpu_setup.sh", "--dry-run", env=env)
    worker, remote = _gcloud_ssh(setup)
    assert worker == "all" and "pip install -q -e ~/tim_jax'[tpu]' gcsfs" in remote

    [stop] = _dry_run(tmp_path, "tpu_stop.sh", "--dry-run", env=dict(env, TIMEOUT="60"))
    worker, remote = _gcloud_ssh(stop)
    assert worker == "all" and "kill -TERM $pid" in remote and "seq 60" in remote

    [logs] = _dry_run(tmp_path, "tpu_logs.sh", "3", "--dry-run", env=env)
    worker, remote = _gcloud_ssh(logs)
    assert worker == "3" and remote.startswith("tail -n 100 -f ~/tim_logs/train_")


def test_dry_run_from_the_environment(tmp_path):
    env = _env(tmp_path, DRY_RUN="1", **TPU_ENV)
    [delete] = _dry_run(tmp_path, "tpu_delete.sh", env=env)
    assert delete[4] == "delete"


# ---- GPU ---------------------------------------------------------------------------------------
def _env_and_argv(argv):
    """`env A=1 B=2 cmd ...` -> ({A: 1, B: 2}, [cmd, ...])."""
    assert argv[0] == "env", argv
    env, i = {}, 1
    while "=" in argv[i] and not argv[i].startswith("-"):
        k, v = argv[i].split("=", 1)
        env[k] = v
        i += 1
    return env, argv[i:]


def test_gpu_multinode_without_scheduler_sets_the_coordinator(tmp_path):
    env = _env(tmp_path, COORDINATOR="10.0.0.1:12345", NUM_NODES="4", NODE_RANK="2")
    [cmd] = _dry_run(tmp_path, "gpu_multinode.sh", "--dry-run", "configs/c2i_b2_256.py", "/shared/runs/tim",
                     "--config.data.global_batch_size=1024", env=env)
    var, argv = _env_and_argv(cmd)
    assert var["TIM_DISTRIBUTED"] == "1" and var["TIM_JAX_NO_REEXEC"] == "1"
    assert var["JAX_COORDINATOR_ADDRESS"] == "10.0.0.1:12345"
    assert var["TIM_NUM_PROCESSES"] == "4" and var["TIM_PROCESS_ID"] == "2"
    assert argv == TRAIN + ["--config=configs/c2i_b2_256.py", "--workdir=/shared/runs/tim",
                            "--config.data.global_batch_size=1024"]
    assert not {"srun", "torchrun", "mpirun"} & set(cmd)


def test_gpu_multinode_under_slurm_leaves_the_cluster_to_jax(tmp_path):
    env = _env(tmp_path, SLURM_JOB_ID="1234")
    [cmd] = _dry_run(tmp_path, "gpu_multinode.sh", "configs/c2i_b2_256.py", "/shared/run", "--dry-run", env=env)
    var, argv = _env_and_argv(cmd)
    assert var["TIM_DISTRIBUTED"] == "1"
    assert not {"JAX_COORDINATOR_ADDRESS", "TIM_NUM_PROCESSES", "TIM_PROCESS_ID"} & set(var)
    assert argv[:3] == TRAIN


def test_gpu_multinode_names_the_missing_setting(tmp_path):
    env = _env(tmp_path, COORDINATOR="10.0.0.1:12345", NUM_NODES="2")
    proc = subprocess.run(["bash", str(LAUNCH / "gpu_multinode.sh"), "--dry-run", "c.py", "/w"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "NODE_RANK" in proc.stderr and not proc.stdout


def test_bench_gpu_dry_run(tmp_path):
    official = tmp_path / "TiM"
    official.mkdir()
    env = _env(tmp_path, OUT_DIR=str(tmp_path / "bench_out"))
    cmds = _dry_run(tmp_path, "bench_gpu.sh", str(official), "python3", "--rounds", "6", "--dry-run", env=env)
    assert cmds[0] == ["nvidia-smi", "-L"]
    assert len(cmds) == 3
    for cmd, (name, variant) in zip(cmds[1:], (("c2i_b4_256", ":synthetic"), ("c2i_s2_256", ""))):
        var, argv = _env_and_argv(cmd)
        assert var["TIM_JAX_NO_REEXEC"] == "1"
        assert argv[1:4] == ["-m", "tim_jax.bench", "official"]
        assert _flag(argv, "--config") == f"configs/{name}.py{variant}"
        assert _flag(argv, "--official-repo") == str(official)
        assert _flag(argv, "--json") == str(tmp_path / "bench_out" / f"official_{name}.json")
        assert argv[-2:] == ["--rounds", "6"]
    assert not (tmp_path / "bench_out").exists()


def test_test_sh_dry_run(tmp_path):
    env = _env(tmp_path, VIRTUAL_ENV=str(tmp_path / "venv"), TIM_JAX_TEST_WORKERS="1")
    cmds = _dry_run(tmp_path, "test.sh", "--dry-run", "-q", "tests/test_launch.py", env=env)
    assert cmds[-2] == ["python", "-m", "pip", "install", "-q", "-e", ".[test]"]
    var, argv = _env_and_argv(cmds[-1])
    assert "JAX_COMPILATION_CACHE_DIR" in var
    assert argv == ["python", "-m", "pytest", "-q", "tests/test_launch.py"]
    env["TIM_JAX_TEST_WORKERS"] = "3"   # test files in 3 worker processes (pytest-xdist)
    _, argv = _env_and_argv(_dry_run(tmp_path, "test.sh", "--dry-run", "tests/a.py", env=env)[-1])
    assert argv == ["python", "-m", "pytest", "-n", "3", "--dist", "loadfile", "tests/a.py"]
    _, argv = _env_and_argv(_dry_run(tmp_path, "test.sh", "--dry-run", "-n", "0", env=env)[-1])
    assert argv == ["python", "-m", "pytest", "-n", "0"]   # the caller's -n wins
    env.pop("TIM_JAX_TEST_WORKERS")   # default: min(4, CPUs, RAM GiB / 6), at least 1
    _, argv = _env_and_argv(_dry_run(tmp_path, "test.sh", "--dry-run", env=env)[-1])
    cpus = len(os.sched_getaffinity(0))
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    expect = max(1, min(4, cpus, int(mem_gib // 6)))
    assert argv[3:] == (["-n", str(expect), "--dist", "loadfile"] if expect > 1 else [])
