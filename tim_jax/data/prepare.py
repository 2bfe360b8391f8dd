"""``python -m tim_jax.prepare``: images -> TiM's normalised latents in ArrayRecord shards.

Reproduces the official preprocessing (``projects/preprocess/image_latent_c2i.py`` and
``image_nr_latent_c2i.py`` of WZDTHU/TiM): ADM centre crop (or, with ``--native``, the official
native-resolution resize), pixels to [-1, 1], the latent of the crop AND of its horizontal
mirror, normalised as the official VAE wrappers do; for the SD-VAE a posterior SAMPLE as the
official stores (``--posterior mean`` for the mean). Records and manifest:
``docs/data-format.md`` and :mod:`tim_jax.data.records`.

This module parses and checks the arguments (no JAX import: bad arguments exit with status 2
before any work) and lists the inputs; :mod:`tim_jax.data.prepare_shards` does the work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tim_jax.data.prepare_inputs import FolderInputs, InputError, TfdsInputs

AUTO_SHARD_TARGET = 1000  # records per shard the default shard count aims at
MIN_AUTO_SHARDS = 64

EPILOG = """\
examples:
  python -m tim_jax.prepare --images /data/imagenet/train --vae /ckpt/sd-vae-ft-ema \\
      --size 256 --out /data/latents/sdvae-256
  python -m tim_jax.prepare --tfds imagenet2012 --split train --data-dir /data/tfds \\
      --vae /ckpt/dc-ae-f32c32-sana-1.1-diffusers --size 512 --out /data/latents/dcae-512
  python -m tim_jax.prepare --images /data/imagenet/train --vae /ckpt/sd-vae-ft-ema \\
      --native --max-area 65536 --patch-size 2 --keep-images --out /data/latents/sdvae-nr
  python -m tim_jax.prepare --images /data/t2i --captions /data/t2i/captions.jsonl \\
      --vae /ckpt/dc-ae-f32c32-sana-1.1-diffusers --text-encoder /ckpt/gemma-3-1b-it \\
      --native --max-area 262144 --patch-size 1 --out /data/latents/t2i-512
A rerun with the same arguments resumes: finished shards are kept, missing ones are made.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.prepare", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Encode an image dataset into TiM's normalised VAE latents (crop + "
                    "horizontal mirror per record), written as ArrayRecord shards + manifest.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="image folder, ImageNet train layout "
                     "(DIR/<class>/<image>; class index = position of the sorted class names)")
    src.add_argument("--tfds", metavar="NAME", help="TFDS image dataset, read with "
                     "tfds.data_source (prepared in array_record format; no TensorFlow)")
    p.add_argument("--split", default="train", help="TFDS split (default: train)")
    p.add_argument("--data-dir", metavar="D", default=None, help="TFDS data directory")
    p.add_argument("--captions", metavar="FILE.jsonl", default=None,
                   help='T2I: JSONL of {"image": path relative to --images, "caption": text}; '
                        "the records are exactly these images (label -1)")
    p.add_argument("--text-encoder", metavar="FOLDER", default=None,
                   help="T2I: Gemma-3 text model folder (config.json + safetensors, e.g. "
                        "google/gemma-3-1b-it); with --captions, each record also stores its "
                        "caption's features (caption_features) and the output directory the "
                        "encoded empty prompt (null_caption.npy)")
    p.add_argument("--tokenizer", metavar="FOLDER", default=None,
                   help="folder with the text encoder's tokenizer.json (default: --text-encoder)")
    p.add_argument("--text-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="text encoder compute dtype (default bfloat16, as the official trainer)")
    p.add_argument("--vae", metavar="FOLDER", required=True,
                   help="diffusers autoencoder folder (config.json + safetensors): "
                        "AutoencoderKL (SD-VAE) or AutoencoderDC (DC-AE)")
    p.add_argument("--out", metavar="DIR", required=True, help="output record directory")
    p.add_argument("--size", type=int, default=256,
                   help="crop side in pixels (default 256); a multiple of the VAE's factor")
    p.add_argument("--native", action="store_true",
                   help="native resolution: no crop, sides snapped to multiples of "
                        "factor x patch, area capped at --max-area (official NR preprocessing)")
    p.add_argument("--max-area", type=int, default=None, metavar="N",
                   help="--native area cap in pixels (default: size**2)")
    p.add_argument("--patch-size", type=int, default=2, metavar="P",
                   help="--native: the model's patch size; sides snap to multiples of "
                        "factor x P (default 2)")
    p.add_argument("--keep-images", action="store_true",
                   help="also store the crop (un-mirrored) as an encoded image (REPA)")
    p.add_argument("--image-format", choices=("png", "jpeg"), default="png",
                   help="encoding of --keep-images (default png, lossless)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--posterior", choices=("sample", "mean"), default="sample",
                   help="SD-VAE: store a posterior sample (the official behaviour, default) or "
                        "the posterior mean; the DC-AE is deterministic")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed: record i uses split(fold_in(key(seed), i))")
    p.add_argument("--latent-dtype", choices=("float16", "float32"), default="float16",
                   help="stored latent dtype (default float16; the official stores float32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="autoencoder compute dtype (default float32, as the official)")
    p.add_argument("--shards", type=int, default=None, metavar="N",
                   help=f"number of shards (default max(min({MIN_AUTO_SHARDS}, records), "
                        f"ceil(records / {AUTO_SHARD_TARGET}))); record i goes to shard i %% N")
    p.add_argument("--batch-size", type=int, default=64, metavar="B",
                   help="records per device call (each 2 images), over all local devices")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="threads decoding and cropping images")
    p.add_argument("--process-index", type=int, default=None,
                   help="this process's index (default: jax.process_index())")
    p.add_argument("--process-count", type=int, default=None,
                   help="number of processes sharing the work (default: jax.process_count())")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host)")
    return p


