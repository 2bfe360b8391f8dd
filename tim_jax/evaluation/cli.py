"""``python -m tim_jax.evaluate``: FID and Inception Score vs number of steps, in one resumable run.

    python -m tim_jax.evaluate --checkpoint c2i_model_256.safetensors --vae sd-vae-ft-ema \
        --inception pt_inception.safetensors --ref VIRTUAL_imagenet256_labeled.npz \
        --num-samples 50000 --steps 1,2,4,8,32,128 --cfg 1.5 --cfg-interval 0,0.7 --out runs/fid

Writes ``OUT/run.json`` (the settings), ``OUT/chunks/steps{n}/{start:08d}.npz`` (features of
``--chunk-size`` samples; a rerun with the same settings continues where a killed run stopped),
``OUT/stats/steps{n}.npz`` (mu, sigma of the samples), ``OUT/results.json``, ``OUT/results.md``,
``OUT/fid_vs_nfe.png`` and with ``--save-png N`` / ``--save-npz`` the first N samples as PNGs /
all samples as an ADM-style ``OUT/samples/steps{n}.npz``. ``python -m tim_jax.evaluate prompts``
writes the GenEval / DPG-Bench / MJHQ-30K folders of a text-to-image model (``prompts --help``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "parse_int_list", "parse_interval", "problems", "run_settings",
           "check_resume", "fingerprint"]

RUN_FILE = "run.json"
INCOMPLETE = 3  # exit status when --max-chunks stopped the run before the end


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give step counts >= 1, e.g. 1,2,4,8")
    return sorted(set(values))


def parse_interval(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH (e.g. 0,0.7)")
    if not low < high:
        raise argparse.ArgumentTypeError(f"guidance interval {text!r} needs LOW < HIGH")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.evaluate",
        description="FID and Inception Score of a class-conditional TiM for several step counts "
                    "(features computed on device as samples are made; resumable). For the "
                    "text-to-image benchmark folders see `python -m tim_jax.evaluate prompts "
                    "--help`.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", required=True, help="official TiM file, converted directory "
                   "(python -m tim_jax.convert) or EMA export directory")
    m.add_argument("--preset", help="architecture of an official file (default: inferred)")
    m.add_argument("--ema", action="store_true", help="take the EMA weights of an official "
                   "training checkpoint holding both")
    m.add_argument("--vae", required=True, help="autoencoder Hub folder (sd-vae-ft-ema, DC-AE)")
    m.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="TiM compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    s = p.add_argument_group("sampling")
    s.add_argument("--num-samples", type=int, default=50_000, help="samples per step count")
    s.add_argument("--steps", type=parse_int_list, default=parse_int_list("1,2,4,8,32,128"),
                   help="comma-separated step counts")
    s.add_argument("--cfg", type=float, default=1.0, help="guidance scale (> 1 guides)")
    s.add_argument("--cfg-interval", type=parse_interval, default=(0.0, 1.0),
                   help="LOW,HIGH: guidance where LOW*T_max < t < HIGH*T_max")
    s.add_argument("--stochasticity", type=float, default=0.0,
                   help="OT-FM SDE ratio in [0, 1) (official 500-NFE setting: 0.2); > 0 makes "
                        "the samples depend on --batch-size")
    s.add_argument("--mode", default="transition", choices=("transition", "diffusion"))
    s.add_argument("--image-size", type=int, help="square image side (default: trained size)")
    s.add_argument("--labels", default="uniform", choices=("uniform", "balanced"),
                   help="class labels: i.i.d. uniform as the official sampler, or exactly "
                        "balanced")
    s.add_argument("--seed", type=int, default=0, help="noise of sample i: fold_in(key(seed), i)")
    s.add_argument("--batch-size", type=int, default=256, help="samples per device batch "
                   "(all local devices together)")
    f = p.add_argument_group("FID")
    f.add_argument("--inception", required=True, help="pytorch-fid Inception weights converted "
                   "to safetensors (see docs/evaluation.md)")
    f.add_argument("--inception-size", type=int, default=299, help="Inception input side; 299 "
                   "is the standard (others only for smoke tests)")
    r = f.add_mutually_exclusive_group()
    r.add_argument("--ref", help="reference statistics .npz (mu/sigma, e.g. ADM's "
                   "VIRTUAL_imagenet256_labeled.npz)")
    r.add_argument("--ref-images", help=".npz with reference images arr_0 (N, H, W, 3) uint8, "
                   "run through our Inception (e.g. the images of the ADM reference batch)")
    r.add_argument("--ref-from-records", metavar="DIR", help="`python -m tim_jax.prepare` "
                   "output whose records carry the crops as image bytes")
    f.add_argument("--ref-limit", type=int, help="use the first N reference images only")
    o = p.add_argument_group("output and running")
    o.add_argument("--out", required=True, help="output directory (rerun to resume)")
    o.add_argument("--chunk-size", type=int, help="samples per resumable chunk (default 1000, "
                   "or the value of an existing run)")
    o.add_argument("--save-npz", action="store_true", help="also write OUT/samples/steps{n}.npz "
                   "(arr_0 uint8 images, arr_1 labels) for the ADM evaluator; ~10 GB per 50k")
    o.add_argument("--save-png", type=int, default=0, metavar="N",
                   help="save the first N samples of every step count as PNGs")
    o.add_argument("--process-index", type=int, help="this process (default jax.process_index())")
    o.add_argument("--process-count", type=int, help="processes sharing the chunks (default "
                   "jax.process_count())")
    o.add_argument("--max-chunks", type=int, help="make at most this many chunks, then stop "
                   f"with exit status {INCOMPLETE} (rerun to continue)")
    o.add_argument("--wait-timeout", type=float, default=24 * 3600.0, help="seconds process 0 "
                   "waits for the chunks of the other processes")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def problems(args) -> list[str]:
    """Everything checkable without loading a network."""
    from tim_jax.evaluation.inception import FID_WEIGHTS_URL, MIN_INPUT_SIZE

    out = []
    if not Path(args.checkpoint).exists():
        out.append(f"--checkpoint {args.checkpoint} does not exist")
    if not (Path(args.vae) / "config.json").is_file():
        out.append(f"--vae {args.vae} is not an autoencoder Hub folder (no config.json)")
    inc = Path(args.inception)
    if inc.suffix in (".pth", ".pt"):
        out.append(f"--inception {inc} is the torch file: convert it once to safetensors with "
                   "python -c \"from tim_jax.evaluation.inception import "
                   f"convert_pytorch_fid_weights as c; c('{inc}', 'pt_inception.safetensors')\"")
    elif not inc.is_file():
        out.append(f"--inception {inc} does not exist: download {FID_WEIGHTS_URL} and convert it "
                   "(see docs/evaluation.md)")
    for name in ("ref", "ref_images"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            out.append(f"--{name.replace('_', '-')} {path} does not exist")
    if args.ref_from_records and not Path(args.ref_from_records).is_dir():
        out.append(f"--ref-from-records {args.ref_from_records} is not a directory")
    if args.num_samples < 2:
        out.append("--num-samples must be >= 2 (a covariance needs two samples)")
    if args.inception_size < MIN_INPUT_SIZE:
        out.append(f"--inception-size must be >= {MIN_INPUT_SIZE}")
    for name in ("batch_size", "chunk_size", "ref_limit", "max_chunks", "process_count"):
        v = getattr(args, name)
        if v is not None and v < 1:
            out.append(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not 0.0 <= args.stochasticity < 1.0:
        out.append(f"--stochasticity must be in [0, 1), got {args.stochasticity}")
    if not 0 <= args.seed < 2 ** 32:
        out.append(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.save_png < 0:
        out.append("--save-png must be >= 0")
    return out


def run_settings(args, dtype: str) -> dict:
    """What determines the samples and their features (compared on resume)."""
    inc = Path(args.inception).resolve()
    return {
        "checkpoint": str(Path(args.checkpoint).resolve()), "preset": args.preset,
        "ema": bool(args.ema), "vae": str(Path(args.vae).resolve()), "dtype": dtype,
        "inception": str(inc), "inception_bytes": inc.stat().st_size,
        "inception_size": args.inception_size, "num_samples": args.num_samples,
        "seed": args.seed, "label_balance": args.labels, "image_size": args.image_size,
        "cfg_scale": args.cfg, "cfg_interval": list(args.cfg_interval),
        "stochasticity": args.stochasticity, "mode": args.mode, "chunk_size": args.chunk_size,
        "batch_size_for_noise": args.batch_size if args.stochasticity > 0 else None,
    }


def check_resume(out: Path, settings: dict) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("settings", {})
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise SystemExit("error: " + f"{out} holds a run with other settings ("
                         + "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
                         + "); use another --out, or delete the directory")


def fingerprint(settings: dict, steps: int) -> str:
    blob = json.dumps({**settings, "steps": steps}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prompts":
        from tim_jax.evaluation.prompts_cli import main as prompts_main

        return prompts_main(argv[1:])
    if argv and argv[0] == "fid":
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    found = problems(args)
    if found:
        parser.error("\n  ".join(found))
    if args.chunk_size is None:
        old = Path(args.out) / RUN_FILE
        args.chunk_size = (json.loads(old.read_text())["settings"].get("chunk_size") or 1000
                           if old.is_file() else 1000)
    from tim_jax.evaluation.run_fid import run

    return run(args, parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
