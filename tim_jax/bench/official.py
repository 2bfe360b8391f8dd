"""The ``official`` benchmark: the tim_jax step side by side with the official PyTorch step, interleaved.

The official step (:mod:`tim_jax.interop.torch_driver`: the official network with SDPA attention,
``TransitionSchedule``, AdamW, clipping and EMA, same sizes and batch) runs in a subprocess of a torch interpreter.
Round i runs ``round_steps`` timed steps of each side (alternating which goes first) while the other side idles;
each turn opens with ``turn_warmup`` untimed steps, because a process that sat idle starts cold (the order effect
this removes is in ``docs/cpu-performance.md``). The speed-up is the median over rounds of ``torch round median /
jax round median``, which cancels most of the machine's slow drift. Result keys: :func:`run_official_bench`.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from typing import Optional

from tim_jax.bench.gemms import gemm_cases, gemm_shape, time_jax_gemm
from tim_jax.bench.train import (build_jax_bench, compute_dtype, compute_peaks, loadavg, minor_faults,
                                 step_stats, train_result)


def official_spec(config, official_repo: str, *, attn_type: str = "fused_attn",
                  seed: int = 0, threads: int = 0, device: str = "cpu") -> dict:
    """The spec of the official step (:mod:`tim_jax.interop.torch_driver`) matching ``config``.

    Maps the tim_jax config names onto the official constructor / ``TransitionSchedule`` /
    trainer arguments; only class-conditional (``model.kind='c2i'``) models are supported.
    The official trainer keeps one EMA model: the first of ``ema.decays`` is used.
    A bfloat16 compute dtype (:func:`~tim_jax.bench.train.compute_dtype`: ``model.dtype``, "auto"
    resolved) runs the official loss under ``torch.autocast(device, bfloat16)`` (what the official
    ``mixed_precision: bf16`` does), so both sides compute in the same precision.
    ``threads``: torch intra-op threads (0: torch's default, one per core). ``device``: where
    the official step runs, ``"cpu"`` or ``"cuda"``.
    """
    from tim_jax.training import optimizer as optim

    m, ob, tr, op = config.model, config.objective, config.transport, config.optim
    if m.kind != "c2i":
        raise ValueError(f"the official comparison supports model.kind='c2i' only, got {m.kind!r}")
    if int(op.grad_accum_steps) != 1:
        raise ValueError("the official comparison needs optim.grad_accum_steps=1 (the official "
                         f"step has no in-step accumulation), got {op.grad_accum_steps}")
    keys = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
            "mlp_ratio", "lora_hidden_size", "encoder_depth", "projector_dim", "z_dim",
            "num_classes", "class_dropout_prob", "new_condition", "use_new_embed",
            "distance_aware", "qk_norm")
    model = {k: m[k] for k in keys}
    model["mlp_ratio"] = float(model["mlp_ratio"])
    decays = tuple(config.ema.decays)
    return {
        "official_repo": os.path.abspath(official_repo),
        "model": model,
        "transport": {"name": tr.name, "params": {k: v for k, v in tr.items() if k != "name"}},
        "transition_loss": {
            "diffusion_ratio": ob.diffusion_ratio, "consistency_ratio": ob.consistency_ratio,
            "derivative_type": ob.derivative, "differential_epsilon": ob.dde_delta,
            "weight_t_and_r": ob.weight_base == "t_and_r", "weight_time_type": ob.weight_type,
            "weight_time_tangent": ob.weight_warp == "tangent",
            "weight_time_sigmoid": ob.weight_warp == "sigmoid",
        },
        "label_dropout": float(ob.get("label_dropout", 0.1)),
        "proj_coeff": float(ob.repa_coeff),
        "optim": {"lr": float(optim.effective_lr(config)), "betas": [op.b1, op.b2],
                  "weight_decay": op.weight_decay, "eps": op.eps},
        "max_grad_norm": float(op.grad_clip),
        "ema_decay": float(decays[0]) if decays else 0.0,
        "batch_size": int(config.data.global_batch_size),
        "attn_type": attn_type,
        # the official trainer's accelerate mixed_precision='bf16' = torch.autocast(bf16) around the loss
        "autocast_bf16": compute_dtype(config) == "bfloat16",
        "seed": int(seed),
        "threads": int(threads),
        "device": device,
    }


def torch_env(environ, glibc_tunables: Optional[str] = None) -> dict:
    """The torch driver's environment: ``environ`` without tim_jax's allocator setting and
    XLA flags, so the official step runs with glibc's default allocator, unless
    ``glibc_tunables`` asks for one explicitly."""
    env = {k: v for k, v in environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    if glibc_tunables:
        env["GLIBC_TUNABLES"] = glibc_tunables
    return env


class TorchOfficialStep:
    """The official step in a subprocess of ``torch_python`` (see :mod:`tim_jax.interop.torch_driver`).

    Start-up builds the model (the call blocks until the driver reports ready). ``run(k)``
    returns the driver's answer: ``{"times": [...], "loss", "minflt_per_step", "maxrss_mib"}``.
    Use as a context manager, or call :meth:`close`.
    """

    DRIVER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "interop", "torch_driver.py")

    def __init__(self, torch_python: str, spec: dict, timeout_s: float = 3600.0,
                 glibc_tunables: Optional[str] = None):
        if not os.path.isfile(torch_python):
            raise ValueError(f"--torch-python {torch_python!r} is not a file (a Python with "
                             "torch, timm and einops, e.g. <venv>/bin/python)")
        repo = spec["official_repo"]
        if not os.path.isfile(os.path.join(repo, "tim", "models", "c2i", "tim_model.py")):
            raise ValueError(f"--official-repo {repo!r} is not a checkout of the official TiM "
                             "(no tim/models/c2i/tim_model.py)")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [torch_python, self.DRIVER, "--spec", json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=torch_env(os.environ, glibc_tunables))
        self.timeout_s = timeout_s
        self.info = self._read()
        if not self.info.get("ready"):
            self.close()
            if "error" in self.info:  # a set-up problem the driver names (e.g. no CUDA)
                raise ValueError(f"torch driver: {self.info['error']}")
            raise RuntimeError(f"torch driver did not start: {self.info}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            tail = self._stderr.read()[-4000:]
            raise RuntimeError(f"the torch driver exited (code {self.proc.poll()}); its stderr:\n"
                               f"{tail}")
        return json.loads(line)

    def _ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"torch driver: {out['error']}")
        return out

    def run(self, steps: int) -> dict:
        return self._ask({"op": "run", "steps": int(steps)})

    def flops(self) -> int:
        return int(self._ask({"op": "flops"})["flops"])

    def matmul_peak(self, n: int = 2048, reps: int = 7) -> dict:
        """torch's fp32 matmul speed on the spec's device, measured like :func:`matmul_peak`."""
        return self._ask({"op": "peak", "n": int(n), "reps": int(reps)})

    def gemm(self, case: dict, dtype: str, reps: int = 7) -> float:
        """Median seconds of one :func:`gemm_cases` product in torch (``dtype`` operands, as
        autocast runs it), measured like :func:`time_jax_gemm`."""
        return float(self._ask({"op": "gemm", "case": case, "dtype": str(dtype),
                                "reps": int(reps)})["median_s"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_official_bench(config, *, official_repo: str, torch_python: str, rounds: int = 4,
                       round_steps: int = 2, turn_warmup: int = 1, warmup: int = 2,
                       peak_n: int = 2048,
                       peak_reps: int = 7, torch_flops: bool = False,
                       torch_threads: int = 0, torch_device: str = "cpu",
                       gemm_rounds: int = 0, gemm_reps: int = 7,
                       torch_glibc_tunables: Optional[str] = None) -> dict:
    """Paired, interleaved tim_jax vs official-torch benchmark; returns the result dict.

    ``torch_glibc_tunables``: a ``GLIBC_TUNABLES`` value for the torch process (default None:
    glibc's default allocator, the one the official code gets; a check of the comparison, e.g.
    with the transparent huge pages of ``glibc.malloc.hugetlb=1`` on the torch side too).

    ``torch_device``: where the official step runs (``"cpu"`` or ``"cuda"``; the settings a GPU
    run wants: :mod:`tim_jax.bench.cli`).

    Keys: ``jax`` (the :func:`run_train_bench` dict over all timed rounds), ``torch``
    ({``device`` (``torch_device``), ``step_s``, ``images_per_s``, ``n_params``, ``version``,
    ``threads``, ``build_s``, ``minflt_per_step``, ``maxrss_mib``, ``loss``, ``shims``, ``peak``
    (torch's fp32 matmul speed on that device, measured like the JAX one; TF32 allowed on
    CUDA), on CUDA ``device_name`` and ``cuda_max_allocated_mib`` (torch's peak GPU memory),
    optionally ``flops`` from torch's FlopCounter (matmuls and attention only) and
    ``floor_multiple`` against the JAX FLOP count}),
    ``rounds`` (per round: ``jax_median``, ``torch_median``, ``ratio``, ``first``),
    ``round_steps`` and ``turn_warmup`` (timed and untimed steps per turn),
    ``speedup_by_first`` (median ratio of the rounds each side opened: a check for order
    effects; the two should agree within the noise), ``speedup``
    (median of the per-round ratios torch/jax; > 1 means tim_jax is faster) and its
    ``speedup_min`` / ``speedup_max`` over rounds, ``speedup_best`` (fastest torch step /
    fastest tim_jax step: the least load-sensitive figure on a shared machine),
    ``loadavg_start`` / ``loadavg_end``. With ``gemm_rounds > 0`` also ``gemms``: per
    :func:`gemm_cases` product ``jax_s`` / ``torch_s`` (medians over rounds of each side's
    median of ``gemm_reps`` calls, interleaved per product and round) and ``ratio`` (median of
    the per-round torch/jax; > 1: XLA faster), in the config's compute dtype.
    """
    if (rounds < 1 or round_steps < 1 or warmup < 0 or turn_warmup < 0 or gemm_rounds < 0
            or gemm_reps < 1):
        raise ValueError(f"--rounds, --round-steps and --gemm-reps must be >= 1 and --warmup, "
                         f"--turn-warmup, --gemm-rounds >= 0, got {rounds}, {round_steps}, "
                         f"{gemm_reps}, {warmup}, {turn_warmup}, {gemm_rounds}")
    load0 = loadavg()
    if torch_device not in ("cpu", "cuda"):
        raise ValueError(f"--torch-device must be 'cpu' or 'cuda', got {torch_device!r}")
    spec = official_spec(config, official_repo, seed=int(config.seed), threads=torch_threads,
                         device=torch_device)
    with TorchOfficialStep(torch_python, spec, glibc_tunables=torch_glibc_tunables) as torch_step:
        peaks = compute_peaks(config, peak_n, peak_reps)
        torch_peak = torch_step.matmul_peak(peak_n, peak_reps)
        bench = build_jax_bench(config)
        bench.run(warmup)
        torch_step.run(warmup)
        t_flops = torch_step.flops() if torch_flops else None
        per_round, jax_times, torch_times, minflt, torch_last = [], [], [], 0, {}
        for i in range(rounds):
            order = ("jax", "torch") if i % 2 == 0 else ("torch", "jax")
            got = {}
            for who in order:
                if who == "jax":
                    if turn_warmup:
                        bench.run(turn_warmup)
                    f0 = minor_faults()
                    got["jax"] = bench.run(round_steps)
                    minflt += minor_faults() - f0
                else:
                    if turn_warmup:
                        torch_step.run(turn_warmup)
                    torch_last = torch_step.run(round_steps)
                    got["torch"] = torch_last["times"]
            jm, tm = statistics.median(got["jax"]), statistics.median(got["torch"])
            per_round.append({"jax_median": jm, "torch_median": tm, "ratio": tm / jm,
                              "first": order[0]})
            jax_times += got["jax"]
            torch_times += got["torch"]
        gemms = []
        if gemm_rounds:
            dtype = compute_dtype(config)
            for case in gemm_cases(config):
                js, ts = [], []
                for i in range(gemm_rounds):
                    for who in (("jax", "torch") if i % 2 == 0 else ("torch", "jax")):
                        if who == "jax":
                            js.append(time_jax_gemm(case, dtype, gemm_reps))
                        else:
                            ts.append(torch_step.gemm(case, dtype, gemm_reps))
                gemms.append({**case, "shape": gemm_shape(case), "dtype": dtype,
                              "jax_s": statistics.median(js), "torch_s": statistics.median(ts),
                              "ratio": statistics.median(t / j for t, j in zip(ts, js))})
        info = torch_step.info
    jax_res = train_result(config, bench, jax_times, peaks, minflt / len(jax_times), load0)
    b = int(config.data.global_batch_size)
    tst = step_stats(torch_times)
    torch_res = {
        "device": torch_device, "step_s": tst, "images_per_s": b / tst["median"],
        "n_params": info["n_params"],
        "version": info["torch"], "threads": info["threads"], "build_s": info["build_s"],
        "minflt_per_step": torch_last.get("minflt_per_step"),
        "maxrss_mib": torch_last.get("maxrss_mib"), "loss": torch_last.get("loss"),
        "shims": {k: info[k] for k in ("torchvision_shim", "cuda_rng_shim") if k in info},
        "floor_multiple": tst["median"] / jax_res["flop_floor_s"], "peak": torch_peak,
        "autocast_bf16": bool(spec["autocast_bf16"]),
        "glibc_tunables": torch_glibc_tunables or None,
    }
    if "device_name" in info:
        torch_res["device_name"] = info["device_name"]
    if "cuda_max_allocated_mib" in torch_last:
        torch_res["cuda_max_allocated_mib"] = torch_last["cuda_max_allocated_mib"]
    if t_flops is not None:
        torch_res["flops"] = t_flops
    ratios = [r["ratio"] for r in per_round]
    by_first = {who: statistics.median(r["ratio"] for r in per_round if r["first"] == who)
                for who in ("jax", "torch") if any(r["first"] == who for r in per_round)}
    extra = {"gemms": gemms} if gemm_rounds else {}
    return {"jax": jax_res, "torch": torch_res, "rounds": per_round, **extra,
            "round_steps": round_steps, "turn_warmup": turn_warmup,
            "speedup_by_first": by_first,
            "speedup": statistics.median(ratios), "speedup_min": min(ratios),
            "speedup_max": max(ratios), "speedup_best": tst["min"] / jax_res["step_s"]["min"],
            "loadavg_start": load0, "loadavg_end": loadavg()}

