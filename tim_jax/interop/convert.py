"""``python -m tim_jax.convert``: official TiM checkpoints <-> tim_jax weights directories.

Import (official checkpoint -> converted-weights directory)::

    python -m tim_jax.convert --official model.safetensors --preset c2i_xl2_256 --out ckpt/xl2
    python -m tim_jax.convert --official model.bin --config-json network.json --out ckpt/t2i

Export (converted-weights directory, or a training run's EMA export, -> official state dict)::

    python -m tim_jax.convert --export ckpt/xl2 --out xl2_official.safetensors

The pieces live in small modules, all re-exported here:
:mod:`~tim_jax.interop.official_io` (reading checkpoint files, unwrapping wrappers),
:mod:`~tim_jax.interop.official_arch` (architectures, configs),
:mod:`~tim_jax.interop.official_check` (key/shape checks with a readable report),
:mod:`~tim_jax.interop.official_keys` (the key mapping and layouts),
:mod:`~tim_jax.interop.converted_dir` (the weights directories and the export).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from tim_jax.interop.converted_dir import (
    export_official_safetensors,
    file_sha256,
    load_converted,
    load_weights_dir,
    save_converted,
)
from tim_jax.interop.official_arch import (
    OFFICIAL_DEFAULTS,
    OfficialArch,
    model_config_from_official,
    model_config_to_official,
    official_arch,
    official_param_shapes,
)
from tim_jax.interop.official_check import (
    StateDictReport,
    check_official_state_dict,
    infer_official_config,
)
from tim_jax.interop.official_io import load_official_state_dict, normalize_state_dict
from tim_jax.interop.official_keys import (
    flat_to_official,
    official_to_flat,
    official_to_params,
    official_to_pure_params,
    params_to_official,
)

__all__ = [
    "OfficialArch",
    "OFFICIAL_DEFAULTS",
    "StateDictReport",
    "load_official_state_dict",
    "normalize_state_dict",
    "official_arch",
    "official_param_shapes",
    "infer_official_config",
    "check_official_state_dict",
    "official_to_flat",
    "flat_to_official",
    "official_to_pure_params",
    "official_to_params",
    "params_to_official",
    "export_official_safetensors",
    "model_config_from_official",
    "model_config_to_official",
    "save_converted",
    "load_converted",
    "load_weights_dir",
    "main",
]

USAGE = """
  python -m tim_jax.convert --official FILE (--preset NAME | --config-json FILE) --out DIR
                            [--kind c2i|t2i] [--ema] [--scan-blocks]
  python -m tim_jax.convert --export DIR --out FILE.safetensors"""

EPILOG = """\
examples:
  python -m tim_jax.convert --official model.safetensors --preset c2i_xl2_256 --out ckpt/xl2
  python -m tim_jax.convert --export ckpt/xl2 --out xl2_official.safetensors

--export reads a converted-weights directory (model_config.json + params/, written by the
import) or a training run's EMA export (export.json + ema_params/, written by
`python -m tim_jax.training.export`) and writes float32 tensors under the official key names.
Exit status: 0 done, 1 the weights do not fit (report on stderr), 2 bad arguments."""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.convert", usage=USAGE, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert an official TiM checkpoint into a tim_jax converted-weights "
        "directory, or (--export) tim_jax weights back into an official-layout .safetensors.")
    p.add_argument("--official", metavar="FILE",
                   help="import: the official checkpoint (.safetensors, or .bin/.pth/.pt/.ckpt "
                   "with the torch extra)")
    p.add_argument("--export", metavar="DIR",
                   help="export: the tim_jax weights directory to write back in the official layout")
    p.add_argument("--out", required=True,
                   help="import: the converted-weights directory to write; export: the "
                   ".safetensors file to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="import: tim_jax preset of the architecture "
                     "(tim_jax.models.presets)")
    src.add_argument("--config-json", metavar="FILE",
                     help="import: JSON file with the official network constructor values (e.g. a "
                     "fixture config.json, or the YAML's network.params written as JSON)")
    p.add_argument("--kind", choices=("c2i", "t2i"),
                   help="import with --config-json: network kind (default: t2i if cap_feat_dim "
                   "is given)")
    p.add_argument("--ema", action="store_true",
                   help="import: take the EMA weights of a wrapper checkpoint that holds both raw "
                   "and EMA weights (default: the raw weights; flat state dicts are used as they are)")
    p.add_argument("--scan-blocks", action="store_true",
                   help="import: store the blocks stacked (scan layout) instead of as a list")
    return p


def _argument_problem(args) -> str | None:
    if args.export and args.official:
        return "--export DIR and --official FILE exclude each other (export or import)"
    if args.export:
        extra = [f for f, v in (("--preset", args.preset), ("--config-json", args.config_json),
                                ("--kind", args.kind), ("--ema", args.ema),
                                ("--scan-blocks", args.scan_blocks)) if v]
        if extra:
            return f"{', '.join(extra)} only apply to an import (--official FILE), not to --export"
        return None
    if not args.official:
        return "give --official FILE (import) or --export DIR (export)"
    if not (args.preset or args.config_json):
        return "an import needs the architecture: --preset NAME or --config-json FILE"
    return None


def _config_for_cli(args) -> Any:
    overrides = {"scan_blocks": bool(args.scan_blocks)}
    if args.config_json:
        path = pathlib.Path(args.config_json)
        if not path.is_file():
            raise ValueError(f"--config-json {path}: no such file")
        official = json.loads(path.read_text())
        return model_config_from_official(official, kind=args.kind, **overrides)
    from tim_jax.models import presets

    return presets.model_config(args.preset, **overrides)


def _export(args) -> int:
    cfg, params = load_weights_dir(args.export)
    path = export_official_safetensors(params, cfg, args.out)
    print(f"exported {args.export} -> {path} ({len(official_param_shapes(cfg))} tensors, "
          "official layout, float32)")
    return 0


def _import(args) -> int:
    cfg = _config_for_cli(args)
    src = pathlib.Path(args.official)
    sd = load_official_state_dict(src, ema=True if args.ema else None)
    params = official_to_params(sd, cfg, source=str(src))
    out = save_converted(args.out, cfg, params, provenance={
        "source": str(src.absolute()), "source_sha256": file_sha256(src), "ema": bool(args.ema),
        "num_tensors": len(sd)})
    print(f"converted {src} ({len(sd)} tensors) -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if problem := _argument_problem(args):
        parser.print_usage(sys.stderr)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return _export(args) if args.export else _import(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
