"""Global-batch schedules over records grouped by latent shape (aspect-ratio buckets).

A :class:`BatchSchedule` maps the global batch counter ``k = 0, 1, 2, ...`` to the ``G`` record
ids of global batch ``k`` (``G`` = ``data.global_batch_size``), all of one latent shape, so a
native-resolution run compiles the train step once per bucket shape. Records are grouped by
their exact latent shape ``(h, w, c)``; a directory of fixed-size records is one bucket.

Epoch ``e`` (every bucket's records used at most once):

  * bucket ``b`` (its ids ascending) is permuted by ``rng(seed, e, b)`` and cut into
    ``n_b // G`` global batches of ``G`` consecutive ids. The last ``n_b mod G`` ids of that
    permutation are **dropped for this epoch** (a different set each epoch, since the
    permutation changes); a bucket of fewer than ``G`` records is never used (reported by
    :attr:`BatchSchedule.unused_buckets`).
  * the ``K = sum_b n_b // G`` global batches of the epoch are visited in the order given by a
    permutation seeded by ``rng(seed, e)`` (the bucket order: which bucket step ``k`` uses).

Global batch ``k`` is batch ``k mod K`` of epoch ``k // K``. The schedule is a pure function of
(record shapes, ``G``, ``seed``, ``shuffle``): every process computes the same one, and an
iterator's position is just ``k`` (see :meth:`BatchSchedule.fingerprint` for what must match
on resume). ``shuffle=False`` keeps ids ascending and buckets in order. Random streams are
numpy's PCG64 (``np.random.default_rng``) seeded by integer tuples.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Sequence

import numpy as np

__all__ = ["group_by_shape", "BatchSchedule"]

_ORDER_TAG = 0x0B0C  # stream tags: keep the bucket order and record permutations independent
_RECORDS_TAG = 0x5EED


def group_by_shape(shapes: np.ndarray) -> tuple[list[tuple[int, ...]], list[np.ndarray]]:
    """Per-record shapes (N, 3) int -> (bucket shapes sorted, record ids of each, ascending)."""
    shapes = np.asarray(shapes)
    if shapes.ndim != 2 or len(shapes) == 0:
        raise ValueError(f"group_by_shape: expected per-record shapes (N, rank) with N >= 1, "
                         f"got an array of shape {shapes.shape}")
    uniq, inverse = np.unique(shapes.astype(np.int64), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    splits = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
    members = [m.astype(np.int64) for m in np.split(order, splits)]
    return [tuple(int(v) for v in s) for s in uniq], members


class BatchSchedule:
    """Which records form global batch ``k`` (see the module docstring for the rules).

    ``bucket_shapes``: one latent shape per bucket; ``members``: the record ids of each bucket
    (int arrays); ``global_batch_size``: G rows per global batch. Per-process rows are a
    contiguous block: process ``p`` of ``n`` takes rows ``[p G/n, (p+1) G/n)``.
    """

    def __init__(self, bucket_shapes: Sequence[Sequence[int]], members: Sequence[np.ndarray], *,
                 global_batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(bucket_shapes) != len(members) or not members:
            raise ValueError("BatchSchedule: need one member list per bucket shape (and >= 1 bucket)")
        g = int(global_batch_size)
        if g < 1:
            raise ValueError(f"BatchSchedule: global_batch_size must be >= 1, got {g}")
        self.bucket_shapes = [tuple(int(v) for v in s) for s in bucket_shapes]
        self.members = [np.asarray(m, np.int64) for m in members]
        self.global_batch_size = g
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_records = int(sum(len(m) for m in self.members))
        self.batches_per_bucket = np.array([len(m) // g for m in self.members], np.int64)
        self.batches_per_epoch = int(self.batches_per_bucket.sum())
        if self.batches_per_epoch == 0:
            largest = max(len(m) for m in self.members)
            raise ValueError(f"data.global_batch_size={g} is larger than every bucket (the largest "
                             f"holds {largest} records): no global batch can be formed")
        self._cache: dict = {}
        self._lock = threading.Lock()

    @classmethod
    def uniform(cls, num_records: int, shape: Sequence[int], **kw) -> "BatchSchedule":
        """One bucket holding records ``0 .. num_records - 1`` of one ``shape``."""
        return cls([shape], [np.arange(int(num_records), dtype=np.int64)], **kw)

    @classmethod
    def from_shapes(cls, shapes: np.ndarray, **kw) -> "BatchSchedule":
        """Buckets from per-record shapes (N, 3) (see :func:`group_by_shape`)."""
        return cls(*group_by_shape(shapes), **kw)

    # -- what is used -------------------------------------------------------------------------
    @property
    def unused_buckets(self) -> list[tuple[tuple[int, ...], int]]:
        """``(shape, records)`` of the buckets too small for one global batch (never used)."""
        return [(s, len(m)) for s, m, k in zip(self.bucket_shapes, self.members,
                                                self.batches_per_bucket) if k == 0]

    @property
    def records_per_epoch(self) -> int:
        """Records used per epoch (the rest are the per-epoch leftovers of each bucket)."""
        return self.batches_per_epoch * self.global_batch_size

    def fingerprint(self) -> dict:
        """What a resumed schedule must share with the saved one (JSON-able)."""
        table = np.concatenate([np.array([self.global_batch_size, self.seed, int(self.shuffle)]),
                                np.array(self.bucket_shapes, np.int64).reshape(-1)]
                               + self.members)
        digest = hashlib.sha1(table.astype("<i8").tobytes()).hexdigest()[:16]
        return {"num_records": self.num_records, "num_buckets": len(self.members),
                "global_batch_size": self.global_batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "schedule_sha1": digest}

    # -- the schedule -------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> dict:
        with self._lock:
            plan = self._cache.get(epoch)
            if plan is None:
                counts = self.batches_per_bucket
                order = np.repeat(np.arange(len(counts)), counts)
                if self.shuffle:
                    order = np.random.default_rng([self.seed, _ORDER_TAG, epoch]).permutation(order)
                # rank[j]: how many batches of bucket order[j] come before position j
                by_bucket = np.argsort(order, kind="stable")
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
                rank = np.empty_like(order)
                rank[by_bucket] = np.arange(len(order)) - starts[order[by_bucket]]
                plan = {"order": order, "rank": rank, "perms": {}}
                if len(self._cache) >= 2:  # keep this epoch and the one before
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = plan
            return plan

    def _bucket_ids(self, plan: dict, epoch: int, bucket: int) -> np.ndarray:
        with self._lock:
            ids = plan["perms"].get(bucket)
            if ids is None:
                ids = self.members[bucket]
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, _RECORDS_TAG, epoch, bucket])
                    ids = ids[rng.permutation(len(ids))]
                plan["perms"][bucket] = ids
            return ids

    def global_batch(self, k: int) -> tuple[int, int, np.ndarray]:
        """``(epoch, bucket, record ids (G,) int64)`` of global batch ``k`` (k >= 0)."""
        k = int(k)
        if k < 0:
            raise ValueError(f"BatchSchedule.global_batch: k must be >= 0, got {k}")
        epoch, j = divmod(k, self.batches_per_epoch)
        plan = self._epoch(epoch)
        bucket, i = int(plan["order"][j]), int(plan["rank"][j])
        g = self.global_batch_size
        return epoch, bucket, self._bucket_ids(plan, epoch, bucket)[i * g:(i + 1) * g]

    def local_batch(self, k: int, process_index: int = 0, process_count: int = 1):
        """``(epoch, bucket, ids)`` of process ``process_index``'s block of global batch ``k``."""
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if self.global_batch_size % process_count:
            raise ValueError(f"data.global_batch_size={self.global_batch_size} must divide by the "
                             f"process count {process_count}")
        epoch, bucket, ids = self.global_batch(k)
        b = self.global_batch_size // process_count
        return epoch, bucket, ids[process_index * b:(process_index + 1) * b]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"BatchSchedule(buckets={len(self.members)}, records={self.num_records}, "
                f"G={self.global_batch_size}, batches/epoch={self.batches_per_epoch}, "
                f"seed={self.seed}, shuffle={self.shuffle})")
