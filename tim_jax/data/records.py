"""The latent record format and the record directory (ArrayRecord shards + ``manifest.json``).

One record is one ``bytes`` object (one ArrayRecord entry), self-describing, no pickle / TF /
protobuf::

    b"TJLR"                      4-byte magic
    uint32 little-endian         n: byte length of the JSON header
    n bytes UTF-8 JSON           {"version": 1, "fields": [{"name", "kind", ...}, ...]}
    zero padding                 to an 8-byte boundary
    payload                      raw little-endian bytes of the array / str / bytes fields

Field kinds: ``array`` ({"dtype", "shape", "offset", "nbytes"}; numeric or bool numpy dtypes),
``int`` ({"value"}, in the header), ``str`` (UTF-8 in the payload), ``bytes`` (payload).
Offsets count from the payload start and are 8-byte aligned. :func:`decode_record` returns
arrays as read-only views into the record bytes (no copy).

Standard fields of a latent record (written by :mod:`tim_jax.data.prepare`): ``latent`` and
``latent_flip`` (h, w, c) float16 NHWC normalised latents of the crop and of its horizontal
mirror, ``label`` int (-1: none), ``index`` int (position in the input listing), ``key`` str,
optional ``image`` bytes (PNG/JPEG of the crop) and ``caption`` str. The directory layout and
the manifest schema are documented in ``docs/data-format.md``.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterable

import numpy as np

from tim_jax import atomic_files

MANIFEST = "manifest.json"
FORMAT = "tim_jax.latents"
VERSION = 1
SHARD_SUFFIX = ".array_record"
ARRAY_RECORD_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for Grain

_MAGIC = b"TJLR"
_RECORD_VERSION = 1
_ALIGN = 8


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def encode_record(fields: dict) -> bytes:
    """Serialise ``{name: value}`` (numpy array / scalar, int, str, bytes) into one record."""
    specs, chunks, offset = [], [], 0
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"record field names must be non-empty str, got {name!r}")
        spec: dict[str, Any] = {"name": name}
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"field {name!r}: bool values are not supported (use an int)")
        if isinstance(value, (int, np.integer)):
            spec.update(kind="int", value=int(value))
            specs.append(spec)
            continue
        if isinstance(value, str):
            kind, raw = "str", value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            kind, raw = "bytes", bytes(value)
        elif isinstance(value, (np.ndarray, np.generic)):
            arr = np.asarray(value)
            if arr.dtype.kind not in "biufc":
                raise TypeError(f"field {name!r}: unsupported array dtype {arr.dtype} "
                                "(numeric or bool only)")
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            kind, raw = "array", arr.tobytes()
            spec.update(dtype=arr.dtype.name, shape=list(arr.shape))
        else:
            raise TypeError(f"field {name!r}: unsupported value type {type(value).__name__} "
                            "(numpy array, int, str or bytes)")
        spec.update(kind=kind, offset=offset, nbytes=len(raw))
        specs.append(spec)
        chunks.append(raw + b"\0" * _pad(len(raw)))
        offset += len(raw) + _pad(len(raw))
    header = json.dumps({"version": _RECORD_VERSION, "fields": specs},
                        separators=(",", ":")).encode("utf-8")
    head = _MAGIC + struct.pack("<I", len(header)) + header
    return head + b"\0" * _pad(len(head)) + b"".join(chunks)


def decode_record(data: bytes) -> dict[str, np.ndarray | int | str | bytes]:
    """Inverse of :func:`encode_record`; arrays are read-only views into ``data``."""
    data = bytes(data) if not isinstance(data, bytes) else data
    if len(data) < 8 or data[:4] != _MAGIC:
        raise ValueError("not a tim_jax latent record (bad magic bytes)")
    (n,) = struct.unpack_from("<I", data, 4)
    if 8 + n > len(data):
        raise ValueError(f"truncated record: header of {n} bytes, record of {len(data)}")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    if header.get("version") != _RECORD_VERSION:
        raise ValueError(f"unsupported record version {header.get('version')!r}")
    base = 8 + n + _pad(8 + n)
    out: dict[str, Any] = {}
    for spec in header["fields"]:
        name, kind = spec["name"], spec["kind"]
        if kind == "int":
            out[name] = int(spec["value"])
            continue
        start, nbytes = base + int(spec["offset"]), int(spec["nbytes"])
        if start + nbytes > len(data):
            raise ValueError(f"truncated record: field {name!r} ends past the record")
        if kind == "array":
            dtype = np.dtype(spec["dtype"]).newbyteorder("<")
            shape = tuple(int(s) for s in spec["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if count * dtype.itemsize != nbytes:
                raise ValueError(f"field {name!r}: {nbytes} bytes do not hold {shape} {dtype}")
            out[name] = np.frombuffer(data, dtype, count, start).reshape(shape)
        elif kind == "str":
            out[name] = data[start:start + nbytes].decode("utf-8")
        elif kind == "bytes":
            out[name] = data[start:start + nbytes]
        else:
            raise ValueError(f"field {name!r}: unknown kind {kind!r}")
    return out


def field_spec(value) -> dict:
    """``{"kind", "dtype", "shape"}`` of one field value, as the manifest lists it."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return {"kind": "int", "dtype": "int64", "shape": []}
    if isinstance(value, str):
        return {"kind": "str", "dtype": "str", "shape": []}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"kind": "bytes", "dtype": "bytes", "shape": []}
    arr = np.asarray(value)
    return {"kind": "array", "dtype": arr.dtype.name, "shape": list(arr.shape)}