@dataclass
class Plan:
    """Checked arguments, the listed inputs and the settings that decide the output bytes."""
    args: argparse.Namespace
    inputs: FolderInputs | TfdsInputs
    vae: dict
    text_encoder: dict | None   # --text-encoder: captions.text_encoder_settings + folders
    num_shards: int
    multiple: int | None        # --native: sides snap to multiples of this (factor x patch)
    max_area: int | None
    settings: dict
    settings_sha256: str

    @property
    def out(self) -> str:
        return self.args.out


def vae_geometry(folder: str) -> dict:
    """class_name, spatial_factor, latent_channels, scaling_factor, config_sha256, weights of a
    diffusers autoencoder folder, from its files (no weights loaded)."""
    from tim_jax.encoders import hub

    try:
        config = hub.read_config(folder)
        weights = hub.weight_files(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"--vae: {exc}") from None
    kind = config.get("_class_name")
    if kind == "AutoencoderKL":
        widths = config.get("block_out_channels")
    elif kind == "AutoencoderDC":
        widths = config.get("encoder_block_out_channels")
    else:
        raise InputError(f"--vae {folder}: unsupported autoencoder class {kind!r} "
                         "(AutoencoderKL or AutoencoderDC)")
    if not widths or "latent_channels" not in config or not config.get("scaling_factor"):
        raise InputError(f"--vae {folder}: config.json lacks block widths, latent_channels or "
                         "scaling_factor")
    raw = (Path(folder) / "config.json").read_bytes()
    return {"folder": str(Path(folder).resolve()), "class_name": kind,
            "spatial_factor": 2 ** (len(widths) - 1),
            "latent_channels": int(config["latent_channels"]),
            "scaling_factor": float(config["scaling_factor"]),
            "config_sha256": hashlib.sha256(raw).hexdigest(),
            "weights": [[w.name, w.stat().st_size] for w in weights]}


def default_shards(num_records: int) -> int:
    return max(min(MIN_AUTO_SHARDS, num_records), math.ceil(num_records / AUTO_SHARD_TARGET))


