"""Training-speed benchmarks: the tim_jax train step alone, or side by side with the official one.

    python -m tim_jax.bench train --config configs/c2i_s2_256.py --config.data.global_batch_size=16 \\
        [--steps 5] [--warmup 2]
    python -m tim_jax.bench official --config configs/c2i_s2_256.py \\
        --config.data.global_batch_size=16 --official-repo /path/to/TiM \\
        --torch-python /path/to/torch-venv/bin/python [--rounds 4] [--round-steps 2] \\
        [--torch-device cuda] [--gemm-rounds 3]
    python -m tim_jax.bench sample --preset c2i_b4_256 --batch 16 --size 256 --steps 8 \\
        [--official-repo /path/to/TiM --torch-python /path/to/torch-venv/bin/python]
    python -m tim_jax.bench [train|official|sample] --help

**train** (:mod:`tim_jax.bench.train`) times the whole jitted train step of the config on one fixed synthetic
batch and prints the step time and images/s, the lowering and compile times, XLA's FLOPs per step, the matmul
peak in the config's compute dtype measured in the same run (for bf16 also the fp32 peak), the achieved FLOP/s,
the FLOP floor and the step time as a multiple of it, the compiled program's memory, the process' max RSS and
the minor page faults per step.

**sample** (:mod:`tim_jax.bench.sample`, its own options) times whole sampler calls (ms per network evaluation,
images/s), alone or side by side with the official sampler.

**official** (:mod:`tim_jax.bench.official`) does the same for tim_jax and, in a subprocess run by
``--torch-python``, for the official PyTorch step, interleaved round by round, and prints the speed-up (median
of the per-round torch/jax ratios). ``--torch-device`` (``cpu``, the default, or ``cuda``) is where the official
step runs; JAX always uses its default backend. ``--gemm-rounds k`` also times the step's main GEMMs alone on
both sides (:mod:`tim_jax.bench.gemms`). On a GPU machine (``launch/bench_gpu.sh`` runs this) use::

    TIM_JAX_NO_REEXEC=1 XLA_PYTHON_CLIENT_PREALLOCATE=false python -m tim_jax.bench official \\
        ... --torch-device cuda --peak_n 8192

``--peak_n 8192``: a 2048-cubed matmul is too short to reach a GPU's peak (both sides' peaks, and so the FLOP
floors, use it). ``TIM_JAX_NO_REEXEC=1`` (recommended, not required) skips the re-exec under the glibc-malloc
setting of :mod:`tim_jax.cpu_allocator`, which is tuned for XLA:CPU's host buffers; the torch subprocess runs with
the default allocator either way. ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` stops JAX from reserving most of the
GPU's memory up front, which would leave too little for torch on the same GPU. With ``cuda`` where torch sees no
GPU, the driver stops at once and the CLI exits 2 naming the problem.

Options: every flag is accepted dashed (``--official-repo``) and with underscores (``--official_repo``);
``--config FILE[:ARG]`` is an ml_collections config file whose fields ``--config.SECTION.FIELD=VALUE`` override
(parsed by ``ml_collections.config_flags``). Both modes print a human-readable report
(:mod:`tim_jax.bench.report`) and finally one line ``BENCH_RESULT {json}`` with every figure; ``--json PATH`` also
writes that JSON to a file. Exit status: 0 on success (and for ``--help``), 2 for a bad command line.

Timings on a shared or small machine are noisy: compare variants only with paired, interleaved runs (the
``official`` mode, or several processes). Measured figures and how they were taken: ``docs/benchmarks.md`` and
``docs/cpu-performance.md``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from tim_jax.bench.report import RESULT_PREFIX  # noqa: F401  (re-exported: the last line's prefix)

MODES = ("train", "official")
PROG = "python -m tim_jax.bench"
HELP_FLAGS = ("-h", "--help")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--name`` in both spellings: dashed (``--peak-n``) and underscored (``--peak_n``)."""
    spellings = dict.fromkeys(["--" + name.replace("_", "-"), "--" + name])
    parser.add_argument(*spellings, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The command line: MODE (``train`` | ``official``) and its options (``--help`` lists them)."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add(common, "config", metavar="FILE[:ARG]",
         help="ml_collections config file (required), e.g. configs/c2i_s2_256.py; override its fields "
              "with --config.SECTION.FIELD=VALUE, e.g. --config.data.global_batch_size=16")
    _add(common, "warmup", type=int, default=2, metavar="N",
         help="untimed steps after compiling, each framework (default: 2)")
    _add(common, "peak_n", type=int, default=2048, metavar="N",
         help="side of the square matmul timed as the machine's peak (default: 2048)")
    _add(common, "peak_reps", type=int, default=7, metavar="N",
         help="timed repetitions of the peak matmul (default: 7)")
    _add(common, "json", metavar="PATH", help="also write the result JSON to this file")

    top = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Training-speed benchmarks of the tim_jax train step: alone (train) or side by side with "
                    "the official PyTorch step (official). Flags take dashes or underscores.",
        epilog="Each mode prints a report, then one line 'BENCH_RESULT {json}'. Exit status: 0 on success, "
               "2 for a bad command line. MODE --help lists a mode's options; 'sample --help' those of the "
               "sampler benchmark (tim_jax.bench.sample).")
    modes = top.add_subparsers(dest="mode", metavar="MODE", title="modes")
    train = modes.add_parser("train", parents=[common], allow_abbrev=False, prog=f"{PROG} train",
                             help="time the tim_jax train step alone",
                             description="Time the whole jitted tim_jax train step of --config on one fixed "
                                         "batch, against its FLOP floor at the measured matmul peak.")
    _add(train, "steps", type=int, default=5, metavar="N", help="timed steps (default: 5)")

    official = modes.add_parser(
        "official", parents=[common], allow_abbrev=False, prog=f"{PROG} official",
        help="the tim_jax step side by side with the official PyTorch step",
        description="Time the tim_jax step and the official PyTorch step (in a subprocess of --torch-python) "
                    "in interleaved rounds; the speed-up is the median of the per-round torch/jax ratios.")
    _add(official, "official_repo", required=True, metavar="DIR", help="checkout of WZDTHU/TiM")
    _add(official, "torch_python", required=True, metavar="PYTHON",
         help="interpreter with torch, timm and einops (e.g. <venv>/bin/python)")
    _add(official, "rounds", type=int, default=4, metavar="N", help="interleaved rounds (default: 4)")
    _add(official, "round_steps", type=int, default=2, metavar="N",
         help="timed steps of each framework per round (default: 2)")
    _add(official, "turn_warmup", type=int, default=1, metavar="N",
         help="untimed steps that open each framework's turn in a round: the process was idle while the "
              "other ran (default: 1)")
    _add(official, "torch_flops", type=_bool, nargs="?", const=True, default=False, metavar="BOOL",
         help="also count torch FLOPs (one extra step under torch's FlopCounter)")
    official.add_argument("--notorch_flops", "--no-torch-flops", dest="torch_flops", action="store_false",
                          help=argparse.SUPPRESS)
    _add(official, "torch_threads", type=int, default=0, metavar="N",
         help="torch intra-op threads (default: 0, torch's default)")
    _add(official, "torch_device", choices=["cpu", "cuda"], default="cpu",
         help="device of the official step; JAX uses its default backend. With cuda also pass --peak_n 8192 "
              "and set TIM_JAX_NO_REEXEC=1 XLA_PYTHON_CLIENT_PREALLOCATE=false (default: cpu)")
    _add(official, "gemm_rounds", type=int, default=0, metavar="K",
         help="also time the step's main GEMMs alone on both sides, K interleaved rounds (default: 0, off)")
    _add(official, "gemm_reps", type=int, default=7, metavar="N",
         help="calls per GEMM and round, their median is taken (default: 7)")
    _add(official, "torch_glibc_tunables", metavar="VALUE",
         help="GLIBC_TUNABLES of the torch process (default: unset, glibc's default allocator)")
    return top


