"""CPU demo: train TiM and a flow-matching baseline on a real small dataset and show the any-step property.

    python -m tim_jax.demo                       # digits -> ./tim_demo/
    python -m tim_jax.demo --quick               # 2-D Gaussian mixture -> ./tim_demo_quick/
    python -m tim_jax.demo --help                # every option

Wall times and the figures of the default run: README, "The demo". No download: everything ships with the
installed packages. The pieces: :mod:`~tim_jax.demo.settings` (options, defaults, the two run configs),
:mod:`~tim_jax.demo.data` (datasets), :mod:`~tim_jax.demo.train` (training), :mod:`~tim_jax.demo.evaluate`
(sampling and metrics), :mod:`~tim_jax.demo.report` (pictures and tables), :mod:`~tim_jax.demo.run` (the run).

1. Data. ``digits``: the UCI handwritten digits bundled with scikit-learn (1,797 grey 8x8 images, 10 classes,
   NHWC (N, 8, 8, 1) in [-1, 1]). ``gmm`` (``--quick``): a 4x4 grid of Gaussians in 2-D, two classes in a
   checkerboard pattern, stored as (N, 1, 1, 2) "images".
2. Two models with the same network, data, seed and training budget, trained by the real train step
   (:mod:`tim_jax.training.step`, AdamW + EMA) on one device:
     * ``tim``: the TiM objective (official row mix: half r = t, 10 % r = 0, the rest r < t);
     * ``flow_matching``: the same code with every row r = t (``diffusion_ratio = 1``, ``consistency_ratio = 0``).
   ``digits`` uses the class-conditional TiM transformer (:class:`tim_jax.models.TiMC2I`, pixel space, patch 2);
   ``gmm`` uses the small MLP transition network :class:`tim_jax.demo.toy_model.MLPTiM`. The progress bars show
   the unweighted MSE to the training target (the optimised loss is adaptively weighted to about a constant).
3. Sampling from the same noise and labels with 1, 2, 4, 8, 16 and 32 steps (``--steps``): TiM with its
   transition sampler (r = next time), flow matching with Euler on its velocity (``mode="diffusion"``).
4. Quality. ``digits``: the Fréchet distance (``fd``) between generated and real images in the feature space of a
   small MLP classifier trained on the real data in the same run (its held-out accuracy is reported), and the
   class accuracy (``class_acc``) of the generated images under that classifier. ``gmm``: the sliced Wasserstein
   distance (``swd``) to a fresh sample of the true mixture.
5. Output folder (``--out``): ``metrics.json`` (``{"tim": {"<steps>": {metric: value}}, "flow_matching": {...}}``),
   ``metrics.md`` (the same numbers as a Markdown table), ``quality_vs_steps.png``, one sample picture per model and
   step count (``samples_<model>_<steps>steps.png``: for digits a grid with one row per class), and ``run.json``
   (settings, timings, final training MSE, classifier accuracy, the real-vs-real reference distance).

Exit codes: 0 success, 2 bad command line (unknown dataset, unwritable output folder, bad option value).
"""
from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Optional, Sequence

from tim_jax.demo.run import run_demo, run_seeds
from tim_jax.demo.settings import DATASETS, DEFAULTS, LR_SCHEDULES, DemoError, DemoSettings


def _int_list(text: str, *, minimum: int, what: str, example: str) -> tuple[int, ...]:
    """A comma-separated list of integers >= ``minimum`` (argparse type); ArgumentTypeError naming ``what``."""
    try:
        values = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like {example}; got {text!r}")
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"{what} must be integers >= {minimum}; got {text!r}")
    return values


def _parse_steps(text: str) -> tuple[int, ...]:
    return _int_list(text, minimum=1, what="step counts", example="1,2,4,8")


def _parse_seeds(text: str) -> tuple[int, ...]:
    return _int_list(text, minimum=0, what="seeds", example="0,1,2")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected section.field=value; got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass   # a plain string
    return key.strip(), value


