"""Resumable feature chunks of an evaluation run: ``DIR/chunks/steps{n}/{start:08d}.npz``.

The samples [0, N) of one sampler setting are cut into chunks of ``chunk_size`` consecutive
indices; chunk ``c`` covers [c K, min((c + 1) K, N)). Process ``p`` of ``P`` makes the chunks with
``c % P == p``. A chunk file holds ``pool`` (n, D) and ``logits`` (n, K) float32, ``labels`` (n,)
int32, ``indices`` (n,) int64, ``fingerprint`` (the run's settings digest), optionally ``images``
(n, H, W, 3) uint8; it is written to a temporary name and renamed, so a killed run leaves no
partial chunk. A rerun skips the valid chunks and makes the rest; the statistics are then
computed from every chunk in index order, so they do not depend on how often the run was
interrupted, nor on which process made which chunk.
"""
from __future__ import annotations

import dataclasses
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tim_jax import atomic_files
from tim_jax.evaluation.fid import GaussianMoments

__all__ = ["ChunkPlan", "chunk_dir", "chunk_path", "write_chunk", "read_chunk", "valid_chunk",
           "make_chunks", "missing_chunks", "wait_for_chunks", "collect"]

REQUIRED = ("pool", "logits", "labels", "indices", "fingerprint")


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """``num_samples`` samples in chunks of ``chunk_size`` consecutive indices."""

    num_samples: int
    chunk_size: int

    def __post_init__(self):
        if int(self.num_samples) < 1 or int(self.chunk_size) < 1:
            raise ValueError(f"num_samples and chunk_size must be >= 1, got {self.num_samples}, "
                             f"{self.chunk_size}")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def bounds(self, c: int) -> tuple[int, int]:
        """[start, stop) of chunk ``c``."""
        start = c * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)

    def all(self) -> list[tuple[int, int]]:
        return [self.bounds(c) for c in range(self.num_chunks)]

    def for_process(self, index: int, count: int) -> list[tuple[int, int]]:
        """The chunks process ``index`` of ``count`` makes (round robin)."""
        if not 0 <= int(index) < int(count):
            raise ValueError(f"process index {index} is not in [0, {count})")
        return [self.bounds(c) for c in range(int(index), self.num_chunks, int(count))]


def chunk_dir(out_dir, num_steps: int) -> Path:
    return Path(out_dir) / "chunks" / f"steps{int(num_steps)}"


def chunk_path(directory, start: int) -> Path:
    return Path(directory) / f"{int(start):08d}.npz"


def write_chunk(path, arrays: dict, fingerprint: str) -> Path:
    """Save ``arrays`` + ``fingerprint`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_files.save_npz(path, fingerprint=np.asarray(fingerprint), **arrays)
    return path


def read_chunk(path, fields=None) -> dict[str, np.ndarray]:
    """The arrays of a chunk file (``fields``: only these)."""
    with np.load(path, allow_pickle=False) as f:
        names = f.files if fields is None else fields
        return {k: f[k] for k in names}


def valid_chunk(path, fingerprint: str, start: int, stop: int, *, images: bool = False) -> bool:
    """True when ``path`` is a complete chunk of [start, stop) made with ``fingerprint`` (and
    holding ``images`` if asked). Unreadable or foreign files are not valid (they get remade)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            if not set(REQUIRED) <= names or (images and "images" not in names):
                return False
            if str(f["fingerprint"]) != fingerprint:
                return False
            idx = f["indices"]
            return idx.shape == (stop - start,) and bool(np.all(idx == np.arange(start, stop)))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def missing_chunks(directory, chunks, fingerprint: str, *, images: bool = False):
    """The (start, stop) of ``chunks`` without a valid file in ``directory``."""
    return [(a, b) for a, b in chunks
            if not valid_chunk(chunk_path(directory, a), fingerprint, a, b, images=images)]


def make_chunks(directory, chunks, make: Callable[[int, int], dict], fingerprint: str, *,
                images: bool = False, budget: int | None = None, progress=None) -> int:
    """Make every chunk of ``chunks`` that has no valid file: ``make(start, stop)`` returns the
    arrays (``pool``, ``logits``, ``labels``, ``indices``[, ``images``]). Stops after ``budget``
    chunks when given. ``progress.update(n)`` is called per chunk (n samples) if given.
    Returns the number of chunks made."""
    made = 0
    for start, stop in missing_chunks(directory, chunks, fingerprint, images=images):
        if budget is not None and made >= budget:
            break
        arrays = make(start, stop)
        n = stop - start
        for k in ("pool", "logits", "labels", "indices"):
            if k not in arrays or len(arrays[k]) != n:
                raise ValueError(f"chunk [{start}, {stop}): make() returned no {n} rows of {k!r}")
        write_chunk(chunk_path(directory, start), arrays, fingerprint)
        made += 1
        if progress is not None:
            progress.update(n)
    return made


def wait_for_chunks(directory, plan: ChunkPlan, fingerprint: str, *, timeout: float,
                    poll: float = 10.0, images: bool = False, log=print) -> None:
    """Block until every chunk of ``plan`` is valid (other processes make theirs), or raise
    TimeoutError naming how many are missing after ``timeout`` seconds."""
    deadline = time.monotonic() + float(timeout)
    said = None
    while True:
        missing = missing_chunks(directory, plan.all(), fingerprint, images=images)
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{directory}: {len(missing)} of {plan.num_chunks} chunks still "
                               f"missing after {timeout:.0f} s (first: {missing[0]}); are the "
                               "other processes running? Rerun to continue.")
        if said != len(missing):
            log(f"waiting for {len(missing)} chunk(s) of other processes in {directory}")
            said = len(missing)
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())) or poll)


def _iter_chunks(directory, plan: ChunkPlan, fields) -> Iterator[dict]:
    for start, stop in plan.all():
        yield read_chunk(chunk_path(directory, start), fields)


def collect(directory, plan: ChunkPlan, fingerprint: str, *, logits: bool = True,
            labels: bool = False) -> dict:
    """Statistics of a complete chunk directory, in index order.

    Returns ``moments`` (:class:`GaussianMoments` of ``pool``), ``logits`` (N, K) float32 when
    ``logits``, ``labels`` (N,) int32 when ``labels``. FileNotFoundError / ValueError name the
    first missing or foreign chunk."""
    missing = missing_chunks(directory, plan.all(), fingerprint)
    if missing:
        raise FileNotFoundError(f"{directory}: {len(missing)} chunk(s) missing or made with other "
                                f"settings, first {chunk_path(directory, missing[0][0]).name}")
    fields = ["pool"] + (["logits"] if logits else []) + (["labels"] if labels else [])
    moments, all_logits, all_labels = None, [], []
    for arrays in _iter_chunks(directory, plan, fields):
        pool = arrays["pool"]
        if moments is None:
            moments = GaussianMoments.empty(pool.shape[1])
        moments = moments.update(pool)
        if logits:
            all_logits.append(arrays["logits"])
        if labels:
            all_labels.append(arrays["labels"])
    out = {"moments": moments}
    if logits:
        out["logits"] = np.concatenate(all_logits)
    if labels:
        out["labels"] = np.concatenate(all_labels)
    return out


def collect_images(directory, plan: ChunkPlan) -> np.ndarray:
    """All ``images`` (N, H, W, 3) uint8 of a complete chunk directory made with images."""
    return np.concatenate([c["images"] for c in _iter_chunks(directory, plan, ["images"])])
