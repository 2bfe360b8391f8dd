"""Host data-pipeline throughput (``data.source="arrayrecord"``) against what a train step consumes.

    python -m tim_jax.bench.data_pipeline [--data DIR | --records 5000 --shape 32,32,4 --shards 8]
        [--batch 256] [--process-count 1] [--workers 0,1,2] [--threads 2] [--buffer 4]
        [--batches 40] [--warmup 3] [--images [--image-format png|jpeg]] [--num-classes 1000]
        [--step-images-per-s 1127]

Reads a prepared directory (``--data``), or writes ``--records`` random float16 latents of
``--shape`` (h, w, c) in ``--shards`` ArrayRecord shards with :mod:`tim_jax.data.records` to a
temporary directory first. For each worker count it builds the training iterator
(:func:`tim_jax.data.arrayrecord.make_arrayrecord_iterator`: read, decode, flip choice, stack),
pulls ``--warmup`` batches (worker start-up included there), then times ``--batches`` batches
and prints this host's samples/s, ms per host batch, and the ratio to the samples/s the train
step consumes on one host: ``--step-images-per-s`` (global) / ``--process-count``.

The default step figure, 1127 images/s, is an estimate for TiM-XL/2 at global batch 256 on 8
accelerators: the measured TiM-S/2 step on one H200 (2759 images/s, docs/benchmarks.md, GPU
table) scaled by the forward GFLOPs of S/2 vs XL/2 at 256x256 (6.06 vs 118.6, the DiT paper's
table, same backbone sizes), times 8. Pass a measured figure when there is one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from tim_jax.data import arrayrecord

DEFAULT_STEP_IMAGES_PER_S = 1127.0  # TiM-XL/2, batch 256, 8 accelerators (see the docstring)


def write_random_records(out_dir: str, *, num_records: int, shape: tuple[int, int, int],
                         shards: int, num_classes: int = 1000, seed: int = 0,
                         image_format: str = "") -> str:
    """Writes ``num_records`` random records (latent, latent_flip, label, key) to ``out_dir``;
    with ``image_format`` (``png``/``jpeg``, as ``prepare --keep-images``) also an ``image``:
    a smooth random crop of 8 x the latent side, 16 distinct ones cycled."""
    from tim_jax.data import records
    from tim_jax.data.prepare_images import encode_image

    if num_records < 1 or shards < 1:
        raise ValueError(f"--records and --shards must be >= 1, got {num_records}, {shards}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    pictures = []
    if image_format:
        side = (8 * shape[0], 8 * shape[1])
        for _ in range(16):
            small = rng.integers(0, 256, (side[0] // 8, side[1] // 8, 3), dtype=np.uint8)
            big = np.kron(small, np.ones((8, 8, 1), np.uint8))   # blocky: compresses like a photo
            pictures.append(encode_image(big, image_format))
    cuts = np.linspace(0, num_records, min(shards, num_records) + 1).astype(int)
    table = []
    for s in range(len(cuts) - 1):
        def blobs(lo=int(cuts[s]), hi=int(cuts[s + 1])):
            for i in range(lo, hi):
                lat = rng.standard_normal(shape).astype(np.float16)
                rec = {"latent": lat, "latent_flip": lat[:, ::-1].copy(),
                       "label": int(i % num_classes), "key": f"{i:08d}"}
                if pictures:
                    rec["image"] = pictures[i % len(pictures)]
                yield records.encode_record(rec)
        name = f"train-{s:05d}-of-{len(cuts) - 1:05d}.array_record"
        records.write_shard(os.path.join(out_dir, name), blobs())
        table.append({"file": name, "num_records": int(cuts[s + 1] - cuts[s])})
    records.write_manifest(out_dir, {
        "num_records": int(num_records), "shards": table,
        "fields": ["latent", "latent_flip", "label", "key"] + (["image"] if pictures else []),
        "latent_shape": list(shape),
        "native": False, "vae": {"name": "random (benchmark)"},
        "class_names": [str(k) for k in range(num_classes)]})
    return out_dir


def measure(path: str, *, batch: int, process_count: int, workers: int, threads: int, buffer: int,
            batches: int, warmup: int, images: bool, num_classes: int = 1000) -> dict:
    """Samples/s of this host's iterator (process 0 of ``process_count``) with ``workers``."""
    it = arrayrecord.make_arrayrecord_iterator(
        path, global_batch_size=batch, seed=0, process_index=0, process_count=process_count,
        num_workers=workers, read_threads=threads, read_buffer=buffer, null_label=num_classes,
        images=images)
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            b = next(it)
        t1 = time.perf_counter()
        rows = 0
        for _ in range(batches):
            b = next(it)
            rows += len(b["x"])
        t2 = time.perf_counter()
    finally:
        it.close()
    return {"workers": workers, "samples_per_s": rows / (t2 - t1),
            "ms_per_batch": 1e3 * (t2 - t1) / batches, "warmup_s": t1 - t0,
            "shape": tuple(b["x"].shape)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tim_jax.bench.data_pipeline",
                                description=__doc__.split("\n")[0])
    p.add_argument("--data", default="", help="a prepared directory (else random records are written)")
    p.add_argument("--records", type=int, default=5000)
    p.add_argument("--shape", default="32,32,4", help="h,w,c of the generated latents")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch", type=int, default=256, help="global batch size")
    p.add_argument("--process-count", type=int, default=1, help="hosts sharing the global batch")
    p.add_argument("--workers", default="0,1,2", help="comma-separated Grain worker counts")
    p.add_argument("--threads", type=int, default=2, help="read threads per pipeline")
    p.add_argument("--buffer", type=int, default=4, help="host batches prefetched per pipeline")
    p.add_argument("--batches", type=int, default=40, help="timed host batches per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed host batches per row")
    p.add_argument("--images", action="store_true",
                   help="also decode the records' images (generated records: with images)")
    p.add_argument("--image-format", default="png", choices=("png", "jpeg"),
                   help="format of the generated records' images (with --images; prepare's default png)")
    p.add_argument("--num-classes", type=int, default=1000, help="labels are below this")
    p.add_argument("--step-images-per-s", type=float, default=DEFAULT_STEP_IMAGES_PER_S,
                   help="global images/s of the train step (default: TiM-XL/2 estimate, see doc)")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3:
        p.error(f"--shape must be h,w,c, got {args.shape!r}")
    workers = [int(v) for v in args.workers.split(",") if v.strip()]
    tmp = None
    try:
        path = args.data
        if not path:
            tmp = tempfile.mkdtemp(prefix="tim_bench_records_")
            t0 = time.perf_counter()
            path = write_random_records(tmp, num_records=args.records, shape=shape, shards=args.shards,
                                        num_classes=args.num_classes,
                                        image_format=args.image_format if args.images else "")
            print(f"wrote {args.records} records of {shape} float16 in {args.shards} shards "
                  f"({time.perf_counter() - t0:.1f} s, {_size_mb(path):.1f} MB) to {path}")
        need = args.step_images_per_s / args.process_count
        print(f"host batch {args.batch // args.process_count} rows (global {args.batch}, "
              f"{args.process_count} process(es)); {os.cpu_count()} CPUs; train step needs "
              f"{need:.0f} samples/s per host ({args.step_images_per_s:.0f} global)")
        print("| workers | samples/s per host | ms per host batch | x step need | warm-up s |")
        print("|---:|---:|---:|---:|---:|")
        for w in workers:
            r = measure(path, batch=args.batch, process_count=args.process_count, workers=w,
                        threads=args.threads, buffer=args.buffer, batches=args.batches,
                        warmup=args.warmup, images=args.images, num_classes=args.num_classes)
            print(f"| {w} | {r['samples_per_s']:.0f} | {r['ms_per_batch']:.1f} | "
                  f"{r['samples_per_s'] / need:.1f}x | {r['warmup_s']:.1f} |", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


if __name__ == "__main__":
    raise SystemExit(main())
