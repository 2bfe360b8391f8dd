"""Reading official TiM checkpoint files into flat ``{official key: np.ndarray}`` state dicts.

Official checkpoints (github WZDTHU/TiM) are flat PyTorch ``state_dict``s, shipped as
``.safetensors`` (C2I) or ``.bin`` (T2I). :func:`load_official_state_dict` reads them without
executing pickled code: safetensors through ``safetensors.numpy``; ``.bin``/``.pth``/``.pt``/
``.ckpt`` only through ``torch.load(weights_only=True)`` (torch is the optional
``tim-jax[torch]`` extra). :func:`normalize_state_dict` strips the usual wrappers (``module.``
from DDP/FSDP, ``_orig_mod.`` from ``torch.compile``, nested ``ema`` / ``model`` /
``state_dict`` sub-dicts).
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["load_official_state_dict", "normalize_state_dict"]

TORCH_EXTS = (".bin", ".pth", ".pt", ".ckpt")
SAFETENSORS_EXTS = (".safetensors",)
# Per-key prefixes that wrappers add; never the start of an official key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Sub-dict names, in order of preference, that hold the raw (online) weights / the EMA weights.
RAW_SUBDICTS = ("model", "state_dict", "module", "model_state_dict", "net", "network")
EMA_SUBDICTS = ("ema", "ema_model", "model_ema", "ema_state_dict", "state_dict_ema")


def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or type(v).__name__ in ("Tensor", "Parameter")


def _torch_load(path: pathlib.Path) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"{path}: reading a PyTorch pickle ({path.suffix}) needs torch, which is not installed. "
            "Install the extra (`pip install 'tim-jax[torch]'`) or convert the file to .safetensors "
            "first (safetensors.torch.save_file(torch.load(p, weights_only=True), out))."
        ) from e
    try:
        # weights_only=True: tensors and plain containers only; never unpickles code.
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for bad files)
        raise ValueError(
            f"{path}: torch.load(weights_only=True) failed: {type(e).__name__}: {e}. The file is "
            "corrupt, is not a PyTorch checkpoint, or holds objects other than tensors."
        ) from e


def _to_numpy_tree(obj: Any) -> Any:
    """torch tensors -> numpy arrays (bf16 -> float32, since numpy lacks bf16); containers kept."""
    if isinstance(obj, Mapping):
        return {k: _to_numpy_tree(v) for k, v in obj.items()}
    if type(obj).__name__ in ("Tensor", "Parameter"):
        t = obj.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return obj


def load_official_state_dict(
    path: str | os.PathLike, *, ema: bool | None = None
) -> dict[str, np.ndarray]:
    """Read an official checkpoint file into a flat ``{official key: np.ndarray}`` dict.

    Args:
      path: ``.safetensors`` (read with safetensors.numpy, no torch needed) or ``.bin``/``.pth``/
        ``.pt``/``.ckpt`` (read with ``torch.load(weights_only=True)``; needs the torch extra).
      ema: which weights to take from a wrapper holding both raw and EMA weights (see
        :func:`normalize_state_dict`); ignored for a flat state dict such as the released files.
    Returns:
      the normalised flat state dict, arrays in their stored dtype (bf16 stored in a torch pickle is
      widened to float32).
    Raises:
      ValueError: missing/corrupt file, unsupported extension, torch missing for a pickle.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"official checkpoint {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTS:
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(path))
        except Exception as e:  # noqa: BLE001  (SafetensorError and friends)
            raise ValueError(
                f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                "corrupt or truncated"
            ) from e
    elif suffix in TORCH_EXTS:
        raw = _to_numpy_tree(_torch_load(path))
    else:
        raise ValueError(
            f"{path}: unsupported checkpoint extension {suffix!r}; allowed: "
            f"{SAFETENSORS_EXTS + TORCH_EXTS}"
        )
    return normalize_state_dict(raw, ema=ema, source=str(path))


def _strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for pre in WRAPPER_PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        if k in out:
            raise ValueError(f"two checkpoint keys map to {k!r} after removing wrapper prefixes")
        out[k] = v
    return out


def normalize_state_dict(
    raw: Mapping[str, Any], *, ema: bool | None = None, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
    """Unwrap a loaded checkpoint object into a flat official state dict.

    Accepted layouts: a flat ``{key: array}`` dict (the released files); keys prefixed by
    ``module.`` (DDP/FSDP), ``_orig_mod.`` (torch.compile) or ``model.`` (any order/repetition); a
    dict holding the state dict under a sub-key -- raw weights under one of
    ``model``/``state_dict``/``module``/``model_state_dict``/``net``/``network``, EMA weights under
    ``ema``/``ema_model``/``model_ema``/``ema_state_dict``/``state_dict_ema`` -- with non-array
    entries (step, optimizer, ...) ignored.

    Args:
      ema: ``True`` takes the EMA sub-dict (error if absent); ``False`` takes the raw sub-dict
        (error if absent); ``None`` (default) takes the raw weights where both exist and the only
        one present otherwise. Flat state dicts are returned whatever ``ema`` says.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(raw).__name__}")
    arrays = {k: v for k, v in raw.items() if _is_array(v)}
    subs = {k: v for k, v in raw.items() if isinstance(v, Mapping) and v}
    if arrays and not any(k in subs for k in RAW_SUBDICTS + EMA_SUBDICTS):
        # a flat state dict (official keys are dotted paths, never a bare 'model'/'ema')
        return _strip_prefixes({str(k): np.asarray(v) for k, v in arrays.items()})
    ema_keys = [k for k in EMA_SUBDICTS if k in subs]
    raw_keys = [k for k in RAW_SUBDICTS if k in subs]
    if ema is True:
        inner = subs[raw_keys[0]] if raw_keys else {}
        if not ema_keys and any(isinstance(inner.get(k), Mapping) for k in EMA_SUBDICTS):
            # a generic container ({'state_dict': {'model': ..., 'ema': ...}}): look inside
            return normalize_state_dict(inner, ema=True, source=f"{source}[{raw_keys[0]!r}]")
        if not ema_keys:
            raise ValueError(
                f"{source}: ema=True but no EMA sub-dict ({'/'.join(EMA_SUBDICTS)}) found; top-level "
                f"keys: {sorted(map(str, raw))[:20]}"
            )
        pick = ema_keys[0]
    elif ema is False:
        if not raw_keys:
            raise ValueError(
                f"{source}: ema=False but no raw-weights sub-dict ({'/'.join(RAW_SUBDICTS)}) found; "
                f"top-level keys: {sorted(map(str, raw))[:20]}"
                + (" (an EMA sub-dict exists: pass ema=True / --ema)" if ema_keys else "")
            )
        pick = raw_keys[0]
    else:
        candidates = raw_keys + ema_keys
        if not candidates:  # (arrays are absent here, else the flat branch returned)
            raise ValueError(
                f"{source}: no state dict found: neither flat tensors nor a known sub-dict "
                f"({'/'.join(RAW_SUBDICTS + EMA_SUBDICTS)}); top-level keys: {sorted(map(str, raw))[:20]}"
            )
        pick = candidates[0]
    return normalize_state_dict(subs[pick], ema=ema, source=f"{source}[{pick!r}]")