def _mode_first(args: Sequence[str]) -> list[str]:
    """``args`` with the first mode word moved to the front (the mode may stand anywhere, as it could
    before the options moved to argparse), unless it is the value of the option before it."""
    args = list(args)
    for i, a in enumerate(args):
        prev = args[i - 1] if i else ""
        takes_value = prev.startswith("--") and "=" not in prev and prev.lstrip("-").replace("-", "_") not in (
            "torch_flops", "notorch_flops", "no_torch_flops")
        if a in MODES and not takes_value:
            return [a] + args[:i] + args[i + 1:]
    return args


def _without_config(args: Sequence[str]) -> list[str]:
    """``args`` without ``--config ...`` / ``--config.X ...`` (each with its value), for ``--help``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--config" or (a.startswith("--config.") and "=" not in a):
            skip = True
        elif not (a.startswith("--config=") or a.startswith("--config.")):
            out.append(a)
    return out


def _load_config(argv: Sequence[str]):
    """``(config or None, the other arguments)``: ``--config`` and its ``--config.*`` overrides parsed
    by ``ml_collections.config_flags`` from the whole ``argv`` (program name first)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file[:arg]", flag_values=fv,
                                    lock_config=True, sys_argv=list(argv))
    rest = fv(list(argv), known_only=True)[1:]
    config = fv["config"].value
    if config is not None:
        config.get("model")   # a file that failed to load raises its error on first use
    return config, rest


