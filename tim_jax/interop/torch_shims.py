"""In-process shims that let the official PyTorch TiM code import and run on a CPU-only torch.

Used by the parity tool's live mode (:mod:`tim_jax.interop.parity_live`) and by the benchmark's
torch driver (:mod:`tim_jax.interop.torch_driver`), which a torch-only interpreter runs as a
script and which loads this file by its location. So this module imports nothing from tim_jax
and no JAX, and imports torch only inside the functions.

* :func:`install_flash_attn_stub`: the official model files import ``flash_attn`` (CUDA-only) at
  the top; a stub module whose functions raise stands in. Callers pass
  ``attn_type='fused_attn'`` (``F.scaled_dot_product_attention``), so it is never called.
* :func:`import_timm_cpu_safe`: timm imports torchvision, and a torchvision wheel built for CUDA
  beside a CPU torch fails at import (``torchvision::nms`` has no schema). Declaring the two op
  schemas its Python side registers fake kernels for (``nms`` and ``qnms``) lets the import
  succeed; no torchvision op is used by the official network.
* :func:`install_timm_standins`: where timm is not installed at all, minimal stand-ins for the
  two timm classes the official networks use (``SwiGLU``, ``PatchEmbed``), with timm's
  parameter names and forward.
"""
from __future__ import annotations

import importlib.util
import sys
import types

__all__ = [
    "TORCHVISION_OP_SCHEMAS",
    "install_flash_attn_stub",
    "declare_torchvision_ops",
    "import_timm_cpu_safe",
    "install_timm_standins",
    "prepare_official_imports",
]

#: the torchvision ops whose schemas torchvision's Python side needs at import
TORCHVISION_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_STUB_FLAG = "_tim_jax_stub"
_LIBRARY = []  # keeps the torch.library fragment (and so the declared schemas) alive


def _flash_attn_unavailable(*_, **__):
    raise RuntimeError("flash_attn is CUDA-only and is stubbed on this machine: call the official "
                       "network with attn_type='fused_attn'")


def install_flash_attn_stub() -> bool:
    """Put a stub ``flash_attn`` into ``sys.modules`` unless a real one is importable.
    Returns True when the stub is (now) in place."""
    if "flash_attn" in sys.modules:
        return bool(getattr(sys.modules["flash_attn"], _STUB_FLAG, False))
    if importlib.util.find_spec("flash_attn") is not None:
        return False
    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func = _flash_attn_unavailable
    mod.flash_attn_varlen_func = _flash_attn_unavailable
    setattr(mod, _STUB_FLAG, True)
    sys.modules["flash_attn"] = mod
    return True


def _op_declared(torch, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def declare_torchvision_ops() -> list[str]:
    """Declare the :data:`TORCHVISION_OP_SCHEMAS` that torch does not know yet (no kernels).
    Returns the names declared by this call."""
    import torch

    missing = [n for n in TORCHVISION_OP_SCHEMAS if not _op_declared(torch, n)]
    if missing:
        if not _LIBRARY:
            _LIBRARY.append(torch.library.Library("torchvision", "FRAGMENT"))
        for name in missing:
            _LIBRARY[0].define(TORCHVISION_OP_SCHEMAS[name])
    return missing


def _forget_modules(*roots: str) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in roots]:
        del sys.modules[name]


def import_timm_cpu_safe() -> bool:
    """``import timm``; when the installed torchvision cannot load its ops beside this torch,
    declare the op schemas and import again. Returns True when the shim was needed.

    Raises:
      ImportError: timm is not installed.
      RuntimeError: the import fails for another reason.
    """
    try:
        import timm  # noqa: F401

        return False
    except RuntimeError as err:  # a CUDA torchvision wheel beside a CPU torch
        if "torchvision::" not in str(err):
            raise
    _forget_modules("torchvision", "timm")  # half-imported modules
    declare_torchvision_ops()
    import timm  # noqa: F401,F811

    return True


def install_timm_standins() -> None:
    """Register stand-in ``timm`` modules with ``SwiGLU`` and ``PatchEmbed`` (timm's parameter
    names; forward ``fc2(norm(act(fc1_g(x)) * fc1_x(x)))`` and a stride-p conv flattened to
    tokens (B, N, D)). Other timm classes the official files import raise when built."""
    from torch import nn

    class SwiGLU(nn.Module):
        def __init__(self, in_features, hidden_features=None, out_features=None,
                     act_layer=nn.SiLU, norm_layer=None, bias=True, drop=0.0):
            super().__init__()
            hidden_features = hidden_features or in_features
            out_features = out_features or in_features
            self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias)
            self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias)
            self.act = act_layer()
            self.norm = norm_layer(hidden_features) if norm_layer else nn.Identity()
            self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

        def forward(self, x):
            return self.fc2(self.norm(self.act(self.fc1_g(x)) * self.fc1_x(x)))

    class PatchEmbed(nn.Module):
        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True,
                     strict_img_size=True, **_):
            super().__init__()
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class _Unused(nn.Module):
        def __init__(self, *_, **__):
            raise RuntimeError("this timm class is a tim_jax stand-in; install timm to use it")

    names = {"timm": {}, "timm.layers": {}, "timm.layers.mlp": {"SwiGLU": SwiGLU, "Mlp": _Unused},
             "timm.models": {},
             "timm.models.vision_transformer": {"PatchEmbed": PatchEmbed, "Attention": _Unused}}
    for name, attrs in names.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        setattr(mod, _STUB_FLAG, True)
        sys.modules[name] = mod


def prepare_official_imports(*, timm_standins: bool = True) -> dict:
    """Everything the official model files need before ``import tim.models...``: the flash_attn
    stub, then timm (through :func:`import_timm_cpu_safe`; where timm is not installed and
    ``timm_standins``, the stand-ins). Returns ``{"flash_attn_stub", "torchvision_shim",
    "timm_standins"}`` booleans saying what was needed."""
    done = {"flash_attn_stub": install_flash_attn_stub(), "torchvision_shim": False,
            "timm_standins": bool(getattr(sys.modules.get("timm"), _STUB_FLAG, False))}
    if done["timm_standins"]:
        return done
    if timm_standins and "timm" not in sys.modules and importlib.util.find_spec("timm") is None:
        install_timm_standins()
        done["timm_standins"] = True
    else:
        done["torchvision_shim"] = import_timm_cpu_safe()
    return done
