"""``python -m tim_jax.evaluate prompts``: GenEval / DPG-Bench / MJHQ-30K sample folders of a
text-to-image TiM for several step counts (layouts: :mod:`tim_jax.evaluation.prompt_sets`).

    python -m tim_jax.evaluate prompts --set geneval --checkpoint t2i_model.bin \
        --vae dc-ae-f32c32-sana-1.1-diffusers --text-encoder gemma-3-1b-it \
        --steps 1,8,32,128 --size 1024 --out runs/t2i

writes ``OUT/geneval/steps{n}/`` (the folder the evaluator reads) and ``OUT/geneval/run.json``
(the settings; a rerun with the same settings continues, other settings are refused).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tim_jax.evaluation.cli import INCOMPLETE, parse_int_list, parse_interval
from tim_jax.evaluation.prompt_sets import SAMPLES_PER_PROMPT, SETS

__all__ = ["main", "build_parser", "EVALUATOR_COMMANDS"]

OFFICIAL_CFG = {"geneval": 2.5, "dpg": 2.5, "mjhq": 1.5}  # scripts/sample/t2i/*.sh
EVALUATOR_COMMANDS = {
    "geneval": "python evaluation/evaluate_images.py {dir} --outfile {dir}_results.jsonl "
               "--model-path OBJECT_DETECTOR_FOLDER && python evaluation/summary_scores.py "
               "{dir}_results.jsonl   (in djghosh13/geneval)",
    "dpg": "python dpg_bench/compute_dpg_bench.py --image-root-path {dir} --resolution RES "
           "--pic-num 4 --res-path {dir}_results.txt   (in TencentQQGYLab/ELLA)",
    "mjhq": "python projects/evaluate/mjhq30k/calculate_fid.py MJHQ30K_IMAGES {dir}; "
            "calculate_clip.py CLIP_FEAT.safetensors {dir}   (in WZDTHU/TiM)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.evaluate prompts",
        description="Sample a text-to-image TiM on a benchmark's prompts into the folder layout "
                    "its evaluator reads, for several step counts (resumable).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--set", required=True, choices=SETS, help="benchmark")
    p.add_argument("--prompts", help="prompt file (default: the shipped GenEval / DPG-Bench "
                   "prompts; MJHQ: its meta_data.json, required)")
    p.add_argument("--checkpoint", required=True, help="official TiM-T2I file, converted "
                   "directory or EMA export")
    p.add_argument("--preset", help="architecture of an official file (default: inferred)")
    p.add_argument("--ema", action="store_true", help="EMA weights of a training checkpoint")
    p.add_argument("--vae", required=True, help="DC-AE Hub folder")
    p.add_argument("--text-encoder", required=True, help="Gemma-3 Hub folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the text encoder's)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--steps", type=parse_int_list, default=parse_int_list("1,8,32,128"))
    p.add_argument("--cfg", type=float, help="guidance scale (default: the official script's: "
                   "geneval/dpg 2.5, mjhq 1.5)")
    p.add_argument("--cfg-interval", type=parse_interval, default=(0.0, 1.0))
    p.add_argument("--stochasticity", type=float, default=0.0)
    p.add_argument("--mode", default="transition", choices=("transition", "diffusion"))
    p.add_argument("--size", help="WIDTHxHEIGHT or one side (default: the trained size; the "
                   "official benchmark scripts use 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="images per device batch (default: a whole "
                   "call)")
    p.add_argument("--prompts-per-call", type=int, default=8, help="prompts per pipeline call "
                   "(their caption features share one length, as the official batches)")
    p.add_argument("--samples-per-prompt", type=int, help="default: geneval 4, dpg 4, mjhq 1")
    p.add_argument("--limit", type=int, help="only the first N prompts (smoke tests)")
    p.add_argument("--out", required=True, help="output root: OUT/<set>/steps{n}/")
    p.add_argument("--process-index", type=int, default=None)
    p.add_argument("--process-count", type=int, default=None)
    p.add_argument("--max-groups", type=int, help="generate at most N prompt groups, then stop "
                   f"with exit status {INCOMPLETE} (rerun to continue)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _problems(args) -> list[str]:
    out = []
    if not Path(args.checkpoint).exists():
        out.append(f"--checkpoint {args.checkpoint} does not exist")
    for name in ("vae", "text_encoder", "tokenizer"):
        folder = getattr(args, name)
        if folder and not Path(folder).is_dir():
            out.append(f"--{name.replace('_', '-')} {folder} is not a directory")
    if args.set == "mjhq" and not args.prompts:
        out.append("--set mjhq needs --prompts meta_data.json (see docs/evaluation.md)")
    if args.prompts and not Path(args.prompts).exists():
        out.append(f"--prompts {args.prompts} does not exist")
    for name in ("batch_size", "prompts_per_call", "samples_per_prompt", "limit", "max_groups",
                 "process_count"):
        v = getattr(args, name)
        if v is not None and v < 1:
            out.append(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    found = _problems(args)
    if found:
        parser.error("\n  ".join(found))
    from tim_jax.evaluation import prompt_sets as ps
    from tim_jax.inference.images import parse_size
    from tim_jax.inference.loading import resolve_dtype

    items = ps.load_prompt_set(args.set, args.prompts)[:args.limit]
    height, width = parse_size(args.size) if args.size else (None, None)
    cfg = OFFICIAL_CFG[args.set] if args.cfg is None else args.cfg
    k = args.samples_per_prompt or SAMPLES_PER_PROMPT[args.set]
    sampler = {"cfg_scale": cfg, "cfg_interval": tuple(args.cfg_interval),
               "stochasticity": args.stochasticity, "mode": args.mode, "height": height,
               "width": width, "batch_size": args.batch_size}
    settings = {"set": args.set, "prompts": str(Path(args.prompts).resolve()) if args.prompts
                else "shipped", "num_prompts": len(items), "checkpoint":
                str(Path(args.checkpoint).resolve()), "preset": args.preset, "ema": args.ema,
                "vae": str(Path(args.vae).resolve()), "text_encoder":
                str(Path(args.text_encoder).resolve()), "dtype": resolve_dtype(args.dtype),
                "seed": args.seed,
                "prompts_per_call": args.prompts_per_call, "samples_per_prompt": k,
                **{key: list(v) if isinstance(v, tuple) else v for key, v in sampler.items()}}
    root = Path(args.out) / args.set
    run_file = root / "run.json"
    if run_file.is_file():
        old = json.loads(run_file.read_text()).get("settings", {})
        diff = sorted(key for key in set(old) | set(settings) if old.get(key) != settings.get(key))
        if diff:
            raise SystemExit(f"error: {root} holds samples made with other settings ("
                             + "; ".join(f"{key}: {old.get(key)!r} -> {settings.get(key)!r}"
                                         for key in diff) + "); use another --out")
    from tim_jax.inference import TiMPipeline

    pipe = TiMPipeline.from_pretrained(args.checkpoint, args.vae, args.text_encoder,
                                       args.tokenizer, preset=args.preset, dtype=args.dtype,
                                       ema=args.ema or None)
    pipe.make_request(prompts=[it.prompt for it in items], num_steps=max(args.steps),
                      cfg_scale=cfg, cfg_interval=args.cfg_interval,
                      stochasticity=args.stochasticity, mode=args.mode, height=height,
                      width=width)  # every problem (sizes, vocabulary) before compiling
    root.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"settings": settings, "pipeline": repr(pipe)}, indent=1)
                        + "\n")
    import jax

    pi = jax.process_index() if args.process_index is None else args.process_index
    pc = jax.process_count() if args.process_count is None else args.process_count
    if not 0 <= pi < pc:
        parser.error(f"--process-index {pi} is not in [0, --process-count {pc})")
    done = ps.generate_prompt_set(pipe, args.set, items, root, steps=args.steps,
                                  prompts_per_call=args.prompts_per_call, seed=args.seed,
                                  samples_per_prompt=k, process_index=pi, process_count=pc,
                                  max_groups=args.max_groups, progress=not args.no_progress,
                                  **sampler)
    if not done["complete"]:
        print(f"stopped after --max-groups {args.max_groups}; rerun to continue", flush=True)
        return INCOMPLETE
    for n in args.steps:
        folder = root / f"steps{n}"
        print(f"{folder}: evaluate with\n  " + EVALUATOR_COMMANDS[args.set].format(dir=folder),
              flush=True)
    return 0