def _text_encoder(args: argparse.Namespace) -> dict | None:
    """The --text-encoder settings (captions.text_encoder_settings + the folders), or None."""
    if args.text_encoder is None:
        if args.tokenizer is not None:
            raise InputError("--tokenizer goes with --text-encoder")
        return None
    if not args.captions:
        raise InputError("--text-encoder encodes the captions of --captions FILE.jsonl; give both")
    from tim_jax.data.captions import text_encoder_settings

    tokenizer = args.tokenizer or args.text_encoder
    try:
        info = text_encoder_settings(args.text_encoder, tokenizer, args.text_dtype)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return {**info, "folder": str(Path(args.text_encoder).resolve()),
            "tokenizer_folder": str(Path(tokenizer).resolve())}


def make_plan(args: argparse.Namespace) -> Plan:
    """Check ``args`` and list the inputs; InputError names the first problem. No JAX."""
    for name in ("size", "batch_size", "workers", "patch_size", "jpeg_quality"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.shards is not None and args.shards < 1:
        raise InputError(f"--shards must be >= 1, got {args.shards}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.captions and args.tfds:
        raise InputError("--captions goes with --images (a JSONL naming files under it)")
    if args.captions and not os.path.isfile(args.captions):
        raise InputError(f"--captions {args.captions}: no such file")
    text_encoder = _text_encoder(args)
    if (args.process_index is None) != (args.process_count is None):
        raise InputError("give both --process-index and --process-count, or neither")
    if args.process_count is not None and not 0 <= args.process_index < args.process_count:
        raise InputError(f"--process-index {args.process_index} outside "
                         f"[0, --process-count {args.process_count})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a directory")
    vae = vae_geometry(args.vae)
    f = vae["spatial_factor"]
    if args.size % f:
        raise InputError(f"--size {args.size} is not a multiple of the VAE's spatial factor {f} "
                         f"({vae['class_name']} in {args.vae})")
    multiple = max_area = None
    if args.native:
        multiple = f * args.patch_size
        max_area = args.max_area if args.max_area is not None else args.size ** 2
        if max_area < multiple ** 2:
            raise InputError(f"--max-area {max_area} is below one {multiple}x{multiple} cell "
                             f"(factor {f} x patch {args.patch_size})")
    elif args.max_area is not None:
        raise InputError("--max-area needs --native")
    if args.images:
        inputs = FolderInputs(args.images, args.captions)
    else:
        inputs = TfdsInputs(args.tfds, args.split, args.data_dir)
    num_shards = args.shards or default_shards(len(inputs))
    settings = {
        "record_format": 1,
        "inputs": {**{k: v for k, v in inputs.describe().items() if k != "root"},
                   "num_inputs": len(inputs), "listing_sha256": inputs.fingerprint()},
        "vae": {k: v for k, v in vae.items() if k != "folder"},
        "dtype": args.dtype, "image_size": args.size, "native": bool(args.native),
        "native_multiple": multiple, "max_area": max_area,
        "keep_images": bool(args.keep_images),
        "image_format": args.image_format if args.keep_images else None,
        "jpeg_quality": args.jpeg_quality if args.keep_images and args.image_format == "jpeg"
        else None,
        "posterior": args.posterior if vae["class_name"] == "AutoencoderKL" else None,
        "seed": args.seed if vae["class_name"] == "AutoencoderKL" else None,
        "latent_dtype": args.latent_dtype, "num_shards": num_shards,
    }
    if text_encoder is not None:  # only then: directories made without it keep their sha
        settings["text_encoder"] = {k: v for k, v in text_encoder.items()
                                    if k not in ("folder", "tokenizer_folder")}
    sha = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()
    return Plan(args=args, inputs=inputs, vae=vae, text_encoder=text_encoder,
                num_shards=num_shards, multiple=multiple,
                max_area=max_area, settings=settings, settings_sha256=sha)


def main(argv: list[str] | None = None, *, compiler_options: dict | None = None) -> int:
    """CLI entry point. ``compiler_options`` (library use, e.g. tests) go to ``jax.jit``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args)
        from tim_jax.data import prepare_shards

        prepare_shards.check_out_dir(plan)
    except InputError as exc:
        parser.error(str(exc))  # exits with status 2
    summary = prepare_shards.run(plan, compiler_options=compiler_options)
    print(summary, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
