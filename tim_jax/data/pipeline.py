"""Training data: Grain pipelines of host batches, with checkpointable iterator state.

The train loop consumes any iterator of **host batches**: dicts of numpy arrays holding this
process's rows of one global batch,

    "x"            (B_local, H, W, C) float32   clean latents (or images), NHWC
    "cond"         (B_local,) int32             class labels (c2i; label num_classes = null)
                   (B_local, L, D) float32      caption features (t2i)
    "repa_target"  (B_local, N, z_dim) float32  optional REPA features (N = tokens)

with B_local = global_batch_size / process_count. Two sources ship here, both random-access
Grain sources (``__len__`` + ``__getitem__``) run through the same pipeline
(:func:`make_dataset`): ``MapDataset.source -> [shuffle] -> repeat -> [host slice] -> batch
-> to_iter_dataset [-> mp_prefetch]``. Its iterator (``grain.DatasetIterator``) has
``get_state()`` / ``set_state()``, which :mod:`tim_jax.checkpointing` saves with the model, so a
resumed run sees exactly the batches an uninterrupted run would have seen.

  * :class:`SyntheticSource` (``config.data.source = "synthetic"``): a deterministic,
    class-conditional Gaussian mixture in latent space (element ``i`` depends only on
    ``(seed, i)``), with fake REPA targets that depend on the class. For tests and smoke runs;
    a model can actually fit it (class means are distinct, per-example noise is small).
  * :class:`ArraySource` (``config.data.source = "array"``): in-memory (or memory-mapped)
    numpy arrays, shuffled afresh each epoch. ``config.data.path`` is either an ``.npz`` file or
    a directory of ``.npy`` files, with keys ``x`` (N, H, W, C), ``cond`` (N,) or (N, L, D), and
    optionally ``repa_target`` (N, tokens, z_dim); ``.npy`` directories are memory-mapped, so
    they may be larger than RAM. Latents stored as float16/bfloat16 are cast to float32.

``config.data.source = "arrayrecord"`` (a directory written by ``python -m tim_jax.prepare``)
has its own iterator, :mod:`tim_jax.data.arrayrecord` (per-epoch shuffle, random flips,
aspect-ratio buckets; contiguous per-process rows; a process-count-free state).

Multi-host: process p reads the p-th contiguous block of rows of every global batch (the
global order is batched first, then batch ``k*n + p`` goes to process p), so the global batch is
identical whatever the host count and matches the block ``jax.make_array_from_process_local_data``
assigns to the process; a host batch becomes a global
sharded array with :func:`to_global` (``jax.make_array_from_process_local_data``). Restoring an
iterator state needs the same process count (Grain's checkpoint is one file per process).

Grain worker processes (``data.num_workers > 0``) need absl flags marked parsed; the train CLI
does it (:func:`ensure_absl_flags_parsed`). On CPU keep 0 workers: the pipeline is far faster
than a CPU train step.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterator, Mapping

import grain
import jax
import numpy as np

__all__ = [
    "SyntheticSource",
    "ArraySource",
    "load_arrays",
    "make_dataset",
    "make_train_iterator",
    "DevicePrefetcher",
    "to_global",
    "ensure_absl_flags_parsed",
]

_INFINITE = 2**62  # length of the synthetic source: effectively endless, never repeats


class SyntheticSource:
    """Deterministic class-conditional Gaussian mixture latents (a Grain random-access source).

    Element ``i`` (a dict of numpy arrays, no batch dim):
      ``x``: (H, W, C) float32 = ``mean_scale * mu[label] + noise_scale * eps``, where
        ``mu`` (num_classes, H, W, C) ~ N(0, 1) is fixed by ``seed`` and eps ~ N(0, 1) is drawn
        from ``(seed, i)``; with the defaults the per-pixel std over the data is ~1.
      ``cond``: () int32 label in [0, num_classes) (c2i), or, when ``cond_shape=(L, D)`` is
        given (t2i), (L, D) float32 caption features ``e[label] + 0.1 * eps``.
      ``repa_target`` (when ``repa_shape=(N, z_dim)``): (N, z_dim) float32 features
        ``f[label] + 0.1 * eps``: a fake encoder output that depends on the class.

    The same ``(seed, i)`` always gives the same element, on any host and in any process.
    """

    def __init__(
        self,
        *,
        shape: tuple[int, int, int],
        num_classes: int,
        seed: int = 0,
        repa_shape: tuple[int, int] | None = None,
        cond_shape: tuple[int, int] | None = None,
        mean_scale: float = 0.8,
        noise_scale: float = 0.6,
        length: int = _INFINITE,
    ):
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"SyntheticSource: shape must be (H, W, C) with sizes >= 1, got {shape}")
        if num_classes < 1:
            raise ValueError(f"SyntheticSource: num_classes must be >= 1, got {num_classes}")
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.repa_shape = None if repa_shape is None else tuple(int(s) for s in repa_shape)
        self.cond_shape = None if cond_shape is None else tuple(int(s) for s in cond_shape)
        self.mean_scale = float(mean_scale)
        self.noise_scale = float(noise_scale)
        self._length = int(length)
        table_rng = np.random.default_rng([self.seed, 0x7A61])
        self._means = table_rng.standard_normal((self.num_classes, *self.shape), np.float32)
        self._repa = (
            None
            if self.repa_shape is None
            else table_rng.standard_normal((self.num_classes, *self.repa_shape), np.float32)
        )
        self._captions = (
            None
            if self.cond_shape is None
            else table_rng.standard_normal((self.num_classes, *self.cond_shape), np.float32)
        )

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index) % self._length
        rng = np.random.default_rng([self.seed, 1, index])
        label = int(rng.integers(self.num_classes))
        eps = rng.standard_normal(self.shape, np.float32)
        out = {"x": (self.mean_scale * self._means[label] + self.noise_scale * eps).astype(np.float32)}
        if self._captions is None:
            out["cond"] = np.int32(label)
        else:
            noise = rng.standard_normal(self.cond_shape, np.float32)
            out["cond"] = (self._captions[label] + 0.1 * noise).astype(np.float32)
        if self._repa is not None:
            noise = rng.standard_normal(self.repa_shape, np.float32)
            out["repa_target"] = (self._repa[label] + 0.1 * noise).astype(np.float32)
        return out

    def __repr__(self) -> str:
        return (f"SyntheticSource(shape={self.shape}, num_classes={self.num_classes}, "
                f"seed={self.seed}, repa_shape={self.repa_shape}, cond_shape={self.cond_shape})")


class ArraySource:
    """Rows of a dict of equally long numpy arrays (a Grain random-access source).

    ``arrays``: name -> array with the same leading dim N (``x`` and ``cond`` required).
    Element ``i`` is ``{name: arr[i]}``; floating arrays come back as float32, ``cond`` labels
    as int32. Arrays may be ``np.memmap`` (rows are read lazily).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        missing = {"x", "cond"} - set(arrays)
        if missing:
            raise ValueError(f"ArraySource: arrays must contain 'x' and 'cond'; missing {sorted(missing)}")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource: arrays have different lengths {lengths}")
        n = lengths["x"]
        if n == 0:
            raise ValueError("ArraySource: the arrays are empty")
        if np.ndim(arrays["x"]) != 4:
            raise ValueError(f"ArraySource: 'x' must be (N, H, W, C), got shape {np.shape(arrays['x'])}")
        self._arrays = dict(arrays)
        self._length = n

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        out = {}
        for name, arr in self._arrays.items():
            v = np.asarray(arr[int(index)])
            if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16":
                v = v.astype(np.float32)
            elif name == "cond":
                v = v.astype(np.int32)
            out[name] = v
        return out

    def __repr__(self) -> str:
        shapes = {k: tuple(np.shape(v)) for k, v in self._arrays.items()}
        return f"ArraySource({shapes})"


