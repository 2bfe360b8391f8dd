"""data.source="arrayrecord" (tim_jax.data.arrayrecord): batches, flips, epochs, process blocks,
exact resume (mid-epoch, across epochs, through DevicePrefetcher's JSON), buckets, workers."""
import io
import json
import os

import numpy as np
import pytest

from tim_jax.data import arrayrecord as ar
from tim_jax.data import pipeline, records

SHAPE = (4, 6, 2)


def _latent(i, shape=SHAPE):
    """Record i's latent: distinct per record and position, exact in float16; flip = mirror in w."""
    h, w, c = shape
    return (np.arange(h * w * c).reshape(shape) % 61 / 8.0 + i).astype(np.float16)


def _label(i):
    return -1 if i % 13 == 5 else i % 7


def _write(d, n, *, shapes=None, shards=3, images=False, shape=SHAPE, shapes_file=False):
    """A prepared directory of n records (fixed `shape`, or per-record `shapes` -> native)."""
    os.makedirs(d, exist_ok=True)
    blobs = []
    for i in range(n):
        lat = _latent(i, shape if shapes is None else tuple(shapes[i]))
        rec = {"latent": lat, "latent_flip": lat[:, ::-1], "label": _label(i), "key": f"r{i}"}
        if images:
            from PIL import Image

            img = np.zeros((lat.shape[0] * 2, lat.shape[1] * 2, 3), np.uint8)
            img[..., 0] = np.arange(img.shape[1], dtype=np.uint8) * 5 + i
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            rec["image"] = buf.getvalue()
        blobs.append(records.encode_record(rec))
    cuts = np.linspace(0, n, shards + 1).astype(int)
    table = []
    for s in range(shards):
        name = f"shard-{s:05d}.array_record"
        records.write_shard(os.path.join(d, name), blobs[cuts[s]:cuts[s + 1]])
        table.append({"file": name, "num_records": int(cuts[s + 1] - cuts[s])})
    records.write_manifest(d, {
        "num_records": n, "shards": table, "native": shapes is not None,
        "fields": {k: records.field_spec(v) for k, v in rec.items()},  # (the last record's)
        "latent_shape": None if shapes is not None else list(shape),
        "vae": {"name": "test"}, "class_names": [str(k) for k in range(7)], "num_classes": 7,
        **({"latent_shapes_file": "latent_shapes.npy"} if shapes_file else {})})
    if shapes_file:  # as `prepare --native` writes it
        np.save(os.path.join(d, "latent_shapes.npy"), np.asarray(shapes, np.int64))
    return str(d)


@pytest.fixture(scope="module")
def dir40(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("ar") / "d40", 40)


def _iter(path, **kw):
    args = dict(global_batch_size=8, seed=5, null_label=7, with_ids=True)
    args.update(kw)
    return ar.make_arrayrecord_iterator(path, **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b))


