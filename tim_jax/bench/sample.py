"""Sampling speed: the tim_jax sampler alone, or side by side with the official PyTorch sampler.

    python -m tim_jax.bench.sample --preset c2i_b4_256 --batch 16 --size 256 --steps 8 --cfg 1.5 \\
        --cfg-interval 0,0.7 --rounds 4 [--official-repo DIR --torch-python PYTHON] \\
        [--torch-device cpu|cuda] [--dtype auto|float32|bfloat16] [--json PATH] [--quick]

What is timed: one whole sampler call, ``--steps`` transition steps from noise to latents on a
fixed batch with classifier-free guidance inside the window (:func:`tim_jax.sampler.sample`,
jitted once: its lowering and compile times are reported apart), the result waited for.
``--preset``: a model preset (``tim_jax.models.presets``, OT-FM transport) or a config file
(``configs/NAME.py`` or a path: its ``model`` and ``transport``); ``--size``: the image side,
the latent side being size / 8 (SD-VAE, 4 channels) or size / 32 (DC-AE).

NFE convention (the same on both sides): one network function evaluation (NFE) is one call of
the network in the sampler loop, so a call makes ``--steps`` NFEs. A guided step runs the
conditional and the unconditional rows in ONE call of 2B rows (both samplers batch them so) and
counts as one NFE; ``rows_per_call`` says how many rows the NFEs evaluated in all. ms/NFE =
call time / steps; images/s = batch / call time.

With ``--official-repo`` and ``--torch-python`` the official ``TransitionSchedule.sample`` runs in
a subprocess (:mod:`tim_jax.interop.torch_driver`, op ``sample``) on the same weights (tim_jax's
random params, none zero, exported to an official state dict), the
same noise and labels. Their final latents from the first call are compared (max relative error
= max |jax - torch| / max |torch|). Then interleaved rounds, alternating which side opens: each
turn makes ``--turn-warmup`` untimed calls (a process that sat idle starts cold) and
``--round-calls`` timed ones; the speed-up is the median over rounds of torch median / jax median
(> 1: tim_jax faster), with its range and the ratio of the fastest calls.

Precision: ``--dtype auto`` is float32 on a CPU backend and bfloat16 elsewhere. In bfloat16 the
official side runs as the official sample script does (``model.to(bfloat16)``, bf16 noise), or
with ``--torch-bf16 autocast`` under ``torch.autocast`` with float32 weights; tim_jax keeps float32
params and computes in bf16. The official network always runs its REPA projector; ours does not
(``return_proj=False``). On a GPU set ``TIM_JAX_NO_REEXEC=1 XLA_PYTHON_CLIENT_PREALLOCATE=false``
(:mod:`tim_jax.bench.cli` says why). Prints a report, then ``BENCH_RESULT {json}``; exit 0, or 2
for a bad command line or set-up.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before the heavy imports (as ``python -m tim_jax.bench``)
    from tim_jax import cpu_allocator

    cpu_allocator.maybe_reexec()

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from tim_jax.bench.official import TorchOfficialStep
from tim_jax.bench.report import print_result
from tim_jax.bench.train import cpu_info, loadavg, step_stats

PROG = "python -m tim_jax.bench.sample"
PERTURB_STD = 0.02  # std of the random biases / embeddings / LayerNorm-scale offsets
QUICK = dict(preset="c2i_tiny", batch=2, size=64, steps=4, rounds=2)
DEFAULTS = dict(preset="c2i_b4_256", batch=16, size=256, steps=8, rounds=4)


# ---------------------------------------------------------------------------------------------
# what is sampled
def resolve_preset(name: str, dtype: str):
    """``(model config, transport, source)`` of a model preset or a config file (see the module
    docstring); ``dtype`` ("float32" | "bfloat16") overrides the model's compute dtype."""
    from tim_jax.models import PRESETS, model_config
    from tim_jax.transports import TRANSPORTS, make_transport

    if name in PRESETS:
        return model_config(name, dtype=dtype), make_transport("OT_FM"), f"preset {name}"
    root = pathlib.Path(__file__).resolve().parents[2]
    candidates = [pathlib.Path(name)] if name.endswith(".py") else [
        pathlib.Path("configs") / f"{name}.py", root / "configs" / f"{name}.py"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ValueError(f"--preset {name!r} is neither a model preset ({', '.join(PRESETS)}) nor "
                         f"a config file (looked for {', '.join(map(str, candidates))})")
    if str(path.resolve().parents[1]) not in sys.path:  # the config files import `configs.base`
        sys.path.insert(0, str(path.resolve().parents[1]))
    spec = importlib.util.spec_from_file_location(f"_bench_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model = config.model.to_dict()
    model["dtype"] = dtype
    tr = dict(config.transport.to_dict())
    cls = TRANSPORTS.get(tr.get("name"))
    if cls is None:
        raise ValueError(f"{path}: unknown transport {tr.get('name')!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    transport = make_transport(tr.pop("name"), **{k: v for k, v in tr.items() if k in fields})
    return _config_from_dict(model), transport, f"config {path}"


def _config_from_dict(model: dict):
    import ml_collections

    from tim_jax.models.presets import model_kwargs

    model_kwargs(dict(model))  # validates the kind and the field names
    return ml_collections.ConfigDict(model)


def latent_side(model_cfg, size: int) -> int:
    """The latent side of ``size``-pixel images: size / 8 (SD-VAE) or size / 32 (DC-AE)."""
    down = 8 if int(model_cfg.in_channels) == 4 else 32
    side, p = size // down, int(model_cfg.patch_size)
    if size % down or side % p or side < p:
        raise ValueError(f"--size {size}: needs a multiple of {down * p} (VAE factor {down} x "
                         f"patch {p}) for {model_cfg.in_channels}-channel latents")
    return side


def guided_steps(transport, num_steps: int, cfg_scale: float, cfg_low: float,
                 cfg_high: float) -> list[bool]:
    """Per step, whether it is guided: ``s > 1`` and ``cfg_low T_max < t_k < cfg_high T_max``
    on the float32 time grid (the rule of :func:`tim_jax.sampler.sample`)."""
    from tim_jax.sampler import time_grid

    t = time_grid(transport, num_steps)[:-1]
    lo, hi = np.float32(cfg_low * transport.T_max), np.float32(cfg_high * transport.T_max)
    return [bool(cfg_scale > 1.0 and lo < tk < hi) for tk in t]


def call_figures(times: Sequence[float], batch: int, num_steps: int) -> dict:
    """``{call_s (step_stats), ms_per_nfe, images_per_s}`` from sampler-call seconds (medians)."""
    st = step_stats(times)
    return {"call_s": st, "ms_per_nfe": 1e3 * st["median"] / num_steps,
            "images_per_s": batch / st["median"]}


# ---------------------------------------------------------------------------------------------
# the two sides
def bench_params(model_cfg, seed: int = 0):
    """``(graphdef, params)`` with random values drawn on the host (no init to compile):
    kernels N(0, 1 / fan_in) (fan_in = all but the last dim), LayerNorm scales 1 + N(0, 0.02^2),
    biases and embeddings N(0, 0.02^2). Nothing is zero, unlike the official init, whose zeroed
    output layers would make every sampler return its noise."""
    import jax
    import jax.numpy as jnp

    from tim_jax.models import abstract_model

    graphdef, abstract = abstract_model(model_cfg)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        shape = tuple(leaf.shape)
        name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))  # past `.value`
        x = rng.standard_normal(shape, dtype=np.float32)
        if name == "kernel":
            x /= np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            x = 1.0 + PERTURB_STD * x
        else:
            x *= PERTURB_STD
        return jnp.asarray(x, leaf.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


class JaxSampler:
    """The jitted tim_jax sampler on one fixed batch: ``z`` (B, H, W, C) float32, ``y`` (B,)."""

    def __init__(self, graphdef, params, z, y, *, transport, num_classes: int, num_steps: int,
                 cfg_scale: float, cfg_low: float, cfg_high: float):
        import jax
        import jax.numpy as jnp

        from tim_jax.models import count_params, make_apply_fn
        from tim_jax.sampler import sample

        apply_fn = make_apply_fn(graphdef)   # return_proj=False: the projector is not run
        null = jnp.asarray(num_classes, jnp.int32)

        def run(params, z, y):
            return sample(apply_fn, params, z, y, null, transport=transport, num_steps=num_steps,
                          cfg_scale=cfg_scale, cfg_low=cfg_low, cfg_high=cfg_high)

        self.args = (params, jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.int32))
        t0 = time.perf_counter()
        lowered = jax.jit(run).lower(*self.args)
        t1 = time.perf_counter()
        self.fn = lowered.compile()
        self.lower_s, self.compile_s = t1 - t0, time.perf_counter() - t1
        self.n_params = count_params(params)
        self.block = jax.block_until_ready

    def latents(self) -> np.ndarray:
        """One untimed call; its final latents (B, H, W, C) as float32 numpy."""
        return np.asarray(self.block(self.fn(*self.args)), np.float32)

    def run(self, calls: int) -> list[float]:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            self.block(self.fn(*self.args))
            times.append(time.perf_counter() - t0)
        return times


class TorchOfficialSampler(TorchOfficialStep):
    """The official sampler in a torch subprocess (the driver's ``sample`` op); ``sample(calls,
    save)`` returns the driver's answer. A context manager, like :class:`TorchOfficialStep`."""

    def __init__(self, torch_python: str, spec: dict, command: dict, **kwargs):
        super().__init__(torch_python, spec, **kwargs)
        self.command = command

    def sample(self, calls: int, save: Optional[str] = None) -> dict:
        return self._ask({**self.command, "op": "sample", "calls": int(calls), "save": save})


def official_sample_spec(model_cfg, transport, official_repo: str, *, device: str, threads: int,
                         precision: str, seed: int = 0) -> dict:
    """The driver's start-up spec (``mode: sample``) for ``model_cfg`` and ``transport``."""
    from tim_jax.interop.convert import model_config_to_official

    if model_cfg.kind != "c2i":
        raise ValueError(f"the official sampler comparison supports c2i models, got {model_cfg.kind!r}")
    params = {f.name: getattr(transport, f.name) for f in dataclasses.fields(transport)}
    return {"mode": "sample", "official_repo": os.path.abspath(official_repo),
            "model": model_config_to_official(model_cfg),
            "transport": {"name": transport.name, "params": params}, "device": device,
            "threads": int(threads), "seed": int(seed), "precision": precision, "attn_type": "auto"}


# ---------------------------------------------------------------------------------------------
# the benchmark
def run_sample_bench(*, preset: str, batch: int, size: int, steps: int, cfg_scale: float,
                     cfg_low: float, cfg_high: float, rounds: int = 4, round_calls: int = 1,
                     turn_warmup: int = 1, dtype: str = "auto", seed: int = 0,
                     official_repo: Optional[str] = None, torch_python: Optional[str] = None,
                     torch_device: str = "cpu", torch_threads: int = 0,
                     torch_bf16: str = "weights") -> dict:
    """Times the tim_jax sampler (and, given ``official_repo`` and ``torch_python``, the
    official one, interleaved); returns the result dict (keys: the report, ``format_sample_report``)."""
    import jax

    if min(batch, size, steps, rounds, round_calls) < 1 or turn_warmup < 0:
        raise ValueError("--batch, --size, --steps, --rounds and --round-calls must be >= 1 and "
                         f"--turn-warmup >= 0, got {batch}, {size}, {steps}, {rounds}, "
                         f"{round_calls}, {turn_warmup}")
    if not (cfg_scale >= 0 and cfg_low < cfg_high):
        raise ValueError(f"need --cfg >= 0 and low < high in --cfg-interval, got {cfg_scale}, "
                         f"{cfg_low},{cfg_high}")
    if (official_repo is None) != (torch_python is None):
        raise ValueError("the official side needs both --official-repo and --torch-python")
    if torch_bf16 not in ("weights", "autocast") or torch_device not in ("cpu", "cuda"):
        raise ValueError(f"--torch-bf16 weights|autocast, --torch-device cpu|cuda; got "
                         f"{torch_bf16!r}, {torch_device!r}")
    backend = jax.default_backend()
    dtype = ("float32" if backend == "cpu" else "bfloat16") if dtype == "auto" else dtype
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    load0 = loadavg()
    model_cfg, transport, source = resolve_preset(preset, dtype)
    side = latent_side(model_cfg, size)
    guided = guided_steps(transport, steps, cfg_scale, cfg_low, cfg_high)
    rng = np.random.default_rng(seed)
    c, n_cls = int(model_cfg.in_channels), int(model_cfg.num_classes)
    z = rng.standard_normal((batch, side, side, c), dtype=np.float32)
    y = rng.integers(0, n_cls, batch)
    graphdef, params = bench_params(model_cfg, seed)
    jax_side = JaxSampler(graphdef, params, z, y, transport=transport, num_classes=n_cls,
                          num_steps=steps, cfg_scale=cfg_scale, cfg_low=cfg_low, cfg_high=cfg_high)
    jax_lat = jax_side.latents()
    res = {"preset": preset, "source": source, "batch": batch, "size": size,
           "latent": [side, side, c], "num_steps": steps, "cfg_scale": cfg_scale,
           "cfg_interval": [cfg_low, cfg_high], "guided_steps": sum(guided), "nfe_per_call": steps,
           "rows_per_call": sum(2 * batch if g else batch for g in guided), "dtype": dtype,
           "backend": backend, "cpu": cpu_info(), "round_calls": round_calls,
           "turn_warmup": turn_warmup, "loadavg_start": load0}
    jax_info = {"version": jax.__version__, "n_params": jax_side.n_params,
                "lower_s": jax_side.lower_s, "compile_s": jax_side.compile_s}
    if official_repo is None:
        res["jax"] = {**jax_info, **call_figures(jax_side.run(rounds * round_calls), batch, steps)}
        res["loadavg_end"] = loadavg()
        return res

    from tim_jax.interop.convert import export_official_safetensors

    precision = "float32" if dtype == "float32" else (
        "bfloat16" if torch_bf16 == "weights" else "autocast_bf16")
    spec = official_sample_spec(model_cfg, transport, official_repo, device=torch_device,
                                threads=torch_threads, precision=precision, seed=seed)
    with tempfile.TemporaryDirectory(prefix="tim_jax_bench_sample_") as tmp:
        weights = export_official_safetensors(params, model_cfg, os.path.join(tmp, "w.safetensors"))
        inputs = os.path.join(tmp, "inputs.npz")
        np.savez(inputs, z=z.transpose(0, 3, 1, 2), y=y, y_null=np.full(batch, n_cls))
        command = {"weights": str(weights), "inputs": inputs, "num_steps": steps,
                   "cfg_scale": cfg_scale, "cfg_low": cfg_low, "cfg_high": cfg_high,
                   "T_max": float(transport.T_max), "T_min": float(transport.T_min)}
        with TorchOfficialSampler(torch_python, spec, command) as torch_side:
            first = torch_side.sample(0, save=os.path.join(tmp, "torch_latents.npy"))
            torch_lat = np.load(os.path.join(tmp, "torch_latents.npy")).transpose(0, 2, 3, 1)
            per_round, jt, tt = [], [], []
            for i in range(rounds):
                order = ("jax", "torch") if i % 2 == 0 else ("torch", "jax")
                got = {}
                for who in order:
                    if who == "jax":
                        got["jax"] = jax_side.run(turn_warmup + round_calls)[turn_warmup:]
                    else:
                        got["torch"] = torch_side.sample(turn_warmup + round_calls)["times"][turn_warmup:]
                jm, tm = statistics.median(got["jax"]), statistics.median(got["torch"])
                per_round.append({"jax_median": jm, "torch_median": tm, "ratio": tm / jm,
                                  "first": order[0]})
                jt += got["jax"]
                tt += got["torch"]
            info = torch_side.info
    diff = np.abs(jax_lat.astype(np.float64) - torch_lat)
    scale = float(np.max(np.abs(torch_lat)))
    ratios = [r["ratio"] for r in per_round]
    res["jax"] = {**jax_info, **call_figures(jt, batch, steps)}
    res["torch"] = {"version": info["torch"], "device": torch_device, "threads": info["threads"],
                    "n_params": first["n_params"], "build_s": first["build_s"],
                    "attn_type": first["attn_type"], "precision": first["precision"],
                    **({"device_name": info["device_name"]} if "device_name" in info else {}),
                    **call_figures(tt, batch, steps)}
    res.update({
        "latents_max_abs_err": float(diff.max()), "latents_max_rel_err": float(diff.max()) / scale,
        "latents_max_abs": scale, "rounds": per_round, "speedup": statistics.median(ratios),
        "speedup_min": min(ratios), "speedup_max": max(ratios),
        "speedup_best": min(tt) / min(jt),
        "speedup_by_first": {w: statistics.median(r["ratio"] for r in per_round if r["first"] == w)
                             for w in ("jax", "torch") if any(r["first"] == w for r in per_round)},
        "loadavg_end": loadavg()})
    return res


def _calls_line(x: dict) -> str:
    st = x["call_s"]
    return (f"{1e3 * st['median']:.1f} ms median (min {1e3 * st['min']:.1f}, max "
            f"{1e3 * st['max']:.1f}, n={st['n']}) = {x['ms_per_nfe']:.2f} ms/NFE, "
            f"{x['images_per_s']:.3f} images/s")


def format_sample_report(res: dict) -> str:
    """The human-readable report of :func:`run_sample_bench`."""
    j, lo_hi = res["jax"], res["cfg_interval"]
    lines = [
        "== sampler speed ==",
        f"model             : {res['source']}, {j['n_params']:,} params; {res['dtype']} on "
        f"{res['backend']} ({res['cpu']})",
        f"batch             : {res['batch']} images of {res['size']} px (latent "
        f"{'x'.join(map(str, res['latent']))})",
        f"sampler           : {res['num_steps']} transition steps, cfg {res['cfg_scale']} in "
        f"({lo_hi[0]}, {lo_hi[1]}) x T_max: {res['guided_steps']} guided",
        f"NFE convention    : 1 NFE = 1 network call (a guided step = one call of 2B rows); "
        f"{res['nfe_per_call']} NFEs, {res['rows_per_call']} rows per sampler call",
        f"tim_jax           : jax {j['version']}; lower {j['lower_s']:.2f} s, compile "
        f"{j['compile_s']:.2f} s",
        f"tim_jax call      : {_calls_line(j)}"]
    if "torch" in res:
        t = res["torch"]
        lines += [
            f"official          : torch {t['version']} on {t['device']}"
            + (f" ({t['device_name']})" if t.get("device_name") else "")
            + f", {t['threads']} threads, {t['precision']}, attn {t['attn_type']}, "
            f"{t['n_params']:,} params, built in {t['build_s']:.1f} s",
            f"official call     : {_calls_line(t)}",
            f"latents agree     : max rel err {res['latents_max_rel_err']:.2e} (max abs "
            f"{res['latents_max_abs_err']:.2e} of max |x| {res['latents_max_abs']:.3g}; first call)",
            "rounds (torch/jax): " + ", ".join(
                f"{r['torch_median']:.3f}/{r['jax_median']:.3f}={r['ratio']:.3f}"
                for r in res["rounds"]),
            f"speed-up per NFE  : {res['speedup']:.3f}x (median of per-round torch/jax; range "
            f"{res['speedup_min']:.3f}-{res['speedup_max']:.3f}; > 1: tim_jax faster)",
            f"speed-up, best    : {res['speedup_best']:.3f}x (fastest official call / fastest "
            "tim_jax call)",
            "by opener         : " + ", ".join(f"{w}-first rounds {v:.3f}x" for w, v in
                                               res["speedup_by_first"].items())
            + f" ({res['turn_warmup']} untimed call(s) open each turn)"]
    lines.append(f"load average      : start {res['loadavg_start']}, end {res['loadavg_end']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0,0.7), got {text!r}") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--preset", help=f"model preset or config file (default {DEFAULTS['preset']})")
    a("--batch", type=int, help=f"images per call (default {DEFAULTS['batch']})")
    a("--size", type=int, help=f"image side in pixels (default {DEFAULTS['size']})")
    a("--steps", type=int, help=f"sampler steps = NFEs per call (default {DEFAULTS['steps']})")
    a("--cfg", type=float, default=1.5, help="guidance scale (default 1.5)")
    a("--cfg-interval", type=_interval, default=(0.0, 0.7), metavar="LOW,HIGH",
      help="guidance window as fractions of T_max (default 0,0.7)")
    a("--rounds", type=int, help=f"interleaved rounds (default {DEFAULTS['rounds']})")
    a("--round-calls", type=int, default=1, help="timed calls per side and round (default 1)")
    a("--turn-warmup", type=int, default=1, help="untimed calls opening each turn (default 1)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="compute dtype (default auto: float32 on CPU, bfloat16 elsewhere)")
    a("--seed", type=int, default=0)
    a("--official-repo", metavar="DIR", help="checkout of WZDTHU/TiM (with --torch-python)")
    a("--torch-python", metavar="PYTHON", help="interpreter with torch, timm, einops, safetensors")
    a("--torch-device", choices=["cpu", "cuda"], default="cpu")
    a("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a("--torch-bf16", choices=["weights", "autocast"], default="weights",
      help="official bf16: bf16 weights as its sample script (default) or autocast")
    a("--json", metavar="PATH", help="also write the result JSON here")
    a("--quick", action="store_true", help="tiny defaults: " + ", ".join(
        f"{k} {v}" for k, v in QUICK.items()))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; ``argv`` as ``sys.argv`` (program name first). Returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    base = QUICK if args.quick else DEFAULTS
    pick = {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in DEFAULTS}
    try:
        res = run_sample_bench(
            **pick, cfg_scale=args.cfg, cfg_low=args.cfg_interval[0], cfg_high=args.cfg_interval[1],
            round_calls=args.round_calls, turn_warmup=args.turn_warmup, dtype=args.dtype,
            seed=args.seed, official_repo=args.official_repo, torch_python=args.torch_python,
            torch_device=args.torch_device, torch_threads=args.torch_threads,
            torch_bf16=args.torch_bf16)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    print_result(format_sample_report(res), res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
