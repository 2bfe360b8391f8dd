"""Test-session setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""
import os
import pathlib

# LLVM optimisation level 0 for every program the tests compile (here and in subprocesses that
# inherit XLA_FLAGS): compiling dominates the suite and runs ~1.5x faster so; comparisons within
# a test use the same flags on both sides, and fixture tolerances are unaffected. An opt level
# already in XLA_FLAGS wins.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()   # (xdist workers inherit it)
          if not f.startswith("--xla_force_host_platform_device_count=")]
if not any(f.startswith("--xla_backend_optimization_level=") for f in _flags):
    _flags.append(FAST_COMPILE_FLAG)
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    # one persistent-cache folder per test worker (and its subprocesses): jax writes entries in
    # place, so two processes compiling the same program could read a half-written file
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])

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
