"""``data.source = "arrayrecord"``: training batches from a prepared directory of ArrayRecord shards.

The directory is what ``python -m tim_jax.prepare`` writes (format: :mod:`tim_jax.data.records`):
a manifest and shards of records holding ``latent`` and ``latent_flip`` (h, w, c) float16,
already normalised, NHWC, of a crop and of its horizontal mirror, and ``label`` (-1: none);
T2I records also ``caption_features`` (L, hidden) float16 (:mod:`tim_jax.data.captions`).

Host batch of global step ``k`` (dicts of numpy arrays, rows = this process's block):
    "x"          (B_local, h, w, c) float32   the chosen latent of each record
    "cond"       (B_local,) int32             c2i: label; -1 (no label) -> ``null_label``
                 (B_local, L, D) float32      t2i: the record's ``caption_features`` padded with
                                              the null caption's pad rows to L = len(null caption)
                                              (``tim_jax.data.captions.pad_features``)
    "image"      (B_local, H, W, 3) uint8     only with ``images=True``: the record's crop,
                                              mirrored when its mirrored latent was chosen
    "record_id"  (B_local,) int64             only with ``with_ids=True``

Order: global batch ``k`` is :meth:`BatchSchedule.global_batch` (``tim_jax.data.buckets``):
records shuffled afresh each epoch from ``seed``, ``N mod G`` leftovers dropped per epoch (per
bucket), one latent shape per global batch (one bucket for a fixed-size directory; with
``native: true`` in the manifest, one per distinct record shape, the shapes read from
:func:`load_record_shapes`).

Flip: as the official C2I loader (``ImagenetLatentDataset`` picks the latent of the crop or of
its mirror with p = 0.5), but deterministic: record ``r`` in epoch ``e`` uses ``latent_flip``
iff the top bit of ``splitmix64(seed, e, r)`` is set (``flip=False``: always ``latent``).

Processes: every process computes the same global batch; process ``p`` of ``n`` takes the
contiguous rows ``[p G/n, (p+1) G/n)``, so the process batches concatenated in process order
are the one-process global batch, bit for bit, for any ``n`` dividing ``G``.

Pipeline: ``MapDataset.range(k0, inf).map(global step -> host batch: read the block's records
(ArrayRecordDataSource.__getitems__), decode, flip, stack) -> to_iter_dataset(read threads,
prefetch) [-> mp_prefetch(workers)]``, wrapped in :class:`ArrayRecordIterator`.

Checkpoint state: ``{"next_batch": k, "fingerprint": {...}}``, independent of the process and
worker counts. ``set_state`` raises ValueError naming the difference when the fingerprint
(records, buckets, G, seed, shuffle, flip) differs, then restarts the pipeline at batch ``k``.
**Another process count** re-slices: global batch ``k`` keeps its rows and the new processes
take their blocks of it, so training continues on the same global stream. (Grain's Orbax
handler names each process's file ``process_<i>-of-<n>.json``, so ``tim_jax.training.
checkpointing`` reports a changed count as an error; every file holds the same state, so any
one of them restores any process.) The worker count may change freely.
"""
from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from tim_jax import atomic_files
from tim_jax.data import captions, records
from tim_jax.data.buckets import BatchSchedule

__all__ = ["ArrayRecordSource", "ArrayRecordIterator", "flip_mask", "make_arrayrecord_iterator",
           "source_from_config", "iterator_from_config"]

log = logging.getLogger(__name__)

_END = sys.maxsize  # the global batch stream is endless


