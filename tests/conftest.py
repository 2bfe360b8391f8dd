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
PARITY_DIR = REPO_ROOT / "tests" / "fixtures" / "parity"


def parity_path(name: str) -> pathlib.Path:
    """Path of one parity fixture folder (committed under tests/fixtures/parity); a missing
    folder fails the test: the parity claim must be tested from every clone."""
    path = PARITY_DIR / name
    if not path.is_dir():
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return path


@pytest.fixture(params=[True, False], ids=["cpu_layouts", "plain_path"])
def layouts(request):
    """Runs a test with the XLA:CPU layouts (tim_jax.models.cpu_layouts) on and off: the CPU
    path and the GPU/TPU path, both on this CPU."""
    from tim_jax.models.cpu_layouts import use_cpu_layouts

    with use_cpu_layouts(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tpu" in item.keywords and backend != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))
