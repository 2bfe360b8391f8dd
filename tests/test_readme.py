"""Every command and code block of README.md runs, so none can rot.

* The quick start is the two documented lines, and the second is what CI runs.
* Every ``python -m tim_jax.<module>`` command names a CLI whose ``--help`` works, and every
  option it uses is one that CLI accepts.
* The commands run: verbatim where they are cheap (training the debug config, the EMA export,
  the parity tool on the committed fixtures, the official-checkpoint import and export), and
  with the substitutions in ``_SUBSTITUTIONS`` where the README names a user's own file or a
  full-size run (the official checkpoint -> the c2i_tiny fixture; the benchmark -> one step of
  a shallower B/4). The quick start's demo runs as ``--quick`` in tests/test_demo.py (the
  full demo takes about 10 minutes).
* The Python blocks run in order in one namespace.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# README text -> what the test runs instead, for commands that need a user's file or hours.
_SUBSTITUTIONS = [
    ("--official model.safetensors --preset c2i_xl2_256",
     f"--official {REPO}/tests/fixtures/parity/c2i_tiny/model.safetensors --preset c2i_tiny"),
    ("--vae sd-vae-ft-ema", f"--vae {REPO}/tests/fixtures/parity/sd_vae_tiny"),
    ("--labels 207,360,387,974", "--labels 1,2,3,4"),            # c2i_tiny has 10 classes
    ("--steps 1,2,4,8 --cfg 1.0 --size 256x256", "--steps 1,2 --size 32x32"),
    ("--config.data.global_batch_size=16",
     "--config.data.global_batch_size=2 --config.model.depth=4 --steps 1 --warmup 0"),
]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(line)
    return out


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines == ["python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
                     "python -m tim_jax.demo", "bash launch/test.sh"]
    assert "bash launch/test.sh" in (REPO / ".ci" / "run").read_text()


def _tim_commands():
    return [c for c in _commands() if c.startswith("python -m tim_jax.")]


@pytest.mark.parametrize("command", _tim_commands())
def test_readme_command_runs(command, tmp_path):
    """Each command, with the documented substitutions, exits 0 in a scratch directory that
    sees the repository's configs and fixtures."""
    command = _substituted(command)
    for name in ("configs", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TIM_JAX_NO_REEXEC="1")
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"   # faster compiles (see conftest)
    for needed in _needs(command):  # what the README runs before it (the training, the import)
        subprocess.run(_argv(_substituted(needed), tmp_path), cwd=tmp_path, env=env, check=True,
                       capture_output=True, timeout=600)
    proc = subprocess.run(_argv(command, tmp_path), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _substituted(command: str) -> str:
    for old, new in _SUBSTITUTIONS:
        command = command.replace(old, new)
    return command


def _needs(command: str) -> list[str]:
    """The README commands a command depends on: an export needs what it exports."""
    if command.startswith("python -m tim_jax.training.export "):
        src = command.split()[3]
        return [c for c in _tim_commands() if c.startswith("python -m tim_jax.train ")
                and c.endswith(f"--workdir {src}")]
    if "--export" in command or command.startswith("python -m tim_jax.sample "):
        return [c for c in _tim_commands() if "--official" in c]
    return []


def _argv(command: str, cwd: pathlib.Path) -> list[str]:
    out = []
    for a in shlex.split(command):
        if a == "python":
            out.append(sys.executable)
        elif "*" in a:
            out.extend(str(p) for p in sorted(cwd.glob(a.rstrip("/"))) if p.is_dir())
        else:
            out.append(a)
    return out


@pytest.mark.parametrize("module", sorted({c.split()[2] for c in _tim_commands()}))
def test_readme_cli_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), TIM_JAX_NO_REEXEC="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in (proc.stdout + proc.stderr).lower() or "--" in proc.stdout


def test_readme_python_blocks_run(monkeypatch):
    monkeypatch.chdir(REPO)          # the blocks use paths relative to the repository root
    namespace: dict = {}
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["F"].shape == (2, 32, 32, 4)
    assert namespace["x0"].shape == (2, 32, 32, 4)
    assert namespace["out"].images.shape == (2, 16, 24, 3)
