"""Times the official PyTorch TiM training step; the torch half of ``tim_jax.bench official``.

This file is run as a script by a *torch* interpreter (not the JAX one), as a long-lived
subprocess of ``python -m tim_jax.bench official``::

    /path/to/torch/python tim_jax/bench_torch_driver.py --spec '<json>'

It imports nothing from tim_jax and no JAX. It builds the official network
(``tim.models.c2i.tim_model.TiM``) and the official ``TransitionSchedule`` loss from an official
checkout (``spec["official_repo"]``, put on ``sys.path``; nothing is copied), then runs the
official trainer's step on random data on ``spec["device"]`` (``"cpu"``, the default, or
``"cuda"``), in float32, or under ``torch.autocast(<device>, bfloat16)`` when
``spec["autocast_bf16"]`` (the official ``mixed_precision: bf16``):

* label dropout as in the official trainer, REPA targets drawn once as random
  (B, N_tokens, z_dim) features;
* ``TransitionSchedule.__call__`` (its own (t, r) sampling, the DDE or JVP derivative with
  no-grad forwards, time weighting, adaptive weighting, directional and REPA losses);
* ``(weighted_loss + proj_coeff * proj_loss).backward()``, ``clip_grad_norm_``,
  ``torch.optim.AdamW``, ``zero_grad(set_to_none=True)`` and the EMA update.

On ``"cuda"`` the model, its EMA copy, the optimizer state, the fixed batch and the per-step
noise / label dropout all live on the GPU, TF32 matmuls are allowed (the official
``allow_tf32: True``), and each step and each peak matmul ends with ``torch.cuda.synchronize()``.
When CUDA is not available the driver fails before building anything: it answers one
``{"error": ...}`` line instead of the ready line and exits with code 2.

Three in-process shims make the GPU-only code run on a CPU; none changes what is timed:

* ``flash_attn`` (imported at the top of the official model file, CUDA-only) is replaced by a
  module whose function raises; the step passes ``attn_type`` (default ``'fused_attn'``, i.e.
  ``F.scaled_dot_product_attention``) so it is never called.
* ``torch.cuda.get_rng_state`` / ``set_rng_state`` (called by the official loss to replay the
  dropout RNG; the network has no dropout) become no-ops when CUDA is absent.
* When the installed torchvision is a CUDA build whose ops cannot load (timm imports
  torchvision), the two op schemas its Python side needs at import are declared so the import
  succeeds; no torchvision op is used.

Protocol: after start-up one JSON line ``{"ready": true, ...}`` is written to stdout; then each
stdin line is a JSON command, answered by one JSON line:

* ``{"op": "run", "steps": k}`` -> ``{"times": [s, ...], "loss": float, "minflt_per_step": float,
  "maxrss_mib": float}``: k steps, each timed with ``time.perf_counter`` (on CUDA also
  ``"cuda_max_allocated_mib"``, torch's peak GPU memory so far).
* ``{"op": "peak", "n": 2048, "reps": 7}`` -> ``{"flops_per_s", "median_s", "n", "reps"}``: torch's
  fp32 matmul speed on the device (to compare with XLA's, measured the same way; on CUDA, with
  TF32 allowed, also ``"device"``: the GPU's name).
* ``{"op": "gemm", "case": {...}, "dtype": "bfloat16", "reps": 7}`` -> ``{"median_s"}``: one
  GEMM of the step alone, as torch runs it (``tim_jax.bench.gemm_cases`` lists them).
* ``{"op": "flops"}`` -> ``{"flops": int}``: one step under ``torch.utils.flop_counter``
  (matmuls and attention only).
* ``{"op": "quit"}`` -> exits.

Everything else the official code prints goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import resource
import sys
import time
import types


def _write(stream, obj) -> None:
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


def _import_timm_cpu_safe() -> bool:
    """Imports timm; returns True when the torchvision op-schema shim was needed."""
    import torch

    try:
        import timm  # noqa: F401

        return False
    except RuntimeError as err:  # a CUDA torchvision wheel beside a CPU torch
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_timm_cpu_safe.lib = lib  # keep the fragment alive
    import timm  # noqa: F401,F811

    return True


def _device_problem(torch, device: str):
    """Why ``spec["device"]`` cannot be used (None when it can)."""
    if device not in ("cpu", "cuda"):
        return f"spec device must be 'cpu' or 'cuda', got {device!r}"
    if device == "cuda" and not torch.cuda.is_available():
        return (f"device 'cuda' (--torch-device cuda) asked for, but CUDA is not available to "
                f"torch {torch.__version__} at {sys.executable} (CUDA build: "
                f"{torch.version.cuda or 'no, a CPU-only build'}; CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): run it on a machine with "
                "an NVIDIA GPU and a CUDA build of torch, or use --torch-device cpu")
    return None


def _install_shims() -> dict:
    import torch

    fake = types.ModuleType("flash_attn")

    def _no_flash_attn(*args, **kwargs):
        raise RuntimeError("flash_attn is not available on CPU; use attn_type='fused_attn'")

    fake.flash_attn_func = _no_flash_attn
    sys.modules.setdefault("flash_attn", fake)
    rng_shim = not torch.cuda.is_available()
    if rng_shim:
        torch.cuda.get_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
        torch.cuda.set_rng_state = lambda *a, **k: None
    return {"torchvision_shim": _import_timm_cpu_safe(), "cuda_rng_shim": rng_shim}


class OfficialStep:
    """The official trainer's step on a fixed random batch (see the module docstring)."""

    def __init__(self, spec: dict):
        import torch

        self.torch = torch
        sys.path.insert(0, spec["official_repo"])
        from tim.models.c2i.tim_model import TiM
        from tim.schedulers import transports
        from tim.schedulers.transition import TransitionSchedule

        self.dev = dev = torch.device(spec.get("device", "cpu"))
        torch.manual_seed(int(spec.get("seed", 0)))
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        mk = dict(spec["model"])
        self.model = TiM(**mk).train().to(dev)  # initialised on the CPU, then moved
        self.ema = copy.deepcopy(self.model)
        self.ema.requires_grad_(False)
        tr = spec["transport"]
        cls = getattr(transports, tr["name"])
        accepted = inspect.signature(cls.__init__).parameters
        self.loss_fn = TransitionSchedule(
            transport=cls(**{k: v for k, v in tr.get("params", {}).items() if k in accepted}),
            **spec["transition_loss"],
        )
        o = spec["optim"]
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=o["lr"], betas=tuple(o["betas"]),
            weight_decay=o["weight_decay"], eps=o["eps"],
        )
        self.max_grad_norm = float(spec["max_grad_norm"])
        self.ema_decay = float(spec["ema_decay"])
        self.proj_coeff = float(spec["proj_coeff"])
        self.attn_type = spec.get("attn_type", "fused_attn")
        self.autocast = bool(spec.get("autocast_bf16", False))
        b = int(spec["batch_size"])
        size, ch, p = mk["input_size"], mk["in_channels"], mk["patch_size"]
        self.num_classes = mk["num_classes"]
        self.dropout = float(spec.get("label_dropout", mk.get("class_dropout_prob", 0.1)))
        self.latent = torch.randn(b, ch, size, size, device=dev)
        self.label = torch.randint(0, self.num_classes, (b,), device=dev)
        self.h_target = torch.randn(b, (size // p) ** 2, mk["z_dim"], device=dev)
        self.n_params = sum(q.numel() for q in self.model.parameters())

    def step(self) -> float:
        torch = self.torch
        x, label = self.latent, self.label
        noises = torch.randn_like(x)
        drop = torch.rand(label.shape[0], device=self.dev) < self.dropout
        dropped = torch.where(drop, self.num_classes, label)
        null = torch.ones_like(label) * self.num_classes
        a = self.attn_type
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            weighted, proj, _ = self.loss_fn(
                self.model, self.ema, self.model, x.shape[0], x, noises,
                dict(y=dropped, return_zs=True, attn_type=a),
                use_dir_loss=True, h_target=self.h_target,
                ema_kwargs=dict(y=label, return_zs=False, attn_type=a),
                null_kwargs=dict(y=null, return_zs=False, attn_type=a),
            )
            loss = weighted + self.proj_coeff * proj
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = self.ema_decay
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.mul_(d).add_(pm, alpha=1.0 - d)
        out = float(loss.detach())
        _sync(torch, self.dev)
        return out


def _sync(torch, dev) -> None:
    """Waits for the device's queued work (CPU ops are synchronous already)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _call_times(torch, dev, fn, reps: int) -> list:
    """Sorted seconds of ``reps`` calls of ``fn`` (each waited for on the device) after one
    untimed call."""
    fn()
    _sync(torch, dev)
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        _sync(torch, dev)
        ts.append(time.perf_counter() - s)
    return sorted(ts)


def _matmul_peak(torch, n: int, reps: int, device: str = "cpu") -> dict:
    """torch's fp32 GEMM speed: median of ``reps`` timed ``n``-cubed matmuls (after one untimed)."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    ts = _call_times(torch, dev, lambda: torch.mm(a, b), reps)
    med = ts[len(ts) // 2]
    out = {"flops_per_s": 2.0 * n ** 3 / med, "median_s": med, "n": n, "reps": reps}
    if dev.type == "cuda":
        out["device"] = torch.cuda.get_device_name(dev)
    return out


def _gemm_time(torch, case: dict, dtype: str, reps: int, device: str = "cpu") -> float:
    """Median seconds of ``reps`` calls (after one untimed) of one GEMM of the step as torch
    runs it (``tim_jax.bench.gemm_cases`` kinds; operands in ``dtype``, as autocast casts
    them): ``linear`` = F.linear with a (o, i) weight and bias; ``linear_glu`` = that, then
    ``silu(gate) * value`` of its two halves (the timm SwiGLU); ``weight_grad`` = g^T x (the
    Linear weight gradient); ``input_grad`` = g W; ``logits`` = q k^T."""
    dev = torch.device(device)
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    kind = case["kind"]
    with torch.no_grad():
        if kind == "logits":
            q, k = (torch.randn(case["b"], case["l"], case["d"], device=dev, dtype=dt)
                    for _ in range(2))
            fn = lambda: q @ k.transpose(-1, -2)  # noqa: E731
        else:
            t, i, o = case["t"], case["i"], case["o"]
            x = torch.randn(t, i, device=dev, dtype=dt)
            w = torch.randn(o, i, device=dev, dtype=dt) * 0.05
            g = torch.randn(t, o, device=dev, dtype=dt)
            bias = torch.zeros(o, device=dev, dtype=dt)
            F = torch.nn.functional

            def glu():
                gate, value = F.linear(x, w, bias).chunk(2, dim=-1)
                return F.silu(gate) * value

            fn = {"linear": lambda: F.linear(x, w, bias), "linear_glu": glu,
                  "weight_grad": lambda: g.t() @ x,
                  "input_grad": lambda: g @ w}[kind]
        ts = _call_times(torch, dev, fn, reps)
    return ts[len(ts) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON: official_repo, model, transport, ...")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    # Protocol lines go to the real stdout; anything the official code prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    import torch

    device = spec.get("device", "cpu")
    problem = _device_problem(torch, device)
    if problem:  # before the shims and the model: fail in seconds, with the reason
        print(f"error: {problem}", file=sys.stderr, flush=True)
        _write(proto, {"error": problem})
        return 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the official trainer's allow_tf32: True
    shims = _install_shims()
    step = OfficialStep(spec)
    gpu = {"device_name": torch.cuda.get_device_name()} if device == "cuda" else {}
    _write(proto, {
        "ready": True, "build_s": time.perf_counter() - t0, "n_params": step.n_params,
        "torch": torch.__version__, "threads": torch.get_num_threads(), **shims, **gpu,
    })
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "run":
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times, loss = [], float("nan")
            for _ in range(int(cmd["steps"])):
                s = time.perf_counter()
                loss = step.step()
                times.append(time.perf_counter() - s)
            ru = resource.getrusage(resource.RUSAGE_SELF)
            mem = ({"cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2 ** 20}
                   if device == "cuda" else {})
            _write(proto, {
                "times": times, "loss": loss,
                "minflt_per_step": (ru.ru_minflt - f0) / max(len(times), 1),
                "maxrss_mib": ru.ru_maxrss / 1024.0, **mem,
            })
        elif cmd["op"] == "peak":
            _write(proto, _matmul_peak(torch, int(cmd.get("n", 2048)), int(cmd.get("reps", 7)),
                                       device))
        elif cmd["op"] == "gemm":
            _write(proto, {"median_s": _gemm_time(torch, cmd["case"], cmd["dtype"],
                                                  int(cmd.get("reps", 7)), device)})
        elif cmd["op"] == "flops":
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step.step()
            _write(proto, {"flops": int(counter.get_total_flops())})
        else:
            _write(proto, {"error": f"unknown op {cmd['op']!r}; allowed: run, peak, gemm, "
                                    "flops, quit"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