def flip_mask(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Whether record ``ids`` use their mirrored latent in ``epoch``: bool array, p = 1/2 each."""
    m = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = (np.uint64(int(seed) & int(m)) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.uint64(int(epoch) & int(m)) * np.uint64(0xD1B54A32D192ED03))
        x = x ^ np.asarray(ids, np.int64).astype(np.uint64) * np.uint64(0x94D049BB133111EB)
        for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # splitmix64 mix
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mul)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(63)).astype(bool)


class ArrayRecordSource:
    """The records of a prepared directory, read by id (a Grain random-access source).

    ``path``: the directory (manifest + shards). ``null_label``: the ``cond`` of records
    without a label (-1); None makes such a record an error. ``null_caption`` (L, D): T2I, the
    ``cond`` is then the records' caption features padded to L rows with it (labels unused).
    Element ``i`` is ``{"x": latent (h, w, c) float32, "cond": () int32 or (L, D) float32}``
    (never mirrored).
    """

    def __init__(self, path: str, *, null_label: int | None = None, images: bool = False,
                 null_caption: np.ndarray | None = None):
        if not os.path.isdir(path):
            raise ValueError(f"data.path: {path!r} is not a directory (expected the output of "
                             "`python -m tim_jax.prepare`)")
        self.path = str(path)
        try:
            self.manifest = records.read_manifest(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"data.path={path!r}: {e}") from None
        self.native = bool(self.manifest.get("native", False))
        shape = self.manifest.get("latent_shape")
        self.latent_shape = None if shape is None else tuple(int(v) for v in shape)
        if not self.native and self.latent_shape is None:
            raise ValueError(f"data.path={path!r}: the manifest has no latent_shape and is not native")
        self.null_label = None if null_label is None else int(null_label)
        self.images = bool(images)
        fields = set(self.manifest.get("fields") or ())
        if self.images and fields and "image" not in fields:
            raise ValueError(f"data.images=True but the records in {path!r} have no 'image' field "
                             f"(fields: {sorted(fields)}): prepare them with --keep-images")
        paths = [str(p) for p in records.shard_paths(path)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise ValueError(f"data.path={path!r}: shard(s) missing: {missing[:3]}")
        self._ds = grain.sources.ArrayRecordDataSource(paths)
        n = int(self.manifest["num_records"])
        if len(self._ds) != n or n == 0:
            raise ValueError(f"data.path={path!r}: the manifest lists {n} records but the shards "
                             f"hold {len(self._ds)}")
        self._decode = records.decode_record
        self.null_caption = None
        if null_caption is not None:
            self.set_null_caption(null_caption)

    def set_null_caption(self, null_caption: np.ndarray) -> None:
        """Make ``cond`` the records' caption features padded with ``null_caption`` (L, D)
        (checked: the records have features of width D, at most L tokens, and the same BOS
        feature as the null caption)."""
        null = np.asarray(null_caption, np.float32)
        name = captions.FEATURES_FIELD
        self.require_caption_features()
        first = self._decode(self._ds[0]).get(name)
        if first is None:
            raise ValueError(f"data.path={self.path!r}: record 0 has no {name!r}")
        most = int((self.manifest.get("text_encoder") or {}).get("caption_max_tokens", 0))
        if null.ndim != 2 or null.shape[1] != first.shape[1] or most > null.shape[0]:
            raise ValueError(f"data.null_caption has shape {null.shape} but the records in "
                             f"{self.path!r} hold up to {most} caption tokens of width "
                             f"{first.shape[1]}: it must be (>= {most}, {first.shape[1]})")
        captions.check_null_caption(null, first, self.path)
        self.null_caption = null

    def require_caption_features(self) -> None:
        """ValueError unless the manifest lists ``caption_features`` (T2I records)."""
        fields = set(self.manifest.get("fields") or ())
        if fields and captions.FEATURES_FIELD not in fields:
            raise ValueError(f"data.path={self.path!r}: the records have no "
                             f"{captions.FEATURES_FIELD!r}, so they train model.kind='c2i' only; "
                             "for 't2i' prepare them with --captions FILE --text-encoder FOLDER")

    def _cond(self, recs: Sequence[Mapping[str, Any]], ids) -> np.ndarray:
        """The ``cond`` rows of decoded records: labels (c2i) or padded caption features (t2i)."""
        if self.null_caption is None:
            return np.asarray([self._label(r, int(i)) for r, i in zip(recs, ids)], np.int32)
        name = captions.FEATURES_FIELD
        missing = [int(i) for r, i in zip(recs, ids) if name not in r]
        if missing:
            raise ValueError(f"{self.path}: record(s) {missing[:5]} have no {name!r}")
        return captions.pad_features([r[name] for r in recs], self.null_caption, ids, self.path)

    def __len__(self) -> int:
        return len(self._ds)

    def _label(self, rec: Mapping[str, Any], rid: int) -> int:
        label = int(rec.get("label", -1))
        if label < 0:
            if self.null_label is None:
                raise ValueError(f"{self.path}: record {rid} has no label (-1) and no null label is set")
            return self.null_label
        if self.null_label is not None and label >= self.null_label:
            raise ValueError(f"{self.path}: record {rid} has label {label}, not below "
                             f"model.num_classes={self.null_label}")
        return label

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rec = self._decode(self._ds[int(index)])
        return {"x": np.asarray(rec["latent"], np.float32), "cond": self._cond([rec], [index])[0]}

    def read_batch(self, ids: np.ndarray, flips: np.ndarray, *, with_ids: bool = False) -> dict:
        """Records ``ids`` stacked into a host batch; row i mirrored where ``flips[i]``."""
        ids = np.asarray(ids, np.int64)
        raw = self._ds.__getitems__([int(i) for i in ids])
        latents, recs, images = [], [], []
        for rid, blob, flip in zip(ids, raw, flips):
            rec = self._decode(blob)
            recs.append(rec)
            latents.append(rec["latent_flip"] if flip else rec["latent"])
            if self.images:
                images.append(_decode_image(rec, flip, self.path, int(rid)))
        try:
            x = np.stack(latents).astype(np.float32)
        except ValueError:
            shapes = sorted({tuple(np.shape(v)) for v in latents})
            raise ValueError(f"{self.path}: records of one batch have different latent shapes "
                             f"{shapes}; a native-resolution directory needs buckets") from None
        out = {"x": x, "cond": self._cond(recs, ids)}
        if self.images:
            out["image"] = np.stack(images)
        if with_ids:
            out["record_id"] = ids
        return out

    def record_shapes(self, *, chunk: int = 4096) -> np.ndarray:
        """Latent shape of every record, (N, 3) int64 (reads and decodes every record)."""
        if not self.native:
            return np.tile(np.asarray(self.latent_shape, np.int64), (len(self), 1))
        out = np.empty((len(self), 3), np.int64)
        for start in range(0, len(self), chunk):
            keys = list(range(start, min(start + chunk, len(self))))
            for i, blob in zip(keys, self._ds.__getitems__(keys)):
                out[i] = np.shape(self._decode(blob)["latent"])
        return out

    def __repr__(self) -> str:
        return (f"ArrayRecordSource({self.path!r}, records={len(self)}, native={self.native}, "
                f"latent_shape={self.latent_shape})")


def _decode_image(rec: Mapping[str, Any], flip: bool, path: str, rid: int) -> np.ndarray:
    from PIL import Image

    blob = rec.get("image")
    if blob is None:
        raise ValueError(f"{path}: record {rid} has no 'image' (data.images=True needs it)")
    img = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), np.uint8)
    return np.ascontiguousarray(img[:, ::-1]) if flip else img


def load_record_shapes(source: ArrayRecordSource, cache: str = "") -> np.ndarray:
    """Per-record latent shapes (N, 3) int64 of a native directory.

    From ``cache`` (``data.bucket_index``) when that .npy exists; else from the directory's own
    ``latent_shapes_file`` (named in the manifest, written by ``tim_jax.prepare --native``);
    else read from every record, and then saved to ``cache`` when one is named.
    """
    named = source.manifest.get("latent_shapes_file")
    for path, what in ((cache, "data.bucket_index"),
                       (os.path.join(source.path, named) if named else "", "latent_shapes_file")):
        if path and os.path.exists(path):
            shapes = np.load(path, allow_pickle=False)
            if shapes.shape != (len(source), 3):
                raise ValueError(f"{what}={path!r}: shape {shapes.shape}, expected "
                                 f"({len(source)}, 3) for {source.path!r}")
            return shapes.astype(np.int64)
    shapes = source.record_shapes()
    if cache:
        atomic_files.save_npy(cache, shapes)
    return shapes


class _LoadHostBatch:
    """Global step k -> this process's host batch (picklable: runs in Grain workers)."""

    def __init__(self, source, schedule, process_index, process_count, flip, with_ids):
        self.source, self.schedule = source, schedule
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.flip, self.with_ids = bool(flip), bool(with_ids)

    def __call__(self, k: int) -> dict:
        epoch, _, ids = self.schedule.local_batch(k, self.process_index, self.process_count)
        flips = (flip_mask(self.schedule.seed, epoch, ids) if self.flip
                 else np.zeros(len(ids), bool))
        return self.source.read_batch(ids, flips, with_ids=self.with_ids)


class ArrayRecordIterator(grain.DatasetIterator):
    """Endless iterator of host batches with a process- and worker-count-free checkpoint state.

    State: ``{"next_batch": k, "fingerprint": schedule fingerprint + flip}`` (JSON-able).
    The Grain pipeline is (re)built lazily at batch ``k`` on the first ``next`` after
    construction or ``set_state``.
    """

    def __init__(self, source: ArrayRecordSource, schedule: BatchSchedule, *, process_index: int = 0,
                 process_count: int = 1, flip: bool = True, num_workers: int = 0,
                 read_threads: int = 2, read_buffer: int = 4, with_ids: bool = False):
        super().__init__()
        self._inner = None
        schedule.local_batch(0, process_index, process_count)  # validates the slicing early
        self._load = _LoadHostBatch(source, schedule, process_index, process_count, flip, with_ids)
        self._fingerprint = dict(schedule.fingerprint(), flip=bool(flip))
        self._workers, self._threads, self._buffer = int(num_workers), int(read_threads), int(read_buffer)
        self._next = 0

    @property
    def schedule(self) -> BatchSchedule:
        return self._load.schedule

    def _build(self):
        ds = grain.MapDataset.range(self._next, _END).map(self._load)
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._threads,
                                                     prefetch_buffer_size=self._buffer))
        if self._workers > 0:
            from tim_jax.data.pipeline import ensure_absl_flags_parsed

            ensure_absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        return iter(it_ds)

    def __next__(self) -> dict:
        if self._inner is None:
            self._inner = self._build()
        batch = next(self._inner)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        return {"next_batch": self._next, "fingerprint": dict(self._fingerprint)}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, Mapping) or "next_batch" not in state:
            raise ValueError(f"ArrayRecordIterator.set_state: not an arrayrecord iterator state: {state!r:.200}")
        saved = dict(state.get("fingerprint") or {})
        diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError("the data-iterator state was saved for other data or data settings "
                             f"({detail}); resume with the same data.path, data.global_batch_size, "
                             "seed, data.shuffle and data.flip, or start a new workdir")
        self._close_inner()
        self._next = int(state["next_batch"])

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._inner = self._build()
        if hasattr(self._inner, "start_prefetch"):
            self._inner.start_prefetch()

    def _close_inner(self) -> None:
        if self._inner is not None and hasattr(self._inner, "close"):
            self._inner.close()
        self._inner = None

    def close(self) -> None:
        self._close_inner()
        super().close()


