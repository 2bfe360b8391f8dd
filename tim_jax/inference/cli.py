"""``python -m tim_jax.sample``: pictures from TiM weights on the command line.

    python -m tim_jax.sample --checkpoint c2i_model_256.safetensors --vae sd-vae-ft-ema \\
        --labels 207,360,387,974 --steps 1,2,4,8 --cfg 2.5 --cfg-interval 0,0.6 --out samples/
    python -m tim_jax.sample --checkpoint t2i_model.bin --preset t2i_xl1 \\
        --vae dc-ae-f32c32-sana-1.1-diffusers --text-encoder gemma-3-1b-it \\
        --prompt "a red fox in the snow" --steps 4 --cfg 2.5 --size 1024x768 --out samples/

Writes, for every step count N: ``OUT/steps_N/IIII_<label or prompt>.png`` (one per sample),
``OUT/grid_steps_N.png``, and ``OUT/settings.json`` (every setting, the resolved model config
and the files written). Every input problem (missing or mismatched files, a bad label, prompts
for a class model, a bad size, ...) is reported as ``error: ...`` with exit status 2 before
anything is compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Sequence

EPILOG = """\
sizes: --size WIDTHxHEIGHT (or one number for a square); each side must be a multiple of
  VAE factor x patch size (SD-VAE f8 with patch 2: 16 px; DC-AE f32 with patch 1: 32 px).
  Default: the size the model was trained at.
labels: comma-separated ImageNet class ids, or random:N for N labels drawn uniformly (seeded
  by --seed), as the official C2I sampler draws them.
guidance: --cfg S applies classifier-free guidance (S > 1) where low*T_max < t < high*T_max
  (--cfg-interval low,high); official C2I-256 multi-step: --cfg 2.5 --cfg-interval 0,0.6.
noise: sample i starts from normal(fold_in(key(seed), i)): the same picture for the same
  (seed, i, condition, settings) whatever the batch size or number of devices.
