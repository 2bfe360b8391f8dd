"""Outputs of an FID-vs-steps run: ``results.json``, ``results.md``, ``fid_vs_nfe.png``.

``results.json``: ``{"settings": {...}, "reference": {...}, "results": [row, ...]}`` with one row
per step count: ``steps``, ``nfe`` (network evaluations per sample: steps + guided steps),
``fid``, ``inception_score``, ``num_samples``. The paper's ImageNet numbers are printed beside
ours in ``results.md`` when the run is a 256 x 256 ImageNet run (1000 classes): they come from the
ADM evaluator (TF Inception), so expect small differences (see docs/evaluation.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tim_jax import atomic_files

__all__ = ["write_results", "PAPER_IMAGENET"]

# Official README (WZDTHU/TiM): TiM-C2I 2-NFE / 500-NFE FID on ImageNet (50k samples, ADM suite).
PAPER_IMAGENET = {256: {"2-NFE": 6.14, "500-NFE": 1.65}, 512: {"2-NFE": 4.79, "500-NFE": 1.69}}


def _markdown(settings: dict, reference: dict, rows: list[dict]) -> str:
    lines = ["# FID vs number of steps", "",
             f"- checkpoint: `{settings.get('checkpoint')}`",
             f"- samples per step count: {settings.get('num_samples')}, image size "
             f"{settings.get('image_size')}, seed {settings.get('seed')}, labels "
             f"{settings.get('label_balance')}",
             f"- guidance: scale {settings.get('cfg_scale')} on {settings.get('cfg_interval')}, "
             f"stochasticity {settings.get('stochasticity')}, mode {settings.get('mode')}",
             f"- reference: {reference.get('source')} ({reference.get('kind')})",
             f"- features: {settings.get('features')}", "",
             "| steps | NFE | FID | Inception Score | samples |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        fid = "-" if r["fid"] is None else f"{r['fid']:.3f}"
        lines.append(f"| {r['steps']} | {r['nfe']} | {fid} | "
                     f"{r['inception_score']:.2f} | {r['num_samples']} |")
    paper = PAPER_IMAGENET.get(settings.get("image_size"))
    if paper and settings.get("num_classes") == 1000:
        lines += ["", "Paper (TiM-C2I, 50k samples, ADM TensorFlow evaluator): "
                  + ", ".join(f"{k} FID {v}" for k, v in paper.items())
                  + ". Official settings: 1 step without guidance; 250 steps with cfg 2.5 on "
                  "[0, 0.6] (256) or 3.0 on [0, 0.7] (512), stochasticity 0.2."]
    lines += ["", "NFE = network evaluations per sample (a guided step costs two). FID from "
              "pytorch-fid's Inception; see docs/evaluation.md for how it differs from the ADM "
              "evaluator."]
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    nfe = [r["nfe"] for r in rows]
    have = [r for r in rows if r["fid"] is not None]
    key, label = ("fid", "FID") if have else ("inception_score", "Inception Score")
    ax.plot(nfe, [r[key] for r in rows], "o-", color="tab:blue")
    for r in rows:
        ax.annotate(f"{r['steps']} st.", (r["nfe"], r[key]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    if len(set(nfe)) > 1 and max(nfe) / max(min(nfe), 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(out_dir, settings: dict, reference: dict, rows: list[dict]) -> dict:
    """Write the three outputs into ``out_dir``; returns the JSON object."""
    out = Path(out_dir)
    rows = sorted(rows, key=lambda r: (r["nfe"], r["steps"]))
    data = {"settings": settings, "reference": reference, "results": rows}
    atomic_files.write_text(out / "results.json", json.dumps(data, indent=1) + "\n")
    atomic_files.write_text(out / "results.md", _markdown(settings, reference, rows))
    _plot(out / "fid_vs_nfe.png", rows,
          f"{Path(str(settings.get('checkpoint'))).name}: FID vs NFE "
          f"({settings.get('num_samples')} samples)")
    return data