def make_arrayrecord_iterator(path: str | ArrayRecordSource, *, global_batch_size: int, seed: int = 0,
                              shuffle: bool = True, flip: bool = True, process_index: int = 0,
                              process_count: int = 1, num_workers: int = 0, read_threads: int = 2,
                              read_buffer: int = 4, null_label: int | None = None,
                              images: bool = False, bucket_index: str = "",
                              with_ids: bool = False) -> ArrayRecordIterator:
    """The training iterator over a prepared directory (see the module docstring)."""
    source = path if isinstance(path, ArrayRecordSource) else ArrayRecordSource(
        path, null_label=null_label, images=images)
    fields = set(source.manifest.get("fields") or ())
    if flip and fields and "latent_flip" not in fields:
        raise ValueError(f"data.flip=True but the records in {source.path!r} have no 'latent_flip' "
                         "(prepare them with flips, or set data.flip=False)")
    kw = dict(global_batch_size=global_batch_size, seed=seed, shuffle=shuffle)
    if source.native:
        schedule = BatchSchedule.from_shapes(load_record_shapes(source, bucket_index), **kw)
    else:
        schedule = BatchSchedule.uniform(len(source), source.latent_shape, **kw)
    for shape, n in schedule.unused_buckets:
        log.warning("%s: bucket %s holds %d records, fewer than data.global_batch_size=%d: never "
                    "used", source.path, shape, n, schedule.global_batch_size)
    return ArrayRecordIterator(source, schedule, process_index=process_index,
                               process_count=process_count, flip=flip, num_workers=num_workers,
                               read_threads=read_threads, read_buffer=read_buffer, with_ids=with_ids)


