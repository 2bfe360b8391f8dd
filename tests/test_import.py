"""The test session's devices, and that the package's public entry points import."""
import importlib

import jax
import pytest


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("module", ["tim_jax.train", "tim_jax.convert", "tim_jax.parity",
                                    "tim_jax.training.export", "tim_jax.demo.cli", "tim_jax.sample", "tim_jax.evaluate", "tim_jax.prepare",
                                    "tim_jax.bench.cli"])
def test_cli_modules_import_and_have_main(module):
    assert callable(importlib.import_module(module).main)


def test_no_import_cycles_between_subpackages():
    """Importing each subpackage on its own works (an import cycle fails here first)."""
    import subprocess
    import sys

    for pkg in ("tim_jax.models", "tim_jax.training", "tim_jax.interop", "tim_jax.data",
                "tim_jax.encoders", "tim_jax.evaluation", "tim_jax.objective", "tim_jax.sampler"):
        proc = subprocess.run([sys.executable, "-c", f"import {pkg}"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, (pkg, proc.stderr[-2000:])
