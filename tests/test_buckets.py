"""Aspect-ratio buckets (tim_jax.data.buckets): one shape per global batch, epochs, leftovers,
seeded and resumable bucket order, per-process blocks."""
import collections
import pickle

import numpy as np
import pytest

from tim_jax.data.buckets import BatchSchedule, group_by_shape

# 4 buckets: 37 + 20 + 11 + 3 records, interleaved in id order (as a prepared directory would be)
_SHAPES = [(4, 8, 4)] * 37 + [(8, 4, 4)] * 20 + [(6, 6, 4)] * 11 + [(2, 10, 4)] * 3
_RECORD_SHAPES = np.array(_SHAPES)[np.random.default_rng(0).permutation(len(_SHAPES))]
G = 8


def _schedule(**kw):
    args = dict(global_batch_size=G, seed=3)
    args.update(kw)
    return BatchSchedule.from_shapes(_RECORD_SHAPES, **args)


def test_group_by_shape():
    shapes, members = group_by_shape(_RECORD_SHAPES)
    assert sorted(shapes) == shapes and len(shapes) == 4
    assert sorted(np.concatenate(members).tolist()) == list(range(len(_SHAPES)))
    for s, m in zip(shapes, members):
        assert np.all(np.diff(m) > 0)  # ascending ids
        assert all(tuple(_RECORD_SHAPES[i]) == s for i in m)
    with pytest.raises(ValueError, match="per-record shapes"):
        group_by_shape(np.zeros((0, 3)))


def test_one_shape_per_global_batch_and_epoch_coverage():
    s = _schedule()
    # floor(37/8) + floor(20/8) + floor(11/8) + floor(3/8) = 4 + 2 + 1 + 0
    assert s.batches_per_epoch == 7 and s.records_per_epoch == 56
    assert s.unused_buckets == [((2, 10, 4), 3)]
    dropped = []
    for epoch in range(4):
        seen = []
        per_bucket = collections.Counter()
        for k in range(epoch * 7, (epoch + 1) * 7):
            e, b, ids = s.global_batch(k)
            assert e == epoch and len(ids) == G
            assert len({tuple(_RECORD_SHAPES[i]) for i in ids}) == 1  # one shape per batch
            assert tuple(_RECORD_SHAPES[ids[0]]) == s.bucket_shapes[b]
            per_bucket[b] += 1
            seen += ids.tolist()
        assert len(seen) == len(set(seen)) == 56  # each record at most once per epoch
        assert per_bucket == {b: int(n) for b, n in enumerate(s.batches_per_bucket) if n}
        # leftovers: per used bucket n_b mod G records (5 + 4 + 3), plus the unused bucket (3)
        left = set(range(len(_SHAPES))) - set(seen)
        assert len(left) == 5 + 4 + 3 + 3
        dropped.append(frozenset(left))
    assert len(set(dropped)) > 1  # a different leftover set in different epochs


def test_order_seeded_per_epoch_and_deterministic():
    a, b, other = _schedule(), _schedule(), _schedule(seed=4)
    ks = range(0, 7 * 6)
    ga = [a.global_batch(k) for k in ks]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(ga, (b.global_batch(k) for k in ks)))
    go = [other.global_batch(k) for k in ks]
    assert any(not np.array_equal(x[2], y[2]) for x, y in zip(ga, go))  # another seed differs
    orders = {tuple(x[1] for x in ga[e * 7:(e + 1) * 7]) for e in range(6)}
    assert len(orders) > 1  # the bucket order changes between epochs
    first = [tuple(ga[e * 7][2]) for e in range(6)]
    assert len(set(first)) > 1  # records are reshuffled between epochs


def test_resumable_without_hidden_state():
    s = _schedule()
    ref = [s.global_batch(k) for k in range(40)]
    # a fresh (or unpickled, as in a Grain worker) schedule queried from the middle, backwards
    for fresh in (_schedule(), pickle.loads(pickle.dumps(s))):
        for k in reversed(range(17, 40)):
            e, b, ids = fresh.global_batch(k)
            assert (e, b) == ref[k][:2] and np.array_equal(ids, ref[k][2])
    assert _schedule().fingerprint() == s.fingerprint()
    for kw in ({"seed": 4}, {"global_batch_size": 4}, {"shuffle": False}):
        assert _schedule(**kw).fingerprint() != s.fingerprint()
    moved = _RECORD_SHAPES.copy()
    moved[[0, 1]] = moved[[1, 0]] if tuple(moved[0]) != tuple(moved[1]) else moved[[0, 2]]
    assert BatchSchedule.from_shapes(moved, global_batch_size=G, seed=3).fingerprint() != s.fingerprint()


def test_process_blocks_concatenate_to_the_global_batch():
    s = _schedule()
    for k in (0, 5, 6, 7, 13):
        e, b, ids = s.global_batch(k)
        for n in (2, 4, 8):
            parts = [s.local_batch(k, p, n) for p in range(n)]
            assert all(part[:2] == (e, b) for part in parts)  # same bucket on every process
            assert np.array_equal(np.concatenate([part[2] for part in parts]), ids)
    with pytest.raises(ValueError, match="must divide by the process count"):
        s.local_batch(0, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        s.local_batch(0, 2, 2)


def test_unshuffled_and_uniform_and_errors():
    s = _schedule(shuffle=False)
    buckets = [s.global_batch(k)[1] for k in range(7)]
    assert buckets == sorted(buckets)
    assert buckets[0] == 1 and np.array_equal(s.global_batch(0)[2], s.members[1][:G])  # 0 unused
    u = BatchSchedule.uniform(20, (4, 4, 4), global_batch_size=6, seed=0)
    assert u.batches_per_epoch == 3 and u.bucket_shapes == [(4, 4, 4)]
    assert np.all(np.concatenate([u.global_batch(k)[2] for k in range(3)]) < 20)
    with pytest.raises(ValueError, match="larger than every bucket"):
        _schedule(global_batch_size=64)
    with pytest.raises(ValueError, match="k must be >= 0"):
        s.global_batch(-1)
