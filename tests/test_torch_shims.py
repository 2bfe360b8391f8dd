"""tim_jax/interop/torch_shims.py: the shims that let the official PyTorch TiM import on a CPU-only
torch, shared by the parity tool's live mode and the benchmark's torch driver.

The driver runs under a torch-only interpreter, so every test here runs in a subprocess where
importing jax, flax or tim_jax raises: the shims (and the driver loading them by file location)
must not need them.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

INTEROP = REPO_ROOT / "tim_jax" / "interop"

# Makes `import jax` / `import flax` / `import tim_jax` fail, then loads a file by its location.
PRELUDE = textwrap.dedent(f"""
    import importlib.util, json, sys

    class _Forbid:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("jax", "jaxlib", "flax", "tim_jax"):
                raise ImportError(f"{{name}} must not be imported here")
            return None

    sys.meta_path.insert(0, _Forbid())

    def load(name, file):
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    DRIVER = {str(INTEROP / "torch_driver.py")!r}
    SHIMS = {str(INTEROP / "torch_shims.py")!r}
""")


def _run(body: str) -> dict:
    """Runs PRELUDE + body in a fresh interpreter; the body prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_driver_loads_the_shims_by_location_without_jax_or_tim_jax():
    got = _run("""
        driver = load("bench_torch_driver", DRIVER)
        shims = driver._load_torch_shims()
        stub = shims.install_flash_attn_stub()
        import flash_attn
        try:
            flash_attn.flash_attn_func(None, None, None)
            raised = ""
        except RuntimeError as e:
            raised = str(e)
        print(json.dumps({"file": shims.__file__, "stub": stub, "raised": raised,
                          "again": shims.install_flash_attn_stub(),
                          "forbidden": [m for m in sys.modules
                                        if m.split(".")[0] in ("jax", "flax", "tim_jax")]}))
    """)
    assert got["file"] == str(INTEROP / "torch_shims.py")
    assert got["stub"] and got["again"] and "attn_type='fused_attn'" in got["raised"]
    assert got["forbidden"] == []


@pytest.mark.torch
def test_torchvision_op_schemas_are_declared():
    pytest.importorskip("torch")
    got = _run("""
        import torch
        shims = load("shims", SHIMS)
        first = shims.declare_torchvision_ops()
        schemas = {n: str(getattr(torch.ops.torchvision, n).default._schema) for n in ("nms", "qnms")}
        print(json.dumps({"first": first, "again": shims.declare_torchvision_ops(),
                          "schemas": schemas}))
    """)
    assert got["again"] == []  # declared once, by this call or by an installed torchvision
    for name in ("nms", "qnms"):
        assert got["schemas"][name] == (
            f"torchvision::{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


@pytest.mark.torch
def test_official_timm_classes_import_through_the_shims():
    """`from timm... import SwiGLU, PatchEmbed` (what the official model files do) works: with
    timm installed (through the torchvision op shim when its torchvision cannot load its ops),
    else with the stand-ins, which compute timm's SwiGLU and PatchEmbed."""
    pytest.importorskip("torch")
    got = _run("""
        import torch
        shims = load("shims", SHIMS)
        done = shims.prepare_official_imports(timm_standins=True)
        from timm.layers.mlp import SwiGLU
        from timm.models.vision_transformer import PatchEmbed
        torch.manual_seed(0)
        glu = SwiGLU(in_features=6, hidden_features=5, out_features=4)
        x = torch.randn(2, 3, 6)
        want = glu.fc2(torch.nn.functional.silu(glu.fc1_g(x)) * glu.fc1_x(x))
        pe = PatchEmbed(8, 2, 3, 7, bias=True)
        img = torch.randn(1, 3, 8, 8)
        tokens = pe(img)
        want_tokens = torch.nn.functional.conv2d(img, pe.proj.weight, pe.proj.bias, stride=2)
        print(json.dumps({
            "done": done, "glu_err": float((glu(x) - want).abs().max()),
            "names": sorted(n for n, _ in glu.named_parameters()),
            "tokens_err": float((tokens - want_tokens.flatten(2).transpose(1, 2)).abs().max()),
            "flash_attn": "flash_attn" in sys.modules}))
    """)
    assert got["done"]["flash_attn_stub"] or got["flash_attn"]
    assert got["glu_err"] <= 1e-6 and got["tokens_err"] <= 1e-6
    assert got["names"] == ["fc1_g.bias", "fc1_g.weight", "fc1_x.bias", "fc1_x.weight",
                            "fc2.bias", "fc2.weight"]