def _defaults(field: str) -> str:
    return ", ".join(f"{name} {DEFAULTS[name][field]}" for name in DATASETS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.demo",
        description="Train TiM and a flow-matching baseline (same network, data, seed and budget) on a small real "
                    "dataset on CPU, sample both with 1..32 steps and compare quality vs steps.",
        epilog="Exit status: 0 on success, 2 for a bad command line (unknown dataset, unwritable --out, bad value).")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="'digits' (scikit-learn 8x8 digits; the default) or 'gmm' (2-D Gaussian mixture)")
    p.add_argument("--quick", action="store_true",
                   help="the quick version: --dataset gmm (2-D mixture, sliced Wasserstein distance)")
    p.add_argument("--out", default=None, help="output folder (default: tim_demo, or tim_demo_quick with --quick)")
    p.add_argument("--steps", type=_parse_steps, default=(1, 2, 4, 8, 16, 32),
                   help="comma-separated sampling step counts (default: 1,2,4,8,16,32)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the parameter init, data order, training noise and sampling noise (the evaluation "
                        "is the same for every seed; default: 0)")
    p.add_argument("--seeds", type=_parse_seeds, default=None, metavar="S1,S2,...",
                   help="run the whole demo once per seed (into OUT/seed_<s>/) and write OUT/metrics_over_seeds.json "
                        "and .md: mean and std over seeds, and the per-seed TiM - flow matching differences")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps per model (default: %s)" % _defaults("train_steps"))
    p.add_argument("--train-seconds", type=float, default=0.0,
                   help="also stop each model's training after this many seconds (after compilation); "
                        "0 = no limit (default)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size (default: %s)" % _defaults("batch_size"))
    p.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate (default: %s)" % _defaults("lr"))
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="'warmup_cosine': 100 warm-up steps then cosine decay to 0 at --train-steps (default); "
                        "'constant': the official constant lr (after the same warm-up)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="decay of the EMA whose params are evaluated (default: %s)" % _defaults("ema_decay"))
    p.add_argument("--num-samples", type=int, default=None,
                   help="generated samples per step count and model (default: %s)" % _defaults("num_samples"))
    p.add_argument("--width", type=int, default=None,
                   help="network width, TiM hidden_size / MLP width (default: %s)" % _defaults("width"))
    p.add_argument("--depth", type=int, default=None,
                   help="number of transformer / MLP blocks (default: %s)" % _defaults("depth"))
    p.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[],
                   metavar="SECTION.FIELD=VALUE",
                   help="override any field of the run config (configs/base.py), e.g. --set objective.derivative=jvp")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-parallel", action="store_true",
                   help="train the two models one after the other in this process (default: side by side in two "
                        "processes, each pinned to half of the CPUs, when there are at least 2)")
    return p


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    dataset = args.dataset or ("gmm" if args.quick else "digits")
    if args.quick and args.dataset not in (None, "gmm"):
        raise DemoError(f"--quick runs the 'gmm' dataset; it cannot be combined with --dataset {args.dataset}")
    out = args.out or ("tim_demo_quick" if args.quick else "tim_demo")
    return DemoSettings(dataset=dataset, out=out, steps=tuple(args.steps), seed=args.seed,
                        train_steps=args.train_steps, train_seconds=args.train_seconds, batch_size=args.batch_size,
                        lr=args.lr, lr_schedule=args.lr_schedule, ema_decay=args.ema_decay,
                        num_samples=args.num_samples, width=args.width, depth=args.depth,
                        overrides=tuple(args.overrides), progress=not args.no_progress, parallel=not args.no_parallel)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m tim_jax.demo``, ``tim-demo``); returns the exit code (0 also for
    ``--help``; 2 for a bad command line, after argparse or the demo printed the problem).

    When called without ``argv`` (a real command line) the process first re-executes itself with the fast glibc
    malloc settings of :mod:`tim_jax.cpu_allocator` (a no-op if already set or opted out with TIM_JAX_NO_REEXEC=1).
    """
    if argv is None:
        from tim_jax import cpu_allocator

        cpu_allocator.maybe_reexec()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)   # --help, bad options, unknown dataset: argparse prints and exits
    except SystemExit as e:
        return 0 if e.code is None else e.code
    try:
        settings = settings_from_args(args)
        if args.seeds is not None:
            if len(set(args.seeds)) != len(args.seeds):
                raise DemoError(f"--seeds must not repeat a seed; got {list(args.seeds)}")
            run_seeds(settings, args.seeds)
        else:
            run_demo(settings)
    except DemoError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
