"""``python -m tim_jax.parity DIR [DIR ...]``: numerics parity of tim_jax against reference
outputs (the official PyTorch TiM, diffusers, transformers, torch, pytorch-fid).

Each DIR is recognised by its files (format: docs/parity-format.md) and every check its files
allow runs:

==========================================  ===================================================
folder holds                                checks (module)
==========================================  ===================================================
config.json (official TiM constructor       network output F and REPA projector output; any-step
values) + model.safetensors + io.npz        sampler trajectories with ``sampler.npz``
(+ sampler.npz)                             (:mod:`~tim_jax.interop.parity_network`)
transports.npz + transports.json;           the transport formulas (float64), sample_t; the
time_weights.npz                            interval weights (:mod:`~.parity_formulas`)
config.json with ``_class_name`` /          the encoder module's ``parity_check(folder)``
``model_type`` (a Hub folder) + io.npz      (:mod:`~tim_jax.interop.parity_encoders`)
resize.npz; io.npz of DINOv2 at other       the tim_jax functions they cover
sizes or of FID Inception v3                (:mod:`~tim_jax.interop.parity_references`)
no config.json and no .npz                  nothing: skipped with a note (e.g. ``_make/``)
anything else                               an error naming the folder (unknown kind)
==========================================  ===================================================

One line is printed per check (PASS/FAIL, folder, quantity, max abs err, max rel err =
max abs err / max |ref|, tolerance, note), then a summary. Exit status: 0 every check passes; 1
some check exceeds its tolerance; 2 a folder is unusable (unknown kind, missing, corrupt or
inconsistent files) or nothing was checked.

``--live`` (needs the torch extra and an official checkout, ``--official-repo``) runs the official
network and tim_jax on random inputs with the same weights and reports per-block differences in
fp32 and bf16 (:mod:`~tim_jax.interop.parity_live`).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Callable, Sequence

from tim_jax.interop.parity_encoders import check_encoder, encoder_module_for
from tim_jax.interop.parity_formulas import check_time_weights, check_transports, sample_t_check
from tim_jax.interop.parity_live import live_compare
from tim_jax.interop.parity_network import check_network, check_sampler, load_fixture_model
from tim_jax.interop.parity_references import reference_kind
from tim_jax.interop.parity_report import (
    MC_SIGMAS,
    TOLERANCES,
    CheckResult,
    ParityInputError,
    compare,
    format_line,
    format_table,
    load_json,
)

__all__ = [
    "CheckResult",
    "ParityInputError",
    "NotAFixture",
    "TOLERANCES",
    "MC_SIGMAS",
    "compare",
    "check_network",
    "check_sampler",
    "check_transports",
    "check_time_weights",
    "sample_t_check",
    "check_directory",
    "fixture_checks",
    "format_line",
    "format_table",
    "live_compare",
    "load_fixture_model",
    "main",
]

KNOWN_KINDS = (
    "TiM network (config.json of official constructor values + model.safetensors + io.npz and/or "
    "sampler.npz), transports (transports.npz + transports.json), time weights "
    "(time_weights.npz), encoder Hub folders (config.json with _class_name/model_type + io.npz), "
    "resize.npz, DINOv2 interpolation io.npz, FID Inception io.npz")


class NotAFixture(Exception):
    """The folder holds no reference outputs (no config.json, no .npz): skipped, not an error."""


def _tim_checks(directory: pathlib.Path, has, state_dtypes, config_overrides) -> list:
    if not has("model.safetensors"):
        raise ParityInputError(
            f"{directory}: io.npz/sampler.npz of a TiM network need model.safetensors beside "
            "config.json")
    model = lambda: load_fixture_model(directory, **config_overrides)  # noqa: E731
    checks = []
    if has("io.npz"):
        checks.append(("network", lambda: check_network(directory, model=model())))
    if has("sampler.npz"):
        checks.append(("sampler", lambda: check_sampler(directory, model=model(),
                                                         state_dtypes=state_dtypes)))
    return checks


def fixture_checks(
    directory: str | pathlib.Path, *, state_dtypes: Sequence[str] = ("float32",), **config_overrides
) -> list[tuple[str, Callable[[], list[CheckResult]]]]:
    """The checks a folder's files call for (see the module docstring), as ``(name, run)``
    pairs, without running them: names ``network``, ``sampler``, ``transports``,
    ``time_weights``, an encoder module (``tim_jax.encoders.sd_vae``), or a reference check
    (``check_resize``, ``check_dinov2_interp``, ``check_fid_inception``).

    Raises:
      NotAFixture: no config.json and no .npz file (a helper folder).
      ParityInputError: missing directory, unknown kind, inconsistent files.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ParityInputError(f"{directory}: not a directory")
    has = lambda *names: all((directory / n).is_file() for n in names)  # noqa: E731
    config = load_json(directory / "config.json") if has("config.json") else None
    if config is not None and not isinstance(config, dict):
        raise ParityInputError(f"{directory}/config.json: expected a JSON object")
    if config is not None and (module := encoder_module_for(config, directory)):
        return [(module, lambda: check_encoder(directory, module))]
    checks = []
    if config is not None and (has("io.npz") or has("sampler.npz")):
        checks += _tim_checks(directory, has, state_dtypes, config_overrides)
    if has("transports.npz") or has("transports.json"):
        if not has("transports.npz", "transports.json"):
            raise ParityInputError(f"{directory}: transports.npz and transports.json go together")
        checks.append(("transports", lambda: check_transports(directory)))
    if has("time_weights.npz"):
        checks.append(("time_weights", lambda: check_time_weights(directory)))
    if not checks and config is None and (check := reference_kind(directory)):
        checks.append((check.__name__, lambda: check(directory)))
    if checks:
        return checks
    present = sorted(p.name for p in directory.iterdir())
    if config is None and not any(name.endswith(".npz") for name in present):
        raise NotAFixture(f"no config.json and no .npz file, so no reference outputs (holds "
                          f"{present[:6]}{' ...' if len(present) > 6 else ''})")
    raise ParityInputError(f"{directory}: unknown fixture kind (files {present[:12]}); known "
                           f"kinds: {KNOWN_KINDS}")