def load_arrays(path: str, *, mmap: bool = True) -> dict[str, np.ndarray]:
    """Loads an ``.npz`` file or a directory of ``<name>.npy`` files into a dict of arrays.

    Only ``x``, ``cond`` and ``repa_target`` are kept. ``.npy`` files are memory-mapped when
    ``mmap`` (the default); ``.npz`` members are read into memory.
    """
    keep = ("x", "cond", "repa_target")
    if os.path.isdir(path):
        out = {}
        for name in keep:
            f = os.path.join(path, name + ".npy")
            if os.path.exists(f):
                out[name] = np.load(f, mmap_mode="r" if mmap else None)
    elif os.path.isfile(path):
        with np.load(path) as z:
            out = {name: z[name] for name in keep if name in z.files}
    else:
        raise ValueError(f"data.path: {path!r} is neither an .npz file nor a directory of .npy files")
    if "x" not in out or "cond" not in out:
        raise ValueError(f"data.path: {path!r} must provide arrays 'x' and 'cond'; found {sorted(out)}")
    return out


def make_dataset(
    source,
    *,
    local_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    read_threads: int = 2,
    read_buffer: int = 4,
) -> grain.IterDataset:
    """The Grain pipeline over a random-access ``source``; yields host batches (dicts, dim 0 = rows).

    Global element order: the source's order, shuffled per epoch (seeded by ``seed`` and the
    epoch) when ``shuffle``, repeated forever. Process ``p`` of ``n`` takes global elements
    ``p, p + n, p + 2n, ...`` and batches ``local_batch_size`` of them; so global batch k is
    elements ``[k * n * B_local, (k + 1) * n * B_local)`` whatever ``n`` is.
    """
    if local_batch_size < 1:
        raise ValueError(f"make_dataset: local_batch_size must be >= 1, got {local_batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"make_dataset: process_index {process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(source)
    if shuffle and len(source) < _INFINITE:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    if len(source) < _INFINITE:
        ds = ds.repeat(None)
    ds = ds.batch(int(local_batch_size), drop_remainder=True)
    if process_count > 1:   # process p: rows [p*B_local, (p+1)*B_local) of each global batch
        ds = ds[process_index::process_count]
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=read_buffer)
    )
    if num_workers > 0:
        ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers)))
    return it_ds