def _check_shapes(shapes: Sequence[Sequence[int]], config, where: str, *, native: bool) -> None:
    m = config.model
    p, c = int(m.patch_size), int(m.in_channels)
    for h, w, ch in shapes:
        if ch != c:
            raise ValueError(f"data.path={where!r}: latents have {ch} channels, model.in_channels={c}")
        if h % p or w % p:
            raise ValueError(f"data.path={where!r}: latent shape ({h}, {w}) is not a multiple of "
                             f"model.patch_size={p}")
        if not native and (h, w) != (int(m.input_size),) * 2:
            raise ValueError(f"data.path={where!r}: latents are {h}x{w} but model.input_size="
                             f"{int(m.input_size)}")


def source_from_config(config) -> ArrayRecordSource:
    """The :class:`ArrayRecordSource` of ``config.data.path``, checked against ``config.model``
    (t2i: its caption features against ``data.null_caption`` and ``model.cap_feat_dim``)."""
    d, m = config.data, config.model
    if not d.get("path"):
        raise ValueError("data.path must be set when data.source = 'arrayrecord' (the directory "
                         "written by `python -m tim_jax.prepare`)")
    if d.get("use_repa_target", False):
        raise ValueError("data.use_repa_target=True but arrayrecord records carry no REPA targets; "
                         "set data.use_repa_target=False")
    if m.get("kind", "c2i") == "t2i":
        return _t2i_source(config)
    source = ArrayRecordSource(str(d.path), null_label=int(m.num_classes),
                               images=bool(d.get("images", False)))
    k = source.manifest.get("num_classes")
    if k is not None and int(k) > int(m.num_classes):
        raise ValueError(f"data.path={source.path!r} has {k} classes but model.num_classes="
                         f"{int(m.num_classes)}")
    if not source.native:
        _check_shapes([source.latent_shape], config, source.path, native=False)
    return source


