"""The demo's outputs: sample pictures, the quality-vs-steps plot, the Markdown tables and the over-seeds summary.

``metrics`` dicts are ``{model: {"<steps>": {metric: value}}}`` (the layout of ``metrics.json``).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from tim_jax import atomic_files
from tim_jax.demo.data import GMM_GRID, GMM_SPACING, Dataset
from tim_jax.demo.evaluate import METRIC_DOCS
from tim_jax.demo.settings import MODELS, PRIMARY_METRIC

PLOT_TITLES = {"fd": "Fréchet distance to real digits (lower is better)",
               "class_acc": "class accuracy of the samples (higher is better)",
               "swd": "sliced Wasserstein distance (lower is better)"}
GRID_PER_CLASS = 12   # samples per class row of a digits grid
GRID_PAD = 1          # pixels between digits (before scaling)
GRID_SCALE = 4        # nearest-neighbour upscaling of the digits grid
SCATTER_INCHES, SCATTER_DPI = 3.2, 100
PLOT_INCHES, PLOT_DPI = (4.6, 3.6), 110   # per metric panel


def metric_names(dataset: str) -> list[str]:
    return ["fd", "class_acc"] if dataset == "digits" else ["swd"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def digits_grid(samples: np.ndarray, labels: np.ndarray, num_classes: int,
                per_class: int = GRID_PER_CLASS) -> np.ndarray:
    """uint8 picture (rows, cols): one row per class of its first ``per_class`` samples (N, h, w, 1) in [-1, 1],
    dark ink on white like the scanned digits, each digit followed by GRID_PAD white pixels, upscaled GRID_SCALE x.
    """
    h, w = samples.shape[1:3]
    pad = GRID_PAD
    rows = []
    for c in range(num_classes):
        imgs = samples[labels == c][:per_class, ..., 0]
        row = np.full((h + pad, per_class * (w + pad)), -1.0, np.float32)
        for j, im in enumerate(imgs):
            row[:h, j * (w + pad) : j * (w + pad) + w] = im
        rows.append(row)
    grid = np.clip((np.concatenate(rows) + 1.0) / 2.0, 0.0, 1.0)
    grid = (255 * (1.0 - grid)).astype(np.uint8)
    return np.repeat(np.repeat(grid, GRID_SCALE, axis=0), GRID_SCALE, axis=1)


def save_sample_picture(path: str, samples: np.ndarray, labels: np.ndarray, data: Dataset, title: str) -> None:
    """digits: :func:`digits_grid` as PNG; gmm: a scatter coloured by class (SCATTER_INCHES square)."""
    if data.name == "digits":
        from PIL import Image

        Image.fromarray(digits_grid(samples, labels, data.num_classes)).save(path)
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(SCATTER_INCHES, SCATTER_INCHES))
    pts = samples.reshape(-1, 2)
    for c in range(data.num_classes):
        sel = labels == c
        ax.scatter(pts[sel, 0], pts[sel, 1], s=1, alpha=0.4, label=f"class {c}")
    lim = (GMM_GRID / 2 + 0.5) * GMM_SPACING
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=SCATTER_DPI)
    plt.close(fig)


def save_quality_plot(path: str, metrics: dict, info: dict, dataset: str) -> None:
    """One panel per metric: value vs sampling steps (log 2 axis) for each model, the real-vs-real reference."""
    import matplotlib.ticker

    plt = _pyplot()
    names = metric_names(dataset)
    fig, axes = plt.subplots(1, len(names), figsize=(PLOT_INCHES[0] * len(names), PLOT_INCHES[1]), squeeze=False)
    for ax, name in zip(axes[0], names):
        for model, style in zip(MODELS, ("o-", "s--")):
            steps = sorted(int(s) for s in metrics.get(model, {}))
            if steps:
                ax.plot(steps, [metrics[model][str(s)][name] for s in steps], style, label=model)
        ref = info.get("fd_real_halves" if name == "fd" else "swd_real_vs_real") if name != "class_acc" else None
        if ref is not None:
            ax.axhline(ref, color="gray", lw=0.8, ls=":", label="real vs real")
        ax.set_xscale("log", base=2)
        steps_all = sorted({int(s) for m in MODELS for s in metrics.get(m, {})})
        ax.set_xticks(steps_all, [str(s) for s in steps_all])
        if name != "class_acc":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set(xlabel="sampling steps (= network evaluations)", ylabel=name, title=PLOT_TITLES[name])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def metrics_markdown(metrics: dict, info: dict, dataset: str) -> str:
    """The Markdown table: one row per step count, one column per (model, metric)."""
    names = metric_names(dataset)
    steps = sorted({int(s) for m in MODELS for s in metrics.get(m, {})})
    head = "| steps | " + " | ".join(f"{m} {n}" for n in names for m in MODELS) + " |"
    sep = "|---:|" + "---:|" * (len(names) * len(MODELS))
    rows = []
    for s in steps:
        cells = []
        for n in names:
            for m in MODELS:
                v = metrics.get(m, {}).get(str(s), {}).get(n)
                cells.append("" if v is None else f"{v:.3f}")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    lines = [head, sep, *rows, ""]
    lines += [f"- {line.strip()}" for line in info.get("summary", [])]
    lines += [f"- `{n}`: {METRIC_DOCS[n]}" for n in names]
    for key in ("classifier_heldout_accuracy", "fd_real_halves", "swd_real_vs_real"):
        if key in info:
            lines.append(f"- `{key}`: {info[key]:.4f}")
    return "\n".join(lines) + "\n"


def any_step_summary(metrics: dict, dataset: str) -> list[str]:
    """Plain-language comparison lines: TiM vs flow matching at the fewest and the most steps, TiM's own spread."""
    name = PRIMARY_METRIC[dataset]
    tim, fm = metrics.get("tim", {}), metrics.get("flow_matching", {})
    steps = sorted(int(s) for s in tim if s in fm)
    if not steps:
        return []
    lines = []
    for s in sorted({steps[0], steps[min(1, len(steps) - 1)], steps[-1]}):
        a, b = tim[str(s)][name], fm[str(s)][name]
        lines.append(f"{s:>3} step{'s' if s > 1 else ' '}: TiM {name} {a:.3f} vs flow matching {b:.3f} "
                     f"(ratio {a / b:.2f})" if b > 0 else f"{s} steps: TiM {a:.3f} vs flow matching {b:.3f}")
    values = [tim[str(s)][name] for s in steps]
    best = int(np.argmin(values))
    lines.append(f"TiM {name} over {steps[0]}..{steps[-1]} steps: best {values[best]:.3f} at {steps[best]} steps, "
                 f"worst {max(values):.3f}")
    return lines


