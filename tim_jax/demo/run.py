"""One whole demo run (:func:`run_demo`) and the same over several seeds (:func:`run_seeds`).

A run: load the data, build the two configs (TiM and flow matching), set up the evaluation, train both models
(side by side in two pinned processes where there are >= 2 CPUs), sample each with every step count from the same
noise and labels (TiM with its transition sampler, flow matching with Euler on its velocity), score the samples
and write the output folder (file list: :mod:`tim_jax.demo.cli`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tim_jax.demo import report
from tim_jax.demo.data import load_dataset, sample_labels
from tim_jax.demo.evaluate import Evaluator, generate
from tim_jax.demo.settings import MODELS, PRIMARY_METRIC, DemoError, DemoSettings, make_config, model_fn_for
from tim_jax.demo.train import can_train_in_parallel, train_model, train_models_in_parallel


def prepare_out_dir(out: str) -> str:
    """Create ``out`` and check that it is writable; DemoError (exit 2) naming the folder otherwise."""
    out = os.path.abspath(out)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".tim_demo_write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise DemoError(f"output folder {out!r} is not writable: {e.strerror or e}") from e
    return out


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> dict:
    """Run the whole demo (see the module docstring); returns ``{"metrics": ..., "run": ...}``.

    ``metrics.json`` is (re)written after every evaluated model, so the folder always holds the figures so far.
    """
    settings = settings.resolved()
    settings.validate()
    out = prepare_out_dir(settings.out)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    import jax

    from tim_jax.models.functional import make_apply_fn
    from tim_jax.training import step as train_step

    data = load_dataset(settings.dataset, settings.seed)
    configs = {model: make_config(settings, data, model) for model in MODELS}   # bad --set fails here, early
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    report.write_json(os.path.join(out, "metrics.json"), metrics)
    run: dict[str, Any] = {
        "dataset": settings.dataset, "seed": settings.seed, "steps": list(settings.steps),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("progress",)},
        "device": str(jax.devices()[0]), "load_average_start": _loadavg(), "models": {},
    }
    log(f"[demo] dataset={settings.dataset}: {len(data.x)} rows of shape {data.x.shape[1:]}, "
        f"{data.num_classes} classes; output -> {out}")

    evaluator = Evaluator(data)
    run.update(evaluator.info)
    if settings.dataset == "digits":
        log(f"[demo] feature classifier: held-out accuracy {evaluator.info['classifier_heldout_accuracy']:.3f}, "
            f"real-vs-real FD {evaluator.info['fd_real_halves']:.3f}")
    labels = sample_labels(data, settings.num_samples)
    shape = tuple(data.x.shape[1:])
    apply_fn = None
    parallel = settings.parallel and can_train_in_parallel()
    run["parallel_training"] = parallel
    trained = {}
    if parallel:
        log(f"[demo] training {' and '.join(MODELS)} side by side, each on {len(os.sched_getaffinity(0)) // 2} "
            "CPU core(s)")
        t_train = time.perf_counter()
        trained = train_models_in_parallel(settings, data, configs)
        run["parallel_train_wall_seconds"] = round(time.perf_counter() - t_train, 1)
    for model in MODELS:
        config = configs[model]
        result = trained.get(model) or train_model(
            config, model_fn_for(settings, data, config), data, max_seconds=settings.train_seconds,
            desc=f"train {model}", progress=settings.progress)
        if apply_fn is None:   # one apply_fn for both models: the sampler compiles once per (steps, mode)
            apply_fn = make_apply_fn(result.graphdef)
        transport = train_step.make_objective_config(config).transport
        mode = "transition" if model == "tim" else "diffusion"
        t0 = time.perf_counter()
        metrics[model] = {}
        for num_steps in settings.steps:
            x = generate(apply_fn, result.params, transport, labels, shape, num_steps=num_steps, mode=mode,
                         seed=settings.seed + 1, null_label=data.num_classes)
            metrics[model][str(num_steps)] = evaluator(x, labels)
            report.save_sample_picture(os.path.join(out, f"samples_{model}_{num_steps}steps.png"), x, labels, data,
                                       title=f"{model}, {num_steps} step{'s' if num_steps > 1 else ''}")
        sample_s = time.perf_counter() - t0
        nparams = int(sum(np.size(a) for a in jax.tree.leaves(result.params)))
        run["models"][model] = {
            "mode": mode, "train_steps": result.steps, "compile_seconds": round(result.compile_seconds, 2),
            "train_seconds": round(result.train_seconds, 2), "sample_eval_seconds": round(sample_s, 2),
            "final_loss": result.final_loss, "final_mse": result.final_mse, "params": nparams,
            "objective": {k: config.objective[k] for k in ("diffusion_ratio", "consistency_ratio", "derivative")},
        }
        report.write_json(os.path.join(out, "metrics.json"), metrics)
        primary = PRIMARY_METRIC[settings.dataset]
        log(f"[demo] {model}: {result.steps} steps in {result.train_seconds:.1f}s (+{result.compile_seconds:.1f}s "
            f"compile), final mse {result.final_mse:.4f}; {primary} by steps: " +
            ", ".join(f"{s}: {metrics[model][str(s)][primary]:.3f}" for s in settings.steps))

    run["summary"] = report.any_step_summary(metrics, settings.dataset)
    for line in run["summary"]:
        log(f"[demo] {line}")
    run["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    run["process_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    run["load_average_end"] = _loadavg()
    report.write_json(os.path.join(out, "run.json"), run)
    report.write_text(os.path.join(out, "metrics.md"), report.metrics_markdown(metrics, run, settings.dataset))
    report.save_quality_plot(os.path.join(out, "quality_vs_steps.png"), metrics, run, settings.dataset)
    log(f"[demo] done in {run['wall_seconds']:.0f}s; wrote metrics.json, metrics.md, quality_vs_steps.png and "
        f"sample pictures to {out}")
    return {"metrics": metrics, "run": run}


def run_seeds(settings: DemoSettings, seeds: Sequence[int], log: Callable[[str], None] = print) -> dict:
    """The demo once per seed into ``<out>/seed_<s>/``, then ``<out>/metrics_over_seeds.{json,md}``."""
    per_seed = {}
    for s in seeds:
        sub = dataclasses.replace(settings, seed=int(s), out=os.path.join(settings.out, f"seed_{s}"))
        per_seed[int(s)] = run_demo(sub, log=log)["metrics"]
    agg = report.aggregate_seeds(per_seed, settings.dataset)
    report.write_json(os.path.join(settings.out, "metrics_over_seeds.json"), agg)
    md = report.seeds_markdown(agg, settings.dataset)
    report.write_text(os.path.join(settings.out, "metrics_over_seeds.md"), md)
    log("[demo] over seeds:\n" + md)
    return agg


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None
