"""The FID-vs-steps run behind ``python -m tim_jax.evaluate`` (arguments: :mod:`.cli`).

Order: check the files and the reference layout, load the networks, check every sampler setting,
then (the first compile) make this process's missing chunks step count by step count; process 0
then waits for the other processes' chunks, computes FID / IS per step count and writes the
outputs. ``--max-chunks`` stops early (exit status 3); a rerun continues.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from tim_jax import atomic_files
from tim_jax.evaluation import chunks as ch
from tim_jax.evaluation.cli import INCOMPLETE, RUN_FILE, check_resume, fingerprint, run_settings
from tim_jax.evaluation.fid import GaussianMoments, fid, inception_score, save_statistics
from tim_jax.evaluation.generate import C2IGenerator, SamplerSettings, class_labels

__all__ = ["run"]


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", flush=True)


def _bar(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True,
                disable=not enabled, smoothing=0.1)


def _load_reference_early(args):
    """(mu, sigma, description) of --ref now (before any network loads), or None."""
    if not args.ref:
        return None
    from tim_jax.evaluation.reference import check_reference_file

    mu, sigma = check_reference_file(args.ref)
    return mu, sigma, {"source": str(Path(args.ref).resolve()), "kind": "statistics file"}


def _reference_from_images(args, gen: C2IGenerator, out: Path, progress: bool):
    """Statistics of --ref-images / --ref-from-records through our Inception, cached in
    OUT/ref_stats.npz (reused while the source and the Inception settings are the same)."""
    from tim_jax.evaluation import reference as ref
    from tim_jax.evaluation.fid import load_reference_statistics

    source = args.ref_images or args.ref_from_records
    kind = "images npz" if args.ref_images else "prepared records"
    desc = {"source": str(Path(source).resolve()), "kind": kind, "limit": args.ref_limit,
            "inception": str(Path(args.inception).resolve()),
            "inception_size": args.inception_size}
    cache, meta = out / "ref_stats.npz", out / "ref_stats.json"
    if cache.is_file() and meta.is_file() and json.loads(meta.read_text()) == desc:
        mu, sigma = load_reference_statistics(cache)
        return mu, sigma, {**desc, "cached": str(cache)}
    _log(f"reference statistics from {kind} {source}")
    runner = ref.FeatureRunner(gen.features, mesh=gen.mesh, batch_size=gen.rows)
    with _bar(None, 0, "reference", progress) as bar:
        fn = ref.reference_from_image_npz if args.ref_images else ref.reference_from_records
        moments = fn(source, runner, limit=args.ref_limit, progress=bar)
    mu, sigma = moments.gaussian()
    save_statistics(cache, mu, sigma)
    meta.write_text(json.dumps(desc, indent=1) + "\n")
    return mu, sigma, {**desc, "num_images": moments.count, "cached": str(cache)}


def _save_pngs(gen, settings, labels, n: int, directory: Path, chunk_dir: Path,
               plan: ch.ChunkPlan) -> None:
    """The first ``n`` samples as PNGs (from the chunks when they hold images, else made again:
    the same pixels, as a sample depends only on its index)."""
    from PIL import Image

    n = min(n, plan.num_samples)
    paths = [directory / f"{i:06d}.png" for i in range(n)]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if not todo:
        return
    directory.mkdir(parents=True, exist_ok=True)
    first = ch.read_chunk(ch.chunk_path(chunk_dir, 0))
    if "images" in first and len(first["images"]) >= n:
        images = first["images"][:n]
    else:
        images = gen.generate(np.arange(n), labels[:n], settings, return_images=True)["images"]
    for i in todo:
        tmp = paths[i].with_name(f".{paths[i].name}.tmp{os.getpid()}.png")
        Image.fromarray(images[i]).save(tmp)
        os.replace(tmp, paths[i])


def _save_npz(path: Path, chunk_dir: Path, plan: ch.ChunkPlan, labels: np.ndarray) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_files.save_npz(path, arr_0=ch.collect_images(chunk_dir, plan),
                          arr_1=labels.astype(np.int64))


def run(args, parser) -> int:
    import jax

    from tim_jax.inference.loading import resolve_dtype

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(args.dtype)
    settings = run_settings(args, dtype)
    check_resume(out, settings)
    reference = _load_reference_early(args)
    pi = jax.process_index() if args.process_index is None else args.process_index
    pc = jax.process_count() if args.process_count is None else args.process_count
    if not 0 <= pi < pc:
        parser.error(f"--process-index {pi} is not in [0, --process-count {pc})")
    progress = not args.no_progress

    _log(f"loading {args.checkpoint}, {args.vae}, {args.inception}")
    gen = C2IGenerator.from_files(args.checkpoint, args.vae, args.inception, preset=args.preset,
                                  dtype=dtype, ema=args.ema or None,
                                  inception_size=args.inception_size, batch_size=args.batch_size,
                                  seed=args.seed, image_size=args.image_size)
    samplers = {n: SamplerSettings(n, args.cfg, *args.cfg_interval, args.stochasticity, args.mode)
                for n in args.steps}
    for s in samplers.values():
        gen.check(s)
    if reference is not None and reference[0].shape[0] != gen.features.dim:
        raise ValueError(f"--ref {args.ref}: statistics of dimension {reference[0].shape[0]}, but "
                         f"the features of {gen.features.name} have {gen.features.dim}")
    info = {"image_size": gen.image_size, "num_classes": gen.num_classes,
            "features": f"{gen.features.name} @ {gen.features.size} px (pytorch-fid pool3; "
                        "bias-free logits for IS)",
            "nfe": {str(n): gen.nfe(s) for n, s in samplers.items()}}
    if pi == 0:
        (out / RUN_FILE).write_text(json.dumps({"settings": settings, "info": info}, indent=1)
                                    + "\n")
    labels = class_labels(args.num_samples, gen.num_classes, args.seed, args.labels)
    plan = ch.ChunkPlan(args.num_samples, args.chunk_size)
    _log(f"{gen!r}; {plan.num_chunks} chunk(s) of {plan.chunk_size} per step count; process "
         f"{pi} of {pc}")
    if reference is None and (args.ref_images or args.ref_from_records) and pi == 0:
        reference = _reference_from_images(args, gen, out, progress)

    budget = args.max_chunks
    for n, s in samplers.items():
        d, fp = ch.chunk_dir(out, n), fingerprint(settings, n)
        mine = plan.for_process(pi, pc)
        todo = ch.missing_chunks(d, mine, fp, images=args.save_npz)
        total = sum(b - a for a, b in mine)
        if not todo:
            continue

        def make(a, b, s=s):
            arrays = gen.generate(np.arange(a, b), labels[a:b], s, return_images=args.save_npz)
            return {**arrays, "labels": labels[a:b], "indices": np.arange(a, b, dtype=np.int64)}

        t0 = time.time()
        with _bar(total, total - sum(b - a for a, b in todo), f"{n} steps ({gen.nfe(s)} NFE)",
                  progress) as bar:
            made = ch.make_chunks(d, todo, make, fp, images=args.save_npz, budget=budget,
                                  progress=bar)
        _log(f"{n} steps: made {made} chunk(s) in {time.time() - t0:.1f} s")
        if budget is not None:
            budget -= made
            if budget <= 0 and any(
                    ch.missing_chunks(ch.chunk_dir(out, m), mine, fingerprint(settings, m),
                                      images=args.save_npz) for m in samplers):
                _log(f"stopped after --max-chunks {args.max_chunks}; rerun to continue")
                return INCOMPLETE
    if pi != 0:
        _log("this process's chunks are done; process 0 computes the results")
        return 0

    rows = []
    for n, s in samplers.items():
        d, fp = ch.chunk_dir(out, n), fingerprint(settings, n)
        ch.wait_for_chunks(d, plan, fp, timeout=args.wait_timeout, images=args.save_npz, log=_log)
        stats = ch.collect(d, plan, fp)
        moments: GaussianMoments = stats["moments"]
        (out / "stats").mkdir(exist_ok=True)
        save_statistics(out / "stats" / f"steps{n}.npz", *moments.gaussian())
        row = {"steps": n, "nfe": gen.nfe(s), "num_samples": moments.count,
               "inception_score": inception_score(stats["logits"]),
               "fid": (fid(*moments.gaussian(), reference[0], reference[1])
                       if reference is not None else None)}
        rows.append(row)
        if args.save_png:
            _save_pngs(gen, s, labels, args.save_png, out / "png" / f"steps{n}", d, plan)
        if args.save_npz:
            _save_npz(out / "samples" / f"steps{n}.npz", d, plan, labels)
        _log(f"{n} steps ({row['nfe']} NFE): FID {row['fid']}, IS {row['inception_score']:.3f}")
    from tim_jax.evaluation.report import write_results

    ref_desc = reference[2] if reference is not None else {"source": None, "kind": "none"}
    write_results(out, {**settings, **info}, ref_desc, rows)
    _log(f"wrote {out / 'results.json'}, results.md, fid_vs_nfe.png")
    return 0