def parse_command_line(argv: Sequence[str]):
    """``(args, config)`` of a command line (program name first). Raises SystemExit: 0 after
    ``--help``, 2 after printing a usage error."""
    parser = build_parser()
    if any(a in HELP_FLAGS for a in argv[1:]):
        parser.parse_args(_mode_first(_without_config(argv[1:])))   # prints the help, exits 0
    try:
        config, rest = _load_config(argv)
    except Exception as e:  # noqa: BLE001 - absl / ml_collections / the config file: a bad command line
        parser.error(f"--config: {type(e).__name__}: {e}")
    rest = _mode_first(rest)
    if not rest or rest[0] not in MODES:
        parser.error(f"give a mode, one of {', '.join(MODES)} (got {rest[:1] or 'none'})")
    args = parser.parse_args(rest)
    if config is None:
        parser.error("--config=<configs/file.py[:arg]> is required")
    return args, config


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point (see the module docstring); ``argv`` as ``sys.argv`` (program name first).
    Returns the exit code: 0 (also for ``--help``), 2 for a bad command line."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] == "sample":   # its own options: tim_jax.bench.sample
        from tim_jax.bench import sample

        return sample.main([f"{PROG} sample", *argv[2:]])
    try:
        args, config = parse_command_line(argv)
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)

    from tim_jax.bench.report import format_official_report, format_train_report, print_result
    from tim_jax.hardware import resolve_config_dtype

    print(resolve_config_dtype(config), file=sys.stderr, flush=True)
    common = dict(warmup=args.warmup, peak_n=args.peak_n, peak_reps=args.peak_reps)
    try:
        if args.mode == "train":
            from tim_jax.bench.train import run_train_bench

            res = run_train_bench(config, steps=args.steps, **common)
            report = format_train_report(res)
        else:
            from tim_jax.bench.official import run_official_bench

            res = run_official_bench(
                config, official_repo=args.official_repo, torch_python=args.torch_python, rounds=args.rounds,
                round_steps=args.round_steps, turn_warmup=args.turn_warmup, torch_flops=args.torch_flops,
                torch_threads=args.torch_threads, torch_device=args.torch_device, gemm_rounds=args.gemm_rounds,
                gemm_reps=args.gemm_reps, torch_glibc_tunables=args.torch_glibc_tunables, **common)
            report = format_official_report(res)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    print_result(report, res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