def check_directory(
    directory: str | pathlib.Path, *, state_dtypes: Sequence[str] = ("float32",), **config_overrides
) -> list[CheckResult]:
    """Run every check of :func:`fixture_checks` and return all their results (same errors)."""
    checks = fixture_checks(directory, state_dtypes=state_dtypes, **config_overrides)
    return [result for _, run in checks for result in run()]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.parity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check tim_jax against reference-output folders (docs/parity-format.md), one "
        "line per check.",
        epilog="examples:\n  python -m tim_jax.parity tests/fixtures/parity/*/\n"
        "  python -m tim_jax.parity --live --official-repo ../TiM tests/fixtures/parity/c2i_tiny\n\n"
        "Exit status: 0 all checks pass, 1 a check exceeds its tolerance, 2 a folder is unusable "
        "(unknown kind, missing or corrupt files) or nothing was checked.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="fixture folders")
    p.add_argument("--state-f64", action="store_true",
                   help="also run the sampler with a float64 state (as the official sampler)")
    p.add_argument("--scan-blocks", action="store_true", help="build the network with scanned blocks")
    p.add_argument("--live", action="store_true",
                   help="instead of fixtures: run the official torch model of each DIR's config.json/"
                   "model.safetensors and tim_jax on random inputs, per-block errors (needs torch)")
    p.add_argument("--official-repo", help="path of an official TiM checkout (added to sys.path) for --live")
    p.add_argument("--batch", type=int, default=2, help="--live: batch size of the random inputs")
    p.add_argument("--seed", type=int, default=0, help="--live: seed of the random inputs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"scan_blocks": True} if args.scan_blocks else {}
    n_pass = n_fail = n_skip = n_unusable = 0
    for d in args.dirs:
        name = pathlib.Path(d).name or str(d)
        try:
            if args.live:
                results = live_compare(d, official_repo=args.official_repo, batch=args.batch,
                                       seed=args.seed, **overrides)
            else:
                results = check_directory(
                    d, state_dtypes=("float32", "float64") if args.state_f64 else ("float32",),
                    **overrides)
        except NotAFixture as e:
            print(f"SKIP  {name}  {e}", flush=True)
            n_skip += 1
            continue
        except ParityInputError as e:
            print(f"ERROR {name}  unusable input:\n  {e}", file=sys.stderr, flush=True)
            n_unusable += 1
            continue
        for r in results:
            print(format_line(r), flush=True)
        n_fail += sum(not r.passed for r in results)
        n_pass += sum(r.passed for r in results)
    print(f"{n_pass} passed, {n_fail} failed; {len(args.dirs)} folders: {n_skip} skipped, "
          f"{n_unusable} unusable")
    if n_unusable or not (n_pass or n_fail):
        if not (n_pass or n_fail or n_unusable):
            print("error: nothing was checked", file=sys.stderr)
        return 2
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