def test_batches_are_the_stored_latents_with_the_chosen_flip(dir40):
    it = _iter(dir40)
    for k, b in enumerate(_take(it, 7)):  # 5 batches per epoch: crosses into epoch 1
        assert set(b) == {"x", "cond", "record_id"}
        assert b["x"].shape == (8, *SHAPE) and b["x"].dtype == np.float32
        assert b["cond"].shape == (8,) and b["cond"].dtype == np.int32
        flips = ar.flip_mask(5, k // 5, b["record_id"])
        for row, (rid, f) in enumerate(zip(b["record_id"], flips)):
            want = _latent(rid)[:, ::-1] if f else _latent(rid)
            np.testing.assert_array_equal(b["x"][row], want.astype(np.float32))  # exact
            assert b["cond"][row] == (7 if _label(rid) < 0 else _label(rid))  # -1 -> null label
    no_flip = next(_iter(dir40, flip=False))
    for row, rid in enumerate(no_flip["record_id"]):
        np.testing.assert_array_equal(no_flip["x"][row], _latent(rid).astype(np.float32))


def test_flip_choice_half_and_deterministic():
    ids = np.arange(20000)
    f = ar.flip_mask(0, 0, ids)
    assert abs(f.mean() - 0.5) < 0.02  # binomial std 0.0035: 0.02 is > 5 sigma
    assert np.array_equal(f, ar.flip_mask(0, 0, ids))
    for other in (ar.flip_mask(1, 0, ids), ar.flip_mask(0, 1, ids)):  # other seed / epoch
        assert abs((f == other).mean() - 0.5) < 0.02  # independent choices
    assert abs(ar.flip_mask(0, 0, ids[::2]).astype(int).sum() - 5000) < 400  # no parity pattern


def test_shuffle_differs_per_epoch_and_seed(dir40):
    def epochs(seed, n=3):
        b = _take(_iter(dir40, seed=seed), 5 * n)
        return [np.concatenate([x["record_id"] for x in b[5 * e:5 * (e + 1)]]) for e in range(n)]

    e5 = epochs(5)
    for order in e5:
        assert sorted(order.tolist()) == list(range(40))  # 40 = 5 x 8: no leftovers
    assert not np.array_equal(e5[0], e5[1]) and not np.array_equal(e5[1], e5[2])
    assert not np.array_equal(e5[0], epochs(6, 1)[0])
    assert all(np.array_equal(a, b) for a, b in zip(e5, epochs(5)))  # deterministic


def test_process_blocks_concatenate_to_the_one_process_batch(dir40):
    whole = _take(_iter(dir40), 6)
    for n in (2, 4):
        parts = [_take(_iter(dir40, process_index=p, process_count=n), 6) for p in range(n)]
        joined = [{k: np.concatenate([parts[p][s][k] for p in range(n)]) for k in whole[s]}
                  for s in range(6)]
        assert _same(joined, whole)
    with pytest.raises(ValueError, match="must divide by the process count"):
        _iter(dir40, process_count=3)


@pytest.mark.parametrize("at", [2, 5, 8], ids=["mid_epoch", "epoch_boundary", "mid_epoch_2"])
def test_exact_resume(dir40, at):
    it = _iter(dir40)
    _take(it, at)
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    reference = _take(it, 6)  # crosses the next epoch boundary
    resumed = _iter(dir40)
    resumed.set_state(state)
    assert _same(_take(resumed, 6), reference)
    # restored into 2 processes (another process count): same global stream, re-sliced
    parts = []
    for p in range(2):
        r = _iter(dir40, process_index=p, process_count=2)
        r.set_state(state)
        parts.append(_take(r, 6))
    assert _same([{k: np.concatenate([parts[0][s][k], parts[1][s][k]]) for k in reference[s]}
                  for s in range(6)], reference)


def test_resume_through_device_prefetcher_and_grain_handler(dir40, tmp_path):
    """The train loop's path: DevicePrefetcher (state as of the last batch handed out) saved and
    restored by Grain's Orbax handler (what tim_jax.training.checkpointing uses for "data")."""
    import grain
    from etils import epath

    it = pipeline.DevicePrefetcher(_iter(dir40), lambda b: b, size=2)
    _take(it, 3)
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
    reference = _take(it, 4)
    fresh = pipeline.DevicePrefetcher(_iter(dir40), lambda b: b, size=2)
    grain.checkpoint.CheckpointHandler().restore(epath.Path(tmp_path), item=fresh)
    assert _same(_take(fresh, 4), reference)


def test_resume_refuses_other_data_settings(dir40):
    state = _iter(dir40).get_state()
    for kw, name in (({"global_batch_size": 4}, "global_batch_size"), ({"seed": 6}, "seed"),
                     ({"flip": False}, "flip")):
        with pytest.raises(ValueError, match=name):
            _iter(dir40, **kw).set_state(state)


def test_leftovers_dropped_per_epoch(tmp_path):
    d = _write(tmp_path / "d43", 43, shards=2)
    b = _take(_iter(d), 15)  # 5 batches per epoch, 3 records left over each epoch
    left = []
    for e in range(3):
        ids = np.concatenate([x["record_id"] for x in b[5 * e:5 * (e + 1)]])
        assert len(set(ids.tolist())) == 40
        left.append(frozenset(set(range(43)) - set(ids.tolist())))
    assert len(set(left)) > 1


def test_native_buckets_through_the_iterator(tmp_path):
    rng = np.random.default_rng(0)
    kinds = [(4, 6, 2)] * 19 + [(6, 4, 2)] * 17 + [(2, 2, 2)] * 3
    shapes = [kinds[i] for i in rng.permutation(len(kinds))]
    d = _write(tmp_path / "native", len(shapes), shapes=shapes, images=True)
    cache = str(tmp_path / "shapes.npy")
    it = _iter(d, bucket_index=cache, images=True)
    assert os.path.exists(cache)
    assert it.schedule.batches_per_epoch == 2 + 2 and it.schedule.unused_buckets == [((2, 2, 2), 3)]
    batches = _take(it, 8)
    for k, b in enumerate(batches):
        rid = b["record_id"]
        assert len({shapes[i] for i in rid}) == 1 and b["x"].shape[1:] == shapes[rid[0]]
        h, w, _ = shapes[rid[0]]
        assert b["image"].shape == (8, 2 * h, 2 * w, 3) and b["image"].dtype == np.uint8
        flips = ar.flip_mask(5, k // 4, rid)
        for row, (i, f) in enumerate(zip(rid, flips)):  # the image mirrors with its latent
            red = np.arange(2 * w, dtype=np.uint8) * 5 + i
            np.testing.assert_array_equal(b["image"][row, 0, :, 0], red[::-1] if f else red)
    for e in range(2):
        ids = np.concatenate([b["record_id"] for b in batches[4 * e:4 * (e + 1)]])
        assert len(set(ids.tolist())) == 32  # 16 + 16 used; 3 + 1 leftovers and the 2x2 bucket
    first = _iter(d, bucket_index=cache, images=True)  # buckets read back from the cache
    assert _same(_take(first, 3), batches[:3])
    resumed = _iter(d, images=True)  # buckets scanned again: the same schedule
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    assert _same(_take(resumed, 5), batches[3:8])
    # the directory's own latent_shapes.npy (prepare --native) gives the same buckets
    d2 = _write(tmp_path / "native2", len(shapes), shapes=shapes, images=True, shapes_file=True)
    assert _same(_take(_iter(d2, images=True), 8), batches)
    np.save(os.path.join(d2, "latent_shapes.npy"), np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="latent_shapes_file"):
        _iter(d2)


def test_grain_workers_give_the_same_batches(dir40):
    serial = _take(_iter(dir40), 4)
    it = _iter(dir40, num_workers=2)
    try:
        assert _same(_take(it, 3), serial[:3])
        state = it.get_state()
    finally:
        it.close()
    resumed = _iter(dir40)  # another worker count (0): the same stream
    resumed.set_state(state)
    assert _same(_take(resumed, 1), serial[3:4])


def _config(path, **model):
    import ml_collections

    m = dict(kind="c2i", input_size=4, patch_size=2, in_channels=2, num_classes=7)
    m.update(model)
    return ml_collections.ConfigDict({
        "seed": 5, "model": m,
        "data": {"source": "arrayrecord", "path": path, "global_batch_size": 8, "shuffle": True,
                 "flip": True, "use_repa_target": False, "num_workers": 0}})


def test_config_route_and_errors(tmp_path):
    d = _write(tmp_path / "sq", 16, shards=1, shape=(4, 4, 2))
    config = _config(d)
    b = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
    assert b["x"].shape == (8, 4, 4, 2) and b["cond"].dtype == np.int32 and set(b) == {"x", "cond"}
    assert np.array_equal(b["x"], next(_iter(d, with_ids=False))["x"])  # same seed, same stream
    src = pipeline.make_source(config)
    assert len(src) == 16 and src[3]["x"].shape == (4, 4, 2) and src[5]["cond"] == 7  # null label
    for model, match in (({"input_size": 8}, "input_size"), ({"in_channels": 4}, "in_channels"),
                         ({"kind": "t2i"}, "c2i"), ({"num_classes": 5}, "has 7 classes")):
        with pytest.raises(ValueError, match=match):
            pipeline.make_train_iterator(_config(d, **model), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not below model.num_classes=5"):  # labels go to 6
        _take(_iter(d, null_label=5), 2)
    config.data.use_repa_target = True
    with pytest.raises(ValueError, match="use_repa_target"):
        pipeline.make_source(config)
    (tmp_path / "empty").mkdir()
    for path in (str(tmp_path / "missing"), "", str(tmp_path / "empty")):
        with pytest.raises(ValueError, match="data.path"):
            pipeline.make_train_iterator(_config(path), process_index=0, process_count=1)
