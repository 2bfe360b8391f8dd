"""The work of ``python -m tim_jax.prepare``: load, crop, encode, write shards, then the manifest.

Shard ``s`` of ``S`` holds the inputs ``s, s + S, s + 2S, ...`` (ascending), minus the skipped.
Process ``p`` of ``n`` makes the shards ``p, p + n, ...``. A shard is written to ``.tmp``, its
side file ``<shard>.meta.json`` (counts, skipped / converted / upsampled inputs, latent shapes)
is written, then the shard is renamed into place: a shard file that exists is complete, and a
rerun skips it (a killed run leaves at most ``.tmp`` files, which are rewritten). Process 0 (or
the only process) writes the manifest once every shard exists.

``prepare_settings.json`` in the output directory pins the settings that decide the output
bytes; a rerun with different ones is refused (exit 2) rather than mixing shards.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tim_jax import atomic_files
from tim_jax.data import captions, records
from tim_jax.data.prepare_images import (adm_center_crop, encode_image, native_resize,
                                         open_rgb)
from tim_jax.data.prepare_inputs import InputError

SETTINGS_FILE = "prepare_settings.json"
LATENT_SHAPES_FILE = "latent_shapes.npy"
META_SUFFIX = ".meta.json"
_IN_FLIGHT = 2  # device calls dispatched ahead of the one being fetched
_WAIT_POLL_S = 10.0


@dataclass
class Loaded:
    """One input after loading: ``pixels`` (H, W, 3) uint8, or ``skip`` (a reason)."""
    index: int
    key: str
    label: int = -1
    caption: str | None = None
    pixels: np.ndarray | None = None
    image: bytes | None = None
    skip: str | None = None
    notes: dict = field(default_factory=dict)


def shard_path(plan, s: int) -> str:
    return os.path.join(plan.out, records.shard_file_name(s, plan.num_shards))


def check_out_dir(plan) -> None:
    """Create the output directory, or check a previous run's settings match (InputError)."""
    os.makedirs(plan.out, exist_ok=True)
    path = os.path.join(plan.out, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("settings_sha256") != plan.settings_sha256:
            prev = old.get("settings", {})
            diff = sorted(k for k in set(prev) | set(plan.settings)
                          if prev.get(k) != plan.settings.get(k))
            raise InputError(f"--out {plan.out} holds records made with different settings "
                             f"(differing: {', '.join(diff) or 'format'}); use a new --out "
                             "or delete that directory")
    else:
        records.write_json_atomic(path, {"settings_sha256": plan.settings_sha256,
                                         "settings": plan.settings})


def load_one(plan, index: int) -> Loaded:
    """Load, convert and crop input ``index``; never raises (bad input -> ``skip``)."""
    args = plan.args
    try:
        source, key, label, caption = plan.inputs.load(index)
    except Exception as exc:  # noqa: BLE001 - any bad input is skipped, with its reason
        return Loaded(index, plan.inputs.fallback_key(index), skip=_reason(exc))
    rec = Loaded(index, key, label=label, caption=caption)
    try:
        img, note = open_rgb(source)
        if note:
            rec.notes["converted"] = note
        w, h = img.size
        if args.native:
            rec.pixels = native_resize(img, plan.multiple, plan.max_area)
            small = w < plan.multiple or h < plan.multiple
        else:
            rec.pixels = adm_center_crop(img, args.size)
            small = min(w, h) < args.size
        if small:
            rec.notes["upsampled"] = [w, h]
        if args.keep_images:
            rec.image = encode_image(rec.pixels, args.image_format, args.jpeg_quality)
    except Exception as exc:  # noqa: BLE001
        rec.pixels, rec.skip = None, f"unreadable image: {_reason(exc)}"
    return rec


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _record_fields(rec: Loaded, latent, latent_flip, caption_features=None) -> dict:
    fields = {"latent": latent, "latent_flip": latent_flip, "label": int(rec.label),
              "index": int(rec.index), "key": rec.key}
    if rec.image is not None:
        fields["image"] = rec.image
    if rec.caption is not None:
        fields["caption"] = rec.caption
    if caption_features is not None:
        fields[captions.FEATURES_FIELD] = caption_features
    return fields


class _ShardWriter:
    """Encodes one shard's loaded records in batches (grouped by image size) and writes it."""

    def __init__(self, plan, encoder, progress, caption_encoder=None):
        self.plan, self.encoder, self.progress = plan, encoder, progress
        self.caption_encoder = caption_encoder

    def write(self, s: int, futures) -> None:
        groups: dict[tuple, list[Loaded]] = collections.defaultdict(list)
        inflight: collections.deque = collections.deque()
        done: dict[int, tuple] = {}
        loaded: list[Loaded] = []
        for fut in futures:
            rec = fut.result()
            loaded.append(rec)
            if rec.skip:
                self.progress.update(1)
                continue
            group = groups[rec.pixels.shape]
            group.append(rec)
            if len(group) == self.encoder.batch_size:
                inflight.append(self._dispatch(groups.pop(rec.pixels.shape)))
                while len(inflight) > _IN_FLIGHT:
                    self._fetch(inflight.popleft(), done)
        for group in groups.values():
            inflight.append(self._dispatch(group))
        while inflight:
            self._fetch(inflight.popleft(), done)
        self._commit(s, loaded, done)

    def _dispatch(self, group):
        pixels = np.stack([r.pixels for r in group])
        exact = not self.plan.args.native
        return group, self.encoder.dispatch(pixels, [r.index for r in group],
                                            exact_batches=exact)

    def _fetch(self, item, done) -> None:
        group, handle = item
        lat, lat_flip, finite = self.encoder.fetch(handle)
        for i, rec in enumerate(group):
            done[rec.index] = (lat[i], lat_flip[i], bool(finite[i]))
        self.progress.update(len(group))

    def _caption_features(self, loaded: list[Loaded], done: dict) -> dict:
        """--text-encoder: {index: (L_i, hidden) float16} of the records with finite latents."""
        if self.caption_encoder is None:
            return {}
        todo = [r for r in loaded if not r.skip and done[r.index][2]]
        feats = self.caption_encoder.encode([r.caption for r in todo], dtype=np.float16)
        return {r.index: f for r, f in zip(todo, feats)}

    def _commit(self, s: int, loaded: list[Loaded], done: dict) -> None:
        meta = {"shard": s, "file": os.path.basename(shard_path(self.plan, s)),
                "settings_sha256": self.plan.settings_sha256, "skipped": [], "converted": [],
                "upsampled": [], "latent_shapes": [], "fields": {}}
        blobs = []
        feats = self._caption_features(loaded, done)
        for rec in sorted(loaded, key=lambda r: r.index):
            if not rec.skip and not done[rec.index][2]:
                rec.skip = "non-finite latent (overflow of the stored dtype?)"
            if not rec.skip and feats and not np.isfinite(feats[rec.index]).all():
                rec.skip = "non-finite caption features (overflow of float16?)"
            if rec.skip:
                meta["skipped"].append({"key": rec.key, "index": rec.index, "reason": rec.skip})
                continue
            latent, latent_flip, _ = done.pop(rec.index)
            if "converted" in rec.notes:
                meta["converted"].append({"key": rec.key, "index": rec.index,
                                          "note": rec.notes["converted"]})
            if "upsampled" in rec.notes:
                meta["upsampled"].append({"key": rec.key, "index": rec.index,
                                          "size": rec.notes["upsampled"]})
            fields = _record_fields(rec, latent, latent_flip, feats.get(rec.index))
            if feats:
                meta["caption_max_tokens"] = max(meta.get("caption_max_tokens", 0),
                                                 len(feats[rec.index]))
            spec = {k: records.field_spec(v) for k, v in fields.items()}
            meta["fields"] = records.merge_field_specs(meta["fields"], spec)
            meta["latent_shapes"].append(list(latent.shape))
            blobs.append(records.encode_record(fields))
        meta["num_records"] = len(blobs)
        path = shard_path(self.plan, s)
        records.write_shard(path, blobs, before_commit=lambda _: records.write_json_atomic(
            path + META_SUFFIX, meta, indent=None))


_ENCODER_CACHE: dict = {}


def _encoder(plan, compiler_options):
    """The PairEncoder for ``plan`` (kept for one reuse in this process: repeated in-process
    runs with the same autoencoder skip reloading and recompiling)."""
    import jax.numpy as jnp

    from tim_jax.data.prepare_encode import PairEncoder
    from tim_jax.encoders.autoencoder import load_autoencoder

    args = plan.args
    key = (plan.vae["folder"], plan.vae["config_sha256"], args.dtype, args.posterior,
           args.seed, args.batch_size, args.latent_dtype, repr(compiler_options))
    if key not in _ENCODER_CACHE:
        for k in [k for k in _ENCODER_CACHE if k[0] != "text"]:
            del _ENCODER_CACHE[k]
        codec = load_autoencoder(args.vae, dtype=getattr(jnp, args.dtype))
        if codec.spatial_factor != plan.vae["spatial_factor"]:
            raise RuntimeError(f"{args.vae}: loaded spatial factor {codec.spatial_factor}, "
                               f"config implies {plan.vae['spatial_factor']}")
        _ENCODER_CACHE[key] = PairEncoder(
            codec, posterior=args.posterior, seed=args.seed, batch_size=args.batch_size,
            latent_dtype=np.dtype(args.latent_dtype), compiler_options=compiler_options)
    return _ENCODER_CACHE[key]


def _caption_encoder(plan, compiler_options):
    """--text-encoder: the CaptionEncoder (kept for one reuse in this process, as _encoder)."""
    te = plan.text_encoder
    if te is None:
        return None
    args = plan.args
    key = ("text", te["folder"], te["tokenizer_folder"], te["config_sha256"], args.text_dtype,
           args.batch_size, repr(compiler_options))
    if key not in _ENCODER_CACHE:
        for k in [k for k in _ENCODER_CACHE if k[0] == "text"]:
            del _ENCODER_CACHE[k]
        _ENCODER_CACHE[key] = captions.CaptionEncoder(
            te["folder"], te["tokenizer_folder"], dtype=args.text_dtype,
            batch_size=args.batch_size, compiler_options=compiler_options)
    return _ENCODER_CACHE[key]


def _processes(plan) -> tuple[int, int]:
    args = plan.args
    if args.distributed:
        import jax

        jax.distributed.initialize()
    if args.process_count is not None:
        return args.process_index, args.process_count
    import jax

    return jax.process_index(), jax.process_count()


def run(plan, *, compiler_options: dict | None = None) -> str:
    """Make this process's missing shards, then (process 0) the manifest; a summary line."""
    from tqdm.auto import tqdm

    proc, nproc = _processes(plan)
    mine = [s for s in range(plan.num_shards) if s % nproc == proc]
    todo = [s for s in mine if not os.path.exists(shard_path(plan, s))]
    n_items = len(plan.inputs)
    total = sum(len(range(s, n_items, plan.num_shards)) for s in todo)
    if todo:
        encoder = _encoder(plan, compiler_options)
        progress = tqdm(total=total, unit="img", desc=f"encode (process {proc})",
                        dynamic_ncols=True, mininterval=1.0)
        writer = _ShardWriter(plan, encoder, progress, _caption_encoder(plan, compiler_options))
        pool = ThreadPoolExecutor(max_workers=plan.args.workers)
        try:
            submit = lambda s: [pool.submit(load_one, plan, i)  # noqa: E731
                                for i in range(s, n_items, plan.num_shards)]
            pending = submit(todo[0])
            for k, s in enumerate(todo):  # loads of shard k + 1 overlap the encoding of k
                current, pending = pending, (submit(todo[k + 1]) if k + 1 < len(todo) else [])
                writer.write(s, current)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
    made = f"{len(todo)} shard(s) made, {len(mine) - len(todo)} already present"
    if proc != 0:
        return f"process {proc}/{nproc}: {made}; process 0 writes the manifest"
    manifest = finish(plan, wait=nproc > 1, compiler_options=compiler_options)
    return (f"{made}; {plan.out}: {manifest['num_records']} records in "
            f"{len(manifest['shards'])} shards, {len(manifest['skipped'])} skipped")


def _wait_for_shards(plan) -> None:
    last = 0.0
    while True:
        missing = [s for s in range(plan.num_shards) if not os.path.exists(shard_path(plan, s))]
        if not missing:
            return
        if time.monotonic() - last > 60:
            print(f"waiting for {len(missing)} shard(s) from other processes (first: "
                  f"{records.shard_file_name(missing[0], plan.num_shards)})", file=sys.stderr)
            last = time.monotonic()
        time.sleep(_WAIT_POLL_S)


def finish(plan, *, wait: bool = False, compiler_options: dict | None = None) -> dict:
    """Assemble (and write, unless identical but for ``created``) the manifest from the shards'
    side files; native runs also get ``latent_shapes.npy``, --text-encoder runs the null
    captions (:func:`captions.write_null_captions`). Returns the manifest."""
    if wait:
        _wait_for_shards(plan)
    metas = []
    for s in range(plan.num_shards):
        path = shard_path(plan, s)
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: cannot write the manifest")
        with open(path + META_SUFFIX, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("settings_sha256") != plan.settings_sha256:
            raise RuntimeError(f"{path}{META_SUFFIX}: made with other settings")
        metas.append(meta)
    manifest = build_manifest(plan, metas)
    old = None
    if os.path.exists(os.path.join(plan.out, records.MANIFEST)):
        old = records.read_manifest(plan.out)
    shapes_path = os.path.join(plan.out, LATENT_SHAPES_FILE)
    stale = old is None or {**old, "created": None} != {**manifest, "created": None}
    if plan.text_encoder is not None:
        null_files = [os.path.join(plan.out, n) for n in
                      (captions.NULL_CAPTION_FILE, captions.NULL_CAPTION_FULL_FILE)]
        if stale or not all(os.path.exists(p) for p in null_files):
            null = _caption_encoder(plan, compiler_options).null()
            captions.write_null_captions(
                plan.out, null, max(1, manifest["text_encoder"]["caption_max_tokens"]))
    if stale or (plan.args.native and not os.path.exists(shapes_path)):
        if plan.args.native:
            shapes = [sh for m in metas for sh in m["latent_shapes"]]
            arr = np.asarray(shapes, np.int64).reshape(-1, 3)
            atomic_files.save_npy(shapes_path, arr)
        records.write_manifest(plan.out, manifest)
        return manifest
    return old


def build_manifest(plan, metas: list[dict]) -> dict:
    """The manifest (schema: ``docs/data-format.md``) from the shards' side files."""
    import tim_jax
    from tim_jax.encoders.autoencoder import official_latent_stats

    args, vae = plan.args, plan.vae
    fields: dict = {}
    buckets: collections.Counter = collections.Counter()
    for m in metas:
        fields = records.merge_field_specs(fields, m["fields"])
        buckets.update(tuple(sh[:2]) for sh in m["latent_shapes"])
    mean, std = official_latent_stats(vae["scaling_factor"], vae["latent_channels"])
    f, c = vae["spatial_factor"], vae["latent_channels"]
    mode = ("deterministic" if vae["class_name"] != "AutoencoderKL" else args.posterior)
    norm = {
        "pixels": "x = (uint8 / 255 - 0.5) / 0.5, NHWC in [-1, 1] (ToTensor + Normalize(0.5))",
        "latent": "(z - mean) / std per channel, z = encoder output (official TiM wrappers)",
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "posterior": mode,
        "flip": "latent_flip = encode(x[:, :, ::-1]), the horizontal mirror, own noise",
        "latent_dtype": args.latent_dtype, "compute_dtype": args.dtype,
    }
    if mode == "sample":
        norm.update(seed=args.seed, noise_keys="k = fold_in(key(seed), index); "
                    "(k_latent, k_latent_flip) = split(k); z = posterior_mean + "
                    "exp(posterior_logvar / 2) * normal(k_latent, (1, h, w, c)), "
                    "likewise for the mirror with k_latent_flip")
    vae_out = {k: vae[k] for k in ("folder", "class_name", "spatial_factor", "latent_channels",
                                   "scaling_factor", "config_sha256")}

    def gather(name):
        return [item for m in metas for item in m[name]]

    manifest = {
        "format": records.FORMAT, "version": records.VERSION,
        "num_records": sum(m["num_records"] for m in metas),
        "shards": [{"file": m["file"], "num_records": m["num_records"]} for m in metas],
        "fields": fields,
        "latent_shape": None if args.native else [args.size // f, args.size // f, c],
        "vae": vae_out, "normalisation": norm,
        "image_size": None if args.native else args.size,
        "native": bool(args.native),
        "class_names": list(plan.inputs.class_names),
        "num_classes": len(plan.inputs.class_names),
        "skipped": sorted(gather("skipped"), key=lambda d: d["index"]),
        "converted": sorted(gather("converted"), key=lambda d: d["index"]),
        "upsampled": sorted(gather("upsampled"), key=lambda d: d["index"]),
        "num_inputs": len(plan.inputs),
        "source": plan.inputs.describe(),
        "preprocessing": ("native-resolution resize (official image_nr_latent_c2i)"
                          if args.native else "ADM centre crop (official image_latent_c2i)"),
        "keep_images": bool(args.keep_images),
        "image_format": args.image_format if args.keep_images else None,
        "settings_sha256": plan.settings_sha256,
        "tim_jax_version": tim_jax.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if plan.text_encoder is not None:
        manifest["text_encoder"] = {
            **{k: plan.text_encoder[k] for k in ("folder", "tokenizer_folder", "model_type",
                                                 "hidden_size", "config_sha256",
                                                 "tokenizer_sha256", "dtype", "max_length",
                                                 "escape", "feature", "storage_dtype")},
            "caption_max_tokens": max((m.get("caption_max_tokens", 0) for m in metas),
                                      default=0),
            "null_caption": captions.NULL_CAPTION_FILE,
            "null_caption_full": captions.NULL_CAPTION_FULL_FILE}
    if args.native:
        manifest.update(
            native_multiple=plan.multiple, max_area=plan.max_area, patch_size=args.patch_size,
            bucket_key="latent.shape[:2] (latent h, w)", latent_shapes_file=LATENT_SHAPES_FILE,
            latent_buckets=[{"latent_hw": list(k), "num_records": n}
                            for k, n in sorted(buckets.items())])
    return manifest