def merge_field_specs(a: dict, b: dict) -> dict:
    """Union of two ``{name: spec}`` maps; a dimension that differs becomes None (native)."""
    out = {k: dict(v) for k, v in a.items()}
    for name, spec in b.items():
        if name not in out:
            out[name] = dict(spec)
            continue
        old = out[name]
        if old["kind"] != spec["kind"] or old["dtype"] != spec["dtype"]:
            raise ValueError(f"field {name!r}: {old} vs {spec} across records")
        if len(old["shape"]) != len(spec["shape"]):
            raise ValueError(f"field {name!r}: rank differs across records")
        old["shape"] = [x if x == y else None for x, y in zip(old["shape"], spec["shape"])]
    return out


def shard_file_name(index: int, count: int, prefix: str = "latents") -> str:
    """``latents-00003-of-00064.array_record``."""
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def write_shard(path: str, records: Iterable[bytes], *,
                before_commit: Callable[[int], None] | None = None,
                options: str = ARRAY_RECORD_OPTIONS) -> int:
    """Write ``records`` to the ArrayRecord file ``path`` atomically; returns the count.

    Writes ``path + ".tmp"`` (replacing any stale one), closes it, calls ``before_commit(count)``
    (e.g. to write a side file that must exist whenever ``path`` does), then renames it to
    ``path``. On any error the ``.tmp`` file is removed and ``path`` is left untouched.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.fspath(path)
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    writer = ArrayRecordWriter(tmp, options)
    count = 0
    try:
        for blob in records:
            writer.write(blob)
            count += 1
        writer.close()
        writer = None
        if before_commit is not None:
            before_commit(count)
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already failing; the tmp file is removed below
                pass
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def write_json_atomic(path: str, obj, indent: int | None = 1) -> None:
    """``json.dump`` to a temporary file then rename: readers never see a partial file (the
    temporary name is per process: several processes may write the same file)."""
    atomic_files.write_text(path, json.dumps(obj, indent=indent,
                                             separators=None if indent else (",", ":")) + "\n")


def read_manifest(directory: str) -> dict:
    """The manifest of a record directory (format and version checked)."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest (is {directory!r} a record directory "
                                "made by `python -m tim_jax.prepare`, and did it finish?)")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: version {manifest.get('version')!r}, this tim_jax reads "
                         f"version {VERSION}")
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (``format`` / ``version`` filled in if absent)."""
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    write_json_atomic(os.path.join(os.fspath(directory), MANIFEST), manifest)


def shard_paths(directory: str) -> list[str]:
    """Paths of the shards, in the manifest's order (the global record order)."""
    directory = os.fspath(directory)
    return [os.path.join(directory, s["file"]) for s in read_manifest(directory)["shards"]]
