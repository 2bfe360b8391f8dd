"""Files written whole or not at all: the content goes to a hidden temporary file beside the
target (``.<stem>.tmp<pid><suffix>``: per process, so several processes may write the same
file, and skipped by ``*.npz``-style listings), which is then renamed onto the target, so a
reader never sees a half-written file."""
from __future__ import annotations

import os

import numpy as np

__all__ = ["write_text", "save_npy", "save_npz"]


def _temporary(path: str) -> str:
    folder, name = os.path.split(path)
    stem, suffix = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.tmp{os.getpid()}{suffix}")


def write_text(path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    path = os.fspath(path)
    tmp = _temporary(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_npy(path, array) -> None:
    """``np.save`` of ``array`` to ``path`` (ending in ``.npy``) atomically."""
    path = os.fspath(path)
    tmp = _temporary(path)
    np.save(tmp, array)
    os.replace(tmp, path)


def save_npz(path, **arrays) -> None:
    """``np.savez`` of ``arrays`` to ``path`` (ending in ``.npz``) atomically."""
    path = os.fspath(path)
    tmp = _temporary(path)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