exit status: 0 done, 2 bad input (nothing compiled)."""


class UsageError(ValueError):
    """Bad command-line input, reported as ``error: ...`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.sample", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample pictures from a TiM checkpoint (official file, converted directory "
                    "or EMA export) at one or more step counts.")
    w = p.add_argument_group("weights")
    w.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="official TiM file (.safetensors; .bin needs torch), a directory from "
                        "`python -m tim_jax.convert`, or an EMA export directory")
    w.add_argument("--preset", help="architecture of an official file (default: inferred from "
                                    "its tensor shapes)")
    w.add_argument("--vae", required=True, metavar="DIR",
                   help="diffusers autoencoder folder (stabilityai/sd-vae-ft-ema, "
                        "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers)")
    w.add_argument("--text-encoder", metavar="DIR", help="T2I: Gemma-3 folder "
                                                         "(google/gemma-3-1b-it)")
    w.add_argument("--tokenizer", metavar="DIR", help="T2I: tokenizer folder with tokenizer.json "
                                                      "(default: the --text-encoder folder)")
    w.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="TiM / Gemma compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    w.add_argument("--ema", action="store_true",
                   help="official wrapper checkpoints holding raw and EMA weights: take the EMA")
    c = p.add_argument_group("conditions (one of)").add_mutually_exclusive_group(required=True)
    c.add_argument("--labels", help="class ids, e.g. 207,360, or random:N")
    c.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    c.add_argument("--prompts-file", metavar="FILE", help="text file, one prompt per line")
    s = p.add_argument_group("sampling")
    s.add_argument("--per-condition", type=int, default=1, metavar="K",
                   help="samples per label / prompt (default 1)")
    s.add_argument("--steps", default="1,2,4,8", help="step counts, comma-separated "
                                                      "(default 1,2,4,8)")
    s.add_argument("--cfg", type=float, default=1.0, help="guidance scale (default 1: none)")
    s.add_argument("--cfg-interval", default="0,1", metavar="LOW,HIGH",
                   help="guidance window as fractions of T_max (default 0,1)")
    s.add_argument("--stochasticity", type=float, default=0.0,
                   help="OT-FM SDE ratio in [0, 1) (default 0)")
    s.add_argument("--mode", default="transition", choices=("transition", "diffusion"))
    s.add_argument("--size", help="WIDTHxHEIGHT in pixels (default: the trained size)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, help="samples per batch (default: all at once)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR", help="output directory")
    o.add_argument("--grid-cols", type=int, help="grid columns (default: --per-condition if > 1, "
                                                 "else about sqrt(N))")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} {text!r} must be comma-separated integers") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


def _cfg_interval(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--cfg-interval {text!r} must be LOW,HIGH (e.g. 0,0.6)") from None
    return low, high


def _check_paths(args) -> None:
    for flag, value in (("--checkpoint", args.checkpoint), ("--vae", args.vae),
                        ("--text-encoder", args.text_encoder), ("--tokenizer", args.tokenizer),
                        ("--prompts-file", args.prompts_file)):
        if value is not None and not os.path.exists(value):
            raise UsageError(f"{flag} {value}: no such file or directory")


def _conditions(args, num_classes: int | None) -> tuple[list | None, list | None]:
    """(labels, prompts), each repeated --per-condition times (sample-major per condition)."""
    from tim_jax.inference.request import random_labels

    k = args.per_condition
    if k < 1:
        raise UsageError(f"--per-condition must be >= 1, got {k}")
    if args.labels is not None:
        text = args.labels.strip()
        if text.startswith("random:"):
            if num_classes is None:
                raise UsageError("--labels given for a text-to-image (t2i) model: give --prompt "
                                 "or --prompts-file")
            n = _int_list(text[len("random:"):], "--labels random:N")[0]
            if n < 1:
                raise UsageError(f"--labels random:N needs N >= 1, got {n}")
            labels = random_labels(n, num_classes, args.seed)
        else:
            labels = _int_list(text, "--labels")
        return [v for v in labels for _ in range(k)], None
    if args.prompts_file is not None:
        lines = pathlib.Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file {args.prompts_file} holds no prompts")
    else:
        prompts = list(args.prompt)
    return None, [p for p in prompts for _ in range(k)]


def _file_name(i: int, req) -> str:
    from tim_jax.inference.images import slug

    tag = f"class{req.labels[i]}" if req.labels is not None else slug(req.prompts[i])
    return f"{i:04d}_{tag}.png"


def prepare(args):
    """(pipeline, [request per step count]) with every input checked; nothing compiled."""
    from tim_jax.inference.images import parse_size
    from tim_jax.inference.pipeline import TiMPipeline

    _check_paths(args)
    steps = _int_list(args.steps, "--steps")
    if any(n < 1 for n in steps):
        raise UsageError(f"--steps must be integers >= 1, got {steps}")
    interval = _cfg_interval(args.cfg_interval)
    try:
        size = parse_size(args.size) if args.size else (None, None)
    except ValueError as e:
        raise UsageError(f"--size: {e}") from None
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    pipe = TiMPipeline.from_pretrained(args.checkpoint, args.vae, args.text_encoder,
                                       args.tokenizer, preset=args.preset, dtype=args.dtype,
                                       ema=args.ema or None)
    labels, prompts = _conditions(args, pipe.num_classes)
    requests = [pipe.make_request(labels, prompts, num_steps=n, cfg_scale=args.cfg,
                                  cfg_interval=interval, stochasticity=args.stochasticity,
                                  mode=args.mode, height=size[0], width=size[1], seed=args.seed,
                                  batch_size=args.batch_size) for n in steps]
    return pipe, requests


def _settings(args, argv, pipe, requests) -> dict:
    import jax

    from tim_jax import __version__

    first = requests[0].settings()
    shared = {k: v for k, v in first.items() if k != "num_steps"}
    return {
        "command": ["python", "-m", "tim_jax.sample", *argv],
        "checkpoint": os.path.abspath(args.checkpoint), "preset": args.preset,
        "vae": os.path.abspath(args.vae),
        "text_encoder": args.text_encoder and os.path.abspath(args.text_encoder),
        "tokenizer": (args.tokenizer or args.text_encoder) and os.path.abspath(
            args.tokenizer or args.text_encoder),
        "model_config": pipe.model_config.to_dict(), "transport": repr(pipe.transport),
        "vae_kind": pipe.vae.kind, "vae_spatial_factor": pipe.vae.spatial_factor,
        "vae_latent_channels": pipe.vae.latent_channels,
        "steps": [r.num_steps for r in requests], **shared,
        "cfg_interval": [first["cfg_low"], first["cfg_high"]],
        "per_condition": args.per_condition, "dtype": str(pipe.model_config.dtype),
        "devices": pipe.num_devices, "backend": jax.default_backend(),
        "noise": "z_i = jax.random.normal(fold_in(jax.random.key(seed), i), (h, w, C))",
        "tim_jax_version": __version__, "jax_version": jax.__version__, "files": {},
    }


def generate(args, argv, pipe, requests) -> int:
    """Sample every request and write the PNGs, grids and settings.json."""
    from PIL import Image
    from tqdm import tqdm

    from tim_jax.inference.images import image_grid

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(args, argv, pipe, requests)
    n = requests[0].num_samples
    ncols = args.grid_cols or (args.per_condition if args.per_condition > 1 else None)
    bar = tqdm(total=n * len(requests), unit="img", file=sys.stderr, disable=args.no_progress)
    try:
        for req in requests:
            bar.set_description(f"{req.num_steps} step{'s' if req.num_steps > 1 else ''}")
            result = pipe.run(req, progress=bar)
            folder = out / f"steps_{req.num_steps}"
            folder.mkdir(exist_ok=True)
            files = []
            for i, image in enumerate(result.images):
                path = folder / _file_name(i, req)
                Image.fromarray(image).save(path)
                files.append(str(path.relative_to(out)))
            grid = out / f"grid_steps_{req.num_steps}.png"
            Image.fromarray(image_grid(result.images, ncols)).save(grid)
            settings["files"][str(req.num_steps)] = {"images": files,
                                                     "grid": str(grid.relative_to(out))}
    finally:
        bar.close()
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    print(f"wrote {n * len(requests)} images and {len(requests)} grids to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        pipe, requests = prepare(args)
    except (ValueError, FileNotFoundError) as e:  # UsageError is a ValueError
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return generate(args, argv, pipe, requests)