def aggregate_seeds(per_seed: dict[int, dict], dataset: str) -> dict:
    """Mean / std / per-seed values of every metric over several runs (``{seed: metrics.json dict}``).

    Returns ``{"seeds": [...], "metrics": {model: {steps: {metric: {"mean", "std", "values"}}}}, "paired": {...}}``
    where ``paired`` holds, for the primary metric, the per-seed differences that the any-step claims are about
    (each seed's TiM and flow matching share the data order, init seed and sampling noise, so differences within a
    seed cancel much of the run-to-run noise): ``tim_minus_fm`` at every step count and ``tim_rise`` = TiM at the
    most steps minus TiM's best over all step counts.
    """
    seeds = sorted(per_seed)
    name = PRIMARY_METRIC[dataset]
    first = per_seed[seeds[0]]
    out: dict[str, Any] = {"seeds": seeds, "metrics": {}, "paired": {"metric": name}}

    def stats(values):
        v = np.asarray(values, np.float64)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "values": [float(x) for x in v]}

    for model, by_steps in first.items():
        out["metrics"][model] = {
            st: {m: stats([per_seed[s][model][st][m] for s in seeds]) for m in metrics}
            for st, metrics in by_steps.items()}
    if "tim" in first and "flow_matching" in first:
        steps = sorted((int(s) for s in first["tim"] if s in first["flow_matching"]))
        out["paired"]["tim_minus_fm"] = {
            str(st): stats([per_seed[s]["tim"][str(st)][name] - per_seed[s]["flow_matching"][str(st)][name]
                            for s in seeds]) for st in steps}
        out["paired"]["tim_rise"] = stats([
            per_seed[s]["tim"][str(steps[-1])][name] - min(per_seed[s]["tim"][str(st)][name] for st in steps)
            for s in seeds])
    return out


def seeds_markdown(agg: dict, dataset: str) -> str:
    """The over-seeds table: mean +- std (sample std over seeds) per model and step count, then the paired lines."""
    name = agg["paired"]["metric"]
    models = list(agg["metrics"])
    steps = sorted({int(st) for m in models for st in agg["metrics"][m]})
    head = "| steps | " + " | ".join(f"{m} {name} (mean ± std)" for m in models) + " |"
    lines = [f"{len(agg['seeds'])} seeds ({', '.join(map(str, agg['seeds']))}), {dataset}:", "", head,
             "|---:|" + "---:|" * len(models)]
    for st in steps:
        cells = []
        for m in models:
            v = agg["metrics"][m].get(str(st), {}).get(name)
            cells.append("" if v is None else f"{v['mean']:.3f} ± {v['std']:.3f}")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines.append("")
    for st, v in agg["paired"].get("tim_minus_fm", {}).items():
        lines.append(f"- TiM − flow matching at {st} step(s), per seed: {v['mean']:+.3f} ± {v['std']:.3f} "
                     f"({', '.join(f'{x:+.3f}' for x in v['values'])})")
    if "tim_rise" in agg["paired"]:
        v = agg["paired"]["tim_rise"]
        lines.append(f"- TiM at the most steps minus TiM's best, per seed: {v['mean']:+.3f} ± {v['std']:.3f} "
                     f"({', '.join(f'{x:+.3f}' for x in v['values'])})")
    return "\n".join(lines) + "\n"


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, written to a temporary file first and renamed (no half-written file)."""
    atomic_files.write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
