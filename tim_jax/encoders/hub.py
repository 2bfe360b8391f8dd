"""Reading a Hub model folder as downloaded: ``config.json`` plus safetensors weights.

A diffusers folder holds ``diffusion_pytorch_model.safetensors``, a transformers folder
``model.safetensors`` (or shards listed in ``*.safetensors.index.json``). Tensors come back as
numpy arrays in torch's layouts (conv (out, in, kh, kw), Linear (out, in)); each port maps them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def read_config(folder) -> dict:
    """The folder's ``config.json`` as a dict; FileNotFoundError naming the folder."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (expected a Hub folder as "
                                "written by save_pretrained)")
    return json.loads(path.read_text())


def weight_files(folder) -> list[Path]:
    """The safetensors files of ``folder``: a single file or the shards of an index."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are absent: {missing}")
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder} has no weights: expected one of {list(WEIGHT_FILES)} "
                            "(or a sharded *.safetensors.index.json)")


def read_weights(folder) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors files, by name, as float32/int numpy arrays
    (bf16/fp16 tensors are widened to float32)."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for path in weight_files(folder):
        try:
            tensors = load_file(str(path))
        except Exception as e:  # bf16 tensors: numpy has no bfloat16, go through ml_dtypes
            if "bfloat16" not in str(e).lower() and "bf16" not in str(e).lower():
                raise
            tensors = _load_bf16(path)
        for k, v in tensors.items():
            out[k] = v.astype(np.float32) if v.dtype.kind == "f" and v.dtype != np.float32 else v
    return out


def _load_bf16(path: Path) -> dict[str, np.ndarray]:
    """safetensors with bf16 tensors, read through the header (numpy has no bf16 dtype)."""
    import ml_dtypes

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
              "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8,
              "BOOL": np.bool_}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[8 + n + start:8 + n + end]
        out[name] = np.frombuffer(buf, dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out
