"""Times the official PyTorch TiM training step or sampler; the torch half of ``tim_jax.bench``.

This file is run as a script by a *torch* interpreter (not the JAX one), as a long-lived
subprocess of ``python -m tim_jax.bench official`` (the training step) or of
``python -m tim_jax.bench.sample`` (the sampler, ``spec["mode"] == "sample"``)::

    /path/to/torch/python tim_jax/interop/torch_driver.py --spec '<json>'

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

Three in-process shims make the GPU-only code run on a CPU; none changes what is timed (the
first and the last come from ``torch_shims.py`` beside this file, loaded by its location):

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
  GEMM of the step alone, as torch runs it (``tim_jax.bench.gemms.gemm_cases`` lists them).
* ``{"op": "flops"}`` -> ``{"flops": int}``: one step under ``torch.utils.flop_counter``
  (matmuls and attention only).
* ``{"op": "sample", "weights": F.safetensors, "inputs": F.npz, "num_steps": n, "cfg_scale": s,
  "cfg_low": lo, "cfg_high": hi, "T_max": T, "T_min": 0.0, "calls": k, "save": F.npy | null}``
  -> ``{"times": [s, ...], "n_params", "build_s", "attn_type", "precision"}``: the official
  any-step sampler (``TransitionSchedule.sample``, transition mode, CFG inside the window, no
  stochasticity) of a ``TiM`` built from ``spec["model"]`` with the official-layout state dict
  ``weights`` (loaded strictly), run ``k`` times on the fixed batch of ``inputs`` (``z``
  (B, C, H, W) float32 noise, ``y`` (B,) labels, ``y_null`` (B,) the null label), each call
  timed with ``time.perf_counter`` (``k = 0``: none timed). ``save``: the final latents of one
  extra, untimed, call as float32 NCHW ``.npy``. The sampler is built on the first command and
  reused while ``weights``, ``inputs`` and the settings stay the same. ``spec["precision"]``:
  ``"float32"``; ``"bfloat16"``, as the official sample script (``model.to(bfloat16)`` and
  bf16 noise; its time grid then is bf16 too); ``"autocast_bf16"`` (float32 weights under
  ``torch.autocast(<device>, bfloat16)``). ``spec["attn_type"]``: ``"auto"`` (the official
  sampler's ``flash_attn`` where a real ``flash_attn`` is installed, on CUDA, in bf16; else
  ``F.scaled_dot_product_attention``) or an official ``attn_type``.
* ``{"op": "quit"}`` -> exits.

With ``spec["mode"] == "sample"`` no training step is built (``run`` and ``flops`` answer an
error) and the spec needs only ``official_repo``, ``model``, ``transport``, ``device``,
``threads``, ``seed`` and the two sampler fields above.

Everything else the official code prints goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import os
import resource
import sys
import time


def _write(stream, obj) -> None:
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


def _load_torch_shims():
    """``tim_jax/interop/torch_shims.py``, loaded by its location beside this file (this script
    runs under a torch interpreter that need not have tim_jax installed)."""
    name = "tim_jax_torch_shims"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_shims.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


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

    done = _load_torch_shims().prepare_official_imports(timm_standins=False)
    rng_shim = not torch.cuda.is_available()
    if rng_shim:
        torch.cuda.get_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
        torch.cuda.set_rng_state = lambda *a, **k: None
    return {"torchvision_shim": done["torchvision_shim"],
            "flash_attn_stub": done["flash_attn_stub"], "cuda_rng_shim": rng_shim}


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


SAMPLE_KEYS = ("weights", "inputs", "num_steps", "cfg_scale", "cfg_low", "cfg_high", "T_max",
               "T_min")
PRECISIONS = ("float32", "bfloat16", "autocast_bf16")


def _sample_attn_type(spec: dict, dev, precision: str) -> str:
    """``spec["attn_type"]`` with ``"auto"`` resolved: the official sampler's default
    ``flash_attn`` where a real one is installed, on CUDA, in bf16; else ``fused_attn``."""
    want = spec.get("attn_type", "auto")
    if want != "auto":
        return want
    fa = sys.modules.get("flash_attn")
    real = fa is not None and not getattr(fa, "_tim_jax_stub", False)
    return "flash_attn" if real and dev.type == "cuda" and precision != "float32" else "fused_attn"


class OfficialSampler:
    """The official any-step sampler on a fixed batch (the ``sample`` op of the module docstring)."""

    def __init__(self, spec: dict, cmd: dict):
        import numpy as np
        import torch
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        self.torch = torch
        if spec["official_repo"] not in sys.path:
            sys.path.insert(0, spec["official_repo"])
        from tim.models.c2i.tim_model import TiM
        from tim.schedulers import transports
        from tim.schedulers.transition import TransitionSchedule

        self.dev = dev = torch.device(spec.get("device", "cpu"))
        self.precision = spec.get("precision", "float32")
        if self.precision not in PRECISIONS:
            raise ValueError(f"spec precision must be one of {PRECISIONS}, got {self.precision!r}")
        model = TiM(**spec["model"])
        model.load_state_dict(load_file(cmd["weights"]), strict=True)
        model = model.eval().requires_grad_(False).to(dev)
        self.n_params = sum(q.numel() for q in model.parameters())
        inputs = np.load(cmd["inputs"])
        z = torch.from_numpy(np.ascontiguousarray(inputs["z"], dtype=np.float32)).to(dev)
        self.y = torch.from_numpy(np.asarray(inputs["y"], dtype=np.int64)).to(dev)
        self.y_null = torch.from_numpy(np.asarray(inputs["y_null"], dtype=np.int64)).to(dev)
        if self.precision == "bfloat16":  # the official sample script: bf16 weights and noise
            model, z = model.to(dtype=torch.bfloat16), z.to(torch.bfloat16)
        self.z = z
        self.attn_type = attn = _sample_attn_type(spec, dev, self.precision)
        self.net = lambda x, t, r, y: model(x, t, r, y, attn_type=attn)
        tr = spec["transport"]
        tcls = getattr(transports, tr["name"])
        accepted = inspect.signature(tcls.__init__).parameters
        self.schedule = TransitionSchedule(
            transport=tcls(**{k: v for k, v in tr.get("params", {}).items() if k in accepted}))
        self.settings = {k: cmd[k] for k in SAMPLE_KEYS}
        self.build_s = time.perf_counter() - t0

    def __call__(self):
        """One whole sampler call; returns the final latents (B, C, H, W) float32."""
        torch, st = self.torch, self.settings
        with torch.no_grad(), torch.autocast(self.dev.type, dtype=torch.bfloat16,
                                             enabled=self.precision == "autocast_bf16"):
            out = self.schedule.sample(
                self.net, self.y, self.y_null, self.z, T_max=float(st["T_max"]),
                T_min=float(st["T_min"]), num_steps=int(st["num_steps"]),
                cfg_scale=float(st["cfg_scale"]), cfg_low=float(st["cfg_low"]),
                cfg_high=float(st["cfg_high"]), stochasticity_ratio=0.0,
                sample_type="transition")[-1]
        _sync(torch, self.dev)
        return out

    def run(self, calls: int, save=None) -> dict:
        """``calls`` timed sampler calls (and with ``save`` one more, untimed, whose final
        latents are written there as float32 NCHW ``.npy``)."""
        import numpy as np

        times = []
        for _ in range(int(calls)):
            s = time.perf_counter()
            self()
            times.append(time.perf_counter() - s)
        if save:
            np.save(save, self().float().cpu().numpy())
        out = {"times": times, "n_params": self.n_params, "build_s": self.build_s,
               "attn_type": self.attn_type, "precision": self.precision}
        if self.dev.type == "cuda":
            out["cuda_max_allocated_mib"] = self.torch.cuda.max_memory_allocated() / 2 ** 20
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
    runs it (``tim_jax.bench.gemms.gemm_cases`` kinds; operands in ``dtype``, as autocast casts
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
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    step = OfficialStep(spec) if spec.get("mode", "train") == "train" else None
    sampler = None
    gpu = {"device_name": torch.cuda.get_device_name()} if device == "cuda" else {}
    _write(proto, {
        "ready": True, "build_s": time.perf_counter() - t0,
        "n_params": step.n_params if step else None, "mode": spec.get("mode", "train"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), **shims, **gpu,
    })
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] in ("run", "flops") and step is None:
            _write(proto, {"error": f"op {cmd['op']!r} needs the training step; this driver was "
                                    "started with spec mode 'sample'"})
        elif cmd["op"] == "sample":
            try:
                if sampler is None or sampler.settings != {k: cmd.get(k) for k in SAMPLE_KEYS}:
                    sampler = None  # free the previous model first
                    sampler = OfficialSampler(spec, cmd)
                _write(proto, sampler.run(int(cmd.get("calls", 1)), cmd.get("save")))
            except (KeyError, ValueError, RuntimeError, OSError) as e:
                _write(proto, {"error": f"sample: {type(e).__name__}: {e}"})
        elif cmd["op"] == "run":
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
                                    "flops, sample, quit"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