def _repa_tokens(config) -> int:
    m = config.model
    n = int(config.data.get("repa_tokens", -1))
    return n if n > 0 else (int(m.input_size) // int(m.patch_size)) ** 2


def make_source(config):
    """The random-access source named by ``config.data.source`` ("synthetic" | "array" | "arrayrecord")."""
    d, m = config.data, config.model
    kind = d.source
    if kind == "synthetic":
        repa_shape = (_repa_tokens(config), int(m.z_dim)) if d.get("use_repa_target", False) else None
        cond_shape = None
        if m.get("kind", "c2i") == "t2i":
            # synthetic caption features: (data.caption_length or 16, model.cap_feat_dim)
            cond_shape = (int(d.get("caption_length", 16)), int(m.cap_feat_dim))
        return SyntheticSource(
            shape=(int(m.input_size), int(m.input_size), int(m.in_channels)),
            num_classes=int(m.get("num_classes", 16) or 16),  # t2i: 16 synthetic "prompts"
            seed=int(config.seed),
            repa_shape=repa_shape,
            cond_shape=cond_shape,
        )
    if kind == "array":
        if not d.get("path"):
            raise ValueError("data.path must be set when data.source = 'array'")
        arrays = load_arrays(d.path)
        want = (int(m.input_size), int(m.input_size), int(m.in_channels))
        if tuple(arrays["x"].shape[1:]) != want:
            raise ValueError(f"data.path: latents have shape {tuple(arrays['x'].shape[1:])} per row but "
                             f"the model expects (input_size, input_size, in_channels) = {want}")
        if d.get("use_repa_target", False):
            if "repa_target" not in arrays:
                raise ValueError("data.use_repa_target is True but data.path has no 'repa_target' array")
        else:
            arrays.pop("repa_target", None)
        if m.get("kind", "c2i") == "t2i":
            null = load_null_caption(config)
            if tuple(arrays["cond"].shape[1:]) != null.shape:
                raise ValueError(f"data.path: captions have shape {tuple(arrays['cond'].shape[1:])} per row "
                                 f"but data.null_caption has shape {null.shape}; they must match")
        return ArraySource(arrays)
    if kind == "arrayrecord":
        from tim_jax.data import arrayrecord

        return arrayrecord.source_from_config(config)
    raise ValueError(f"data.source must be 'synthetic' or 'array' (or 'arrayrecord'), got {kind!r}")


def load_null_caption(config) -> np.ndarray | None:
    """The t2i null condition: the encoded empty prompt, (L, model.cap_feat_dim) float32; None for c2i.

    From ``config.data.null_caption`` (a ``.npy`` file) when set; otherwise, for the synthetic
    source only, zeros of the synthetic caption shape (its "empty prompt"). Raises ValueError
    naming the field for a missing/unreadable file, a wrong shape or non-finite values.
    """
    d, m = config.data, config.model
    if m.get("kind", "c2i") != "t2i":
        return None
    want_dim = int(m.cap_feat_dim)
    path = str(d.get("null_caption", "") or "")
    if not path:
        if d.source == "synthetic":
            return np.zeros((int(d.get("caption_length", 16)), want_dim), np.float32)
        raise ValueError("data.null_caption must name a .npy file of the encoded empty prompt "
                         f"(shape (caption_length, {want_dim})) to train model.kind='t2i' on "
                         f"data.source={d.source!r}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.null_caption={path!r}: cannot read it as a .npy array ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != want_dim:
        raise ValueError(f"data.null_caption={path!r}: shape {arr.shape}, expected (caption_length, "
                         f"{want_dim}) (model.cap_feat_dim={want_dim})")
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise ValueError(f"data.null_caption={path!r}: must hold finite floats (dtype {arr.dtype})")
    return arr.astype(np.float32)


def make_train_iterator(config, *, process_index: int | None = None, process_count: int | None = None):
    """The training iterator (a ``grain.DatasetIterator`` of host batches) described by ``config``.

    Uses ``config.data`` (source, path, global_batch_size, shuffle, num_workers,
    use_repa_target, repa_tokens), ``config.model`` (shapes) and ``config.seed``.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    gbs = int(config.data.global_batch_size)
    if gbs % process_count:
        raise ValueError(f"data.global_batch_size={gbs} must divide by the process count {process_count}")
    if config.data.source == "arrayrecord":  # own schedule: epochs, buckets, flips (see its module)
        from tim_jax.data import arrayrecord

        return arrayrecord.iterator_from_config(config, process_index=process_index,
                                                process_count=process_count)
    ds = make_dataset(
        make_source(config),
        local_batch_size=gbs // process_count,
        seed=int(config.seed),
        shuffle=bool(config.data.get("shuffle", True)),
        process_index=process_index,
        process_count=process_count,
        num_workers=int(config.data.get("num_workers", 0)),
    )
    return iter(ds)


def to_global(host_batch: Mapping[str, Any], sharding) -> dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays sharded over the batch axes.

    ``sharding``: a ``jax.sharding.NamedSharding`` whose spec names the batch axes for dim 0
    (e.g. ``P(("data", "fsdp"))``; trailing dims are replicated), or a pytree of shardings
    matching ``host_batch``. The global leading dim is ``B_local * process_count``.
    """
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                            dict(host_batch))
    return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
                        sharding, dict(host_batch))


