"""Test-session setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PARITY_DIR = REPO_ROOT.parent / "shared" / "parity"


def parity_path(name: str) -> pathlib.Path:
    """Path of one official-parity fixture folder; skips the test where it is absent."""
    path = PARITY_DIR / name
    if not path.is_dir():
        pytest.skip(f"parity fixtures {path} absent (they live in ../shared/parity beside the repo)")
    return path


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tpu" in item.keywords and backend != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))
