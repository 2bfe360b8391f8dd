"""Training the demo's two models with the real TiM train step, in this process or two pinned worker processes.

The progress bars show ``mse``: the objective's unweighted mean squared error between the network output and its
regression target (metric ``mse`` of :func:`tim_jax.objective.tim_loss`), averaged over the steps since the last
update. The optimised ``loss`` is not shown: its adaptive weight 1 / (sg(L_i) + eps) divides each row's loss by
(about) itself, so the loss stays near the mean time weight however good the fit is.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tim_jax.demo.data import Dataset
from tim_jax.demo.settings import MODELS, DemoSettings, model_fn_for

SHOWN_METRIC = "mse"   # what the progress bars show (see the module docstring)


@dataclasses.dataclass
class TrainResult:
    params: Any            # EMA params of the first config.ema.decays entry (pure dict)
    graphdef: Any
    steps: int
    compile_seconds: float
    train_seconds: float   # wall time after the first (compiling) call
    final_loss: float      # the optimised (weighted) loss of the last step
    final_mse: float       # the unweighted MSE, mean over the last jitted call's steps
    ema_params: dict = dataclasses.field(default_factory=dict)   # every EMA copy, by train_state.ema_key(decay)


def train_model(config, model_fn: Callable, data: Dataset, *, max_seconds: float, desc: str,
                progress: bool = True, steps_per_call: int = 50,
                on_progress: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Train one model with the real TiM train step on the first device; returns its EMA params.

    The step is :func:`tim_jax.training.step.train_step_fn` (objective + clipping + AdamW + EMA, skip on
    non-finite), run ``steps_per_call`` times per jitted call with ``lax.scan`` over stacked batches: the demo
    networks are so small that per-call dispatch would otherwise dominate on CPU. After every jitted call the bar
    shows ``{SHOWN_METRIC: value}`` and ``on_progress(steps_done, shown)`` receives the same dict (floats).
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from tim_jax.training import optimizer as optim
    from tim_jax.training import sharding
    from tim_jax.training import state as train_state
    from tim_jax.training import step as train_step

    mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
    tx, schedule = optim.make_optimizer(config)
    state, _, graphdef = train_state.create_train_state(config, mesh, model_fn=model_fn, tx=tx)
    step = train_step.train_step_fn(config, graphdef, tx=tx, schedule=schedule)

    def many_steps(state, batches):
        state, metrics = jax.lax.scan(step, state, batches)
        return state, {"loss": metrics["loss"][-1], SHOWN_METRIC: jnp.mean(metrics[SHOWN_METRIC]),
                       "finite": metrics["finite"].min()}

    many_steps = jax.jit(many_steps, donate_argnums=(0,))
    batch_size = int(config.data.global_batch_size)
    num_steps = int(config.train.num_steps)
    next_batches = batch_stream(data, batch_size, seed=config.seed)
    t0 = time.perf_counter()
    t_loop, compile_s, loss, shown, done = None, 0.0, float("nan"), {SHOWN_METRIC: float("nan")}, 0
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=True, dynamic_ncols=True, mininterval=0.5)
    while done < num_steps:
        k = min(steps_per_call, num_steps - done)
        state, metrics = many_steps(state, next_batches(k))
        loss, finite = float(metrics["loss"]), float(metrics["finite"])
        shown = {SHOWN_METRIC: float(metrics[SHOWN_METRIC])}
        if not finite:
            raise RuntimeError(f"{desc}: non-finite loss or gradient within steps {done}..{done + k - 1}")
        if t_loop is None:
            compile_s = time.perf_counter() - t0
            t_loop = time.perf_counter()
        done += k
        bar.set_postfix({name: f"{v:.4f}" for name, v in shown.items()}, refresh=False)
        bar.update(k)
        if on_progress is not None:
            on_progress(done, shown)
        if max_seconds and time.perf_counter() - t_loop >= max_seconds:
            break
    bar.close()
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - t_loop
    ema = jax.device_get(state.ema_params)
    return TrainResult(ema[train_state.ema_key(config.ema.decays[0])], graphdef, done, compile_s, train_s, loss,
                       shown[SHOWN_METRIC], ema_params=ema)


def batch_stream(data: Dataset, batch_size: int, seed: int) -> Callable[[int], dict]:
    """``next_batches(k) -> {"x": (k, B, ...), "cond": (k, B)}``: epochs of a seeded random order, rows drawn
    without replacement within an epoch (a batch may span two epochs)."""
    rng = np.random.default_rng(seed)
    n = len(data.x)
    order, pos = rng.permutation(n), 0

    def next_indices():
        nonlocal order, pos
        idx = []
        while len(idx) < batch_size:
            take = order[pos : pos + batch_size - len(idx)]
            idx.extend(take.tolist())
            pos += len(take)
            if pos >= n:
                order, pos = rng.permutation(n), 0
        return idx

    def next_batches(k: int) -> dict:
        idx = np.asarray([next_indices() for _ in range(k)])        # (k, B)
        return {"x": data.x[idx], "cond": data.y[idx]}

    return next_batches


def _train_worker(conn, settings: DemoSettings, data: Dataset, config, model: str, cpus: Sequence[int]) -> None:
    """Child process of :func:`train_models_in_parallel`: pinned to ``cpus`` BEFORE jax is imported (XLA sizes its
    thread pool from the affinity mask), trains ``model`` on the parent's ``data`` with the parent's ``config`` and
    sends ``("progress", (steps, shown))`` messages, then ``("done", fields)`` (or ``("error", text)``)."""
    import traceback

    try:
        os.sched_setaffinity(0, cpus)
        result = train_model(config, model_fn_for(settings, data, config), data, max_seconds=settings.train_seconds,
                             desc=model, progress=False,
                             on_progress=lambda done, shown: conn.send(("progress", (done, shown))))
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "graphdef"}
        conn.send(("done", fields))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which raises
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def can_train_in_parallel() -> bool:
    """Whether this process may use two disjoint CPU sets (Linux affinity API and at least 2 CPUs)."""
    return hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def train_models_in_parallel(settings: DemoSettings, data: Dataset, configs: dict, *,
                             timeout_s: float = 24 * 3600.0) -> dict[str, TrainResult]:
    """Train every model of ``MODELS`` at once, one spawned process each, pinned to disjoint halves of the CPUs.

    The demo networks are too small for XLA to use two cores well within one step, so two single-core trainings side
    by side take about the wall time of one. Results are the same training as :func:`train_model` in this process
    (same seed, data order and step); the parent rebuilds the graphdef. One bar counts both models' steps and shows
    each model's ``mse``.
    """
    import multiprocessing

    from tqdm.auto import tqdm

    from tim_jax.training import state as train_state

    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    groups = dict(zip(MODELS, (cpus[:half], cpus[half:])))
    ctx = multiprocessing.get_context("spawn")     # no fork after jax is imported
    procs = {}
    for model in MODELS:
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_train_worker, args=(child_end, settings, data, configs[model], model,
                                                       groups[model]), daemon=True, name=f"tim-demo-train-{model}")
        proc.start()
        child_end.close()
        procs[model] = (proc, parent_end)
    total = int(settings.train_steps) * len(MODELS)
    bar = tqdm(total=total, desc="train " + " + ".join(MODELS), disable=not settings.progress, leave=True,
               dynamic_ncols=True, mininterval=0.5)
    done = {m: 0 for m in MODELS}
    postfix: dict[str, str] = {}
    results: dict[str, TrainResult] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < len(MODELS):
            if time.monotonic() > deadline:
                raise RuntimeError(f"training did not finish within {timeout_s:.0f} s")
            for model, (proc, conn) in procs.items():
                if model in results:
                    continue
                if not conn.poll(0.1):
                    if not proc.is_alive() and not conn.poll(0):
                        raise RuntimeError(f"the {model} training process died (exit code {proc.exitcode})")
                    continue
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    raise RuntimeError(f"the {model} training process died (exit code {proc.exitcode})") from None
                if kind == "progress":
                    steps, shown = payload
                    bar.update(steps - done[model])
                    done[model] = steps
                    postfix.update({f"{model} {name}": f"{v:.4f}" for name, v in shown.items()})
                    bar.set_postfix(postfix, refresh=False)
                elif kind == "error":
                    raise RuntimeError(f"training {model} failed in its worker process:\n{payload}")
                else:
                    graphdef = train_state.abstract_run_params(configs[model], model_fn_for(settings, data,
                                                                                      configs[model]))[0]
                    results[model] = TrainResult(graphdef=graphdef, **payload)
    finally:
        bar.close()
        for proc, conn in procs.values():
            conn.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results