class DevicePrefetcher:
    """Keeps ``size`` batches already placed on device ahead of the train step.

    Wraps a host iterator with ``get_state``/``set_state`` (a Grain iterator) and a placement
    function (host batch -> device batch, e.g. ``partial(to_global, sharding=...)``). Its own
    :meth:`get_state` is the host iterator's state *as of the last batch handed out*, so a
    checkpoint taken after step k resumes at batch k + 1 even though later batches were
    already read. The state is JSON bytes, which is what Grain's Orbax handler
    (``grain.checkpoint.CheckpointSave/Restore``) stores for non-Grain iterators (one file per
    process). With ``size=0`` batches are placed on demand.
    """

    def __init__(self, host_iter, put_fn, size: int = 2):
        self._it = host_iter
        self._put = put_fn
        self._size = max(int(size), 0)
        self._queue: collections.deque = collections.deque()
        self._state = self._host_state()

    def _host_state(self):
        return self._it.get_state() if hasattr(self._it, "get_state") else None

    def _fill(self):
        while len(self._queue) < max(self._size, 1):
            host = next(self._it)
            self._queue.append((self._put(host), self._host_state()))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        self._fill()
        batch, self._state = self._queue.popleft()
        if self._size:
            try:
                self._fill()  # dispatch the next transfers before the step runs
            except StopIteration:
                pass
        return batch

    @property
    def supports_state(self) -> bool:
        return hasattr(self._it, "get_state") and hasattr(self._it, "set_state")

    def get_state(self) -> bytes:
        return json.dumps(self._state).encode()

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, (bytes, bytearray)):
            state = state.decode()
        if isinstance(state, str):
            state = json.loads(state)
        self._it.set_state(state)
        self._queue.clear()
        self._state = state

    def start_prefetch(self) -> None:  # called by Grain's checkpoint handler after restore
        pass


def ensure_absl_flags_parsed() -> None:
    """Marks absl's global flags parsed (Grain's worker processes read absl flags)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