def _t2i_source(config) -> ArrayRecordSource:
    from tim_jax.data.pipeline import load_null_caption

    d, m = config.data, config.model
    source = ArrayRecordSource(str(d.path), images=bool(d.get("images", False)))
    source.require_caption_features()
    te = source.manifest.get("text_encoder") or {}
    if te.get("hidden_size") is not None and int(te["hidden_size"]) != int(m.cap_feat_dim):
        raise ValueError(f"data.path={source.path!r}: the caption features are "
                         f"{te['hidden_size']}-d (text encoder hidden size) but "
                         f"model.cap_feat_dim={m.cap_feat_dim}")
    source.set_null_caption(load_null_caption(config))
    if not source.native:
        _check_shapes([source.latent_shape], config, source.path, native=False)
    return source


def iterator_from_config(config, *, process_index: int, process_count: int) -> ArrayRecordIterator:
    """:func:`make_arrayrecord_iterator` with the settings of ``config`` (see configs/base.py)."""
    d = config.data
    source = source_from_config(config)
    it = make_arrayrecord_iterator(
        source, global_batch_size=int(d.global_batch_size), seed=int(config.seed),
        shuffle=bool(d.get("shuffle", True)), flip=bool(d.get("flip", True)),
        process_index=process_index, process_count=process_count,
        num_workers=int(d.get("num_workers", 0)), read_threads=int(d.get("read_threads", 2)),
        read_buffer=int(d.get("read_buffer", 4)), bucket_index=str(d.get("bucket_index", "") or ""))
    if source.native:
        used = [s for s, k in zip(it.schedule.bucket_shapes, it.schedule.batches_per_bucket) if k]
        _check_shapes(used, config, source.path, native=True)
    return it
