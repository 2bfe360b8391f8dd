"""CPU demo: train TiM and a flow-matching baseline on a real small dataset and show the any-step property.

    python -m tim_jax.demo                       # digits, ~10 min on 2 CPU cores -> ./tim_demo/
    python -m tim_jax.demo --quick               # 2-D Gaussian mixture, ~1 min -> ./tim_demo_quick/

What it does (no download; everything ships with the installed packages):

1. Data. ``digits``: the UCI handwritten digits bundled with scikit-learn (1,797 grey 8x8 images, 10 classes,
   values 0..16 scaled to [-1, 1], NHWC (N, 8, 8, 1)). ``gmm`` (``--quick``): a 4x4 grid of Gaussians in 2-D,
   two classes in a checkerboard pattern, stored as (N, 1, 1, 2) "images".
2. Two models with the same network, data, seed and training budget, trained by the real sharded train step
   (:mod:`tim_jax.train_step`, AdamW + EMA) on one device:
     * ``tim``: the TiM objective (official row mix: half r = t, 10 % r = 0, the rest r < t);
     * ``flow_matching``: the same code with every row r = t (``diffusion_ratio = 1``, ``consistency_ratio = 0``).
   ``digits`` uses the class-conditional TiM transformer (:class:`tim_jax.models.TiMC2I`, pixel space, patch 2);
   ``gmm`` uses the small MLP transition network :class:`tim_jax.toy_models.MLPTiM`.
3. Sampling from the same noise and labels with 1, 2, 4, 8, 16 and 32 steps (``--steps``): TiM with its
   transition sampler (r = next time), flow matching with Euler on its velocity (``mode="diffusion"``).
4. Quality. ``digits``: the Fréchet distance (``fd``) between generated and real images in the feature space of a
   small MLP classifier trained on the real data in the same run (its held-out accuracy is reported), and the
   class accuracy (``class_acc``) of the generated images under that classifier. ``gmm``: the sliced Wasserstein
   distance (``swd``) to a fresh sample of the true mixture.
5. Output folder (``--out``): ``metrics.json`` (``{"tim": {"<steps>": {metric: value}}, "flow_matching": {...}}``),
   ``metrics.md`` (the same numbers as a Markdown table), ``quality_vs_steps.png``, one sample picture per model and
   step count (``samples_<model>_<steps>steps.png``: for digits a grid with one row per class), and ``run.json``
   (settings, timings, classifier accuracy, the real-vs-real reference distance).

Exit codes: 0 success, 2 bad command line (unknown dataset, unwritable output folder, bad option value).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

DATASETS = ("digits", "gmm")
MODELS = ("tim", "flow_matching")
METRIC_DOCS = {
    "fd": "Fréchet distance to the real digits in the classifier's feature space (lower is better)",
    "class_acc": "fraction of generated images the classifier assigns to their conditioning class",
    "swd": "sliced 2-Wasserstein distance to a fresh sample of the true mixture (lower is better)",
}
LR_SCHEDULES = ("warmup_cosine", "constant")
PRIMARY_METRIC = {"digits": "fd", "gmm": "swd"}
PLOT_TITLES = {"fd": "Fréchet distance to real digits (lower is better)",
               "class_acc": "class accuracy of the samples (higher is better)",
               "swd": "sliced Wasserstein distance (lower is better)"}


class DemoError(Exception):
    """A problem with the command line or the environment: printed as one line, exit code 2."""


# --------------------------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Everything one demo run depends on (``None`` fields take the dataset's default, see ``DEFAULTS``).

    Budget: each model trains for ``train_steps`` optimizer steps or ``train_seconds`` seconds of wall time
    (measured after the first, compiling step), whichever comes first (0 seconds = no time limit).
    """

    dataset: str = "digits"
    out: str = "tim_demo"
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seed: int = 0
    train_steps: Optional[int] = None
    train_seconds: float = 0.0
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_schedule: Optional[str] = None
    ema_decay: Optional[float] = None
    num_samples: Optional[int] = None
    width: Optional[int] = None
    depth: Optional[int] = None
    overrides: tuple[tuple[str, Any], ...] = ()
    progress: bool = True
    parallel: bool = True    # train the two models at once, each process pinned to half of the CPUs (>= 2 CPUs)

    def resolved(self) -> "DemoSettings":
        """A copy with every ``None`` replaced by the dataset default."""
        if self.dataset not in DATASETS:
            raise DemoError(f"unknown dataset {self.dataset!r}; choose one of {list(DATASETS)}")
        d = DEFAULTS[self.dataset]
        return dataclasses.replace(self, **{k: (d[k] if getattr(self, k) is None else getattr(self, k)) for k in d})

    def validate(self) -> None:
        if not self.steps or any((not isinstance(s, int)) or s < 1 for s in self.steps):
            raise DemoError(f"steps must be a non-empty list of integers >= 1; got {list(self.steps)}")
        for name in ("train_steps", "batch_size", "num_samples", "width", "depth"):
            if getattr(self, name) < 1:
                raise DemoError(f"{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.train_seconds < 0:
            raise DemoError(f"train-seconds must be >= 0; got {self.train_seconds}")
        if not self.lr > 0:
            raise DemoError(f"lr must be > 0; got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DemoError(f"lr-schedule must be one of {list(LR_SCHEDULES)}; got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DemoError(f"ema-decay must be in [0, 1); got {self.ema_decay}")


# Per-dataset defaults: chosen so that the full digits run takes about 10 minutes and --quick about a minute on an
# idle 2-core CPU (the two models train side by side, one core each), with the any-step property holding over seeds
# (see the README's demo section for the figures). Width 64 was too small for digits: TiM's FD then rose by 0.2-0.3
# from 4 to 32 steps on every seed (capacity-bound at the small intervals), and fewer than 3,000 steps at width 128
# brought the rise back.
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(train_steps=3000, batch_size=64, lr=2e-3, lr_schedule="warmup_cosine", ema_decay=0.995,
                   num_samples=2000, width=128, depth=3),
    "gmm": dict(train_steps=3000, batch_size=256, lr=2e-3, lr_schedule="warmup_cosine", ema_decay=0.995,
                num_samples=4000, width=64, depth=3),
}


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------


def load_digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits: images (1797, 8, 8, 1) float32 in [-1, 1] (0..16 / 8 - 1), labels (1797,) int32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return x, d.target.astype(np.int32)


GMM_GRID = 4          # modes on a GMM_GRID x GMM_GRID grid
GMM_SPACING = 1.0     # distance between neighbouring modes
GMM_STD = 0.1         # per-mode standard deviation


def sample_gmm(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n points of the 2-D toy mixture: (n, 1, 1, 2) float32 and labels (n,) int32.

    Modes at ((i - 1.5) * GMM_SPACING, (j - 1.5) * GMM_SPACING) for i, j in 0..3, equally likely, isotropic std
    GMM_STD; class (i + j) % 2 (checkerboard), so each class mean is the origin, where no data lives.
    """
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, GMM_GRID, n), rng.integers(0, GMM_GRID, n)
    centers = np.stack([i, j], -1) * GMM_SPACING - (GMM_GRID - 1) / 2 * GMM_SPACING
    x = centers + GMM_STD * rng.standard_normal((n, 2))
    return x.astype(np.float32).reshape(n, 1, 1, 2), ((i + j) % 2).astype(np.int32)


@dataclasses.dataclass
class Dataset:
    """Training data (x (N, H, W, C) float32, y (N,) int32) and what evaluation needs."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int


def load_dataset(name: str, seed: int) -> Dataset:
    if name == "digits":
        x, y = load_digits_dataset()
        return Dataset(name, x, y, 10)
    if name == "gmm":
        x, y = sample_gmm(20_000, seed=10_000 + seed)
        return Dataset(name, x, y, 2)
    raise DemoError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


# --------------------------------------------------------------------------------------------------------------------
# configs and training
# --------------------------------------------------------------------------------------------------------------------


def make_config(settings: DemoSettings, data: Dataset, model: str):
    """The ml_collections config of one model (``configs/base.py`` + demo values + ``settings.overrides``)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}; got {model!r}")
    c = base_config()
    c.seed = settings.seed
    m = c.model
    h, w, ch = data.x.shape[1:]
    m.num_classes = data.num_classes
    if settings.dataset == "digits":
        m.input_size, m.in_channels, m.patch_size = h, ch, 2
        m.hidden_size, m.depth = settings.width, settings.depth
        m.num_heads = max(1, settings.width // 16)
        m.lora_hidden_size = max(8, settings.width // 4)
        m.encoder_depth, m.projector_dim, m.z_dim = 1, 16, 8   # REPA is off: keep the unused projector tiny
    c.objective.repa_coeff = 0.0
    c.data.use_repa_target = False
    if settings.dataset == "gmm":
        # 2-D points: per-row losses do not concentrate, so the adaptive weight 1/(L_i + eps) would bias the
        # regression towards the conditional mode; the channel cosine term is degenerate for 2 channels. A huge
        # adaptive_eps makes the adaptive weight a constant (Adam is invariant to the scale).
        c.objective.use_dir_loss = False
        c.objective.adaptive_eps = 1e3
    if model == "flow_matching":
        c.objective.diffusion_ratio = 1.0
        c.objective.consistency_ratio = 0.0
    c.data.global_batch_size = settings.batch_size
    c.optim.lr = settings.lr
    c.optim.scale_lr = False
    c.optim.schedule = settings.lr_schedule
    # linear warm-up over the first 100 steps (at most a tenth of the run); the cosine decays to 0 at train_steps
    c.optim.warmup_steps = min(100, settings.train_steps // 10)
    c.ema.decays = (settings.ema_decay,)
    c.mesh.data, c.mesh.fsdp = 1, 1
    c.train.num_steps = settings.train_steps
    for key, value in settings.overrides:
        _set_override(c, key, value)
    return c


def base_config():
    """``configs/base.py``'s ``get_config()``: the importable ``configs`` package, else the file beside the package."""
    try:
        from configs import base
    except ImportError:
        import importlib.util
        import pathlib

        path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"
        if not path.is_file():
            raise DemoError("cannot find the run config configs/base.py (neither an importable 'configs' package "
                            f"nor {path})")
        spec = importlib.util.spec_from_file_location("_tim_jax_demo_base_config", path)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    return base.get_config()


def _set_override(config, key: str, value) -> None:
    """``config.<key> = value`` for an existing dotted field; DemoError naming the field otherwise."""
    node = config
    *path, leaf = key.split(".")
    try:
        for p in path:
            node = node[p]
        if leaf not in node:
            raise KeyError(leaf)
    except (KeyError, TypeError, AttributeError) as e:
        raise DemoError(f"--set {key}: no such config field") from e
    try:
        node[leaf] = value
    except TypeError as e:
        raise DemoError(f"--set {key}={value!r}: wrong type ({e})") from e


def model_fn_for(settings: DemoSettings, data: Dataset, config) -> Callable:
    """``rngs -> nnx.Module`` of the demo network."""
    if settings.dataset == "gmm":
        from tim_jax.toy_models import MLPTiM

        shape = tuple(data.x.shape[1:])
        return lambda rngs: MLPTiM(shape, data.num_classes, width=settings.width, depth=settings.depth, rngs=rngs)
    from tim_jax.models import presets

    return lambda rngs: presets.build_model(config.model, rngs)


@dataclasses.dataclass
class TrainResult:
    params: Any            # EMA params of the first config.ema.decays entry (pure dict)
    graphdef: Any
    steps: int
    compile_seconds: float
    train_seconds: float   # wall time after the first (compiling) call
    final_loss: float
    ema_params: dict = dataclasses.field(default_factory=dict)   # every EMA copy, by train_state.ema_key(decay)


def train_model(config, model_fn: Callable, data: Dataset, *, max_seconds: float, desc: str,
                progress: bool = True, steps_per_call: int = 50,
                on_progress: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Train one model with the real TiM train step on the first device; returns its EMA params.

    The step is :func:`tim_jax.train_step.train_step_fn` (objective + clipping + AdamW + EMA, skip on non-finite),
    run ``steps_per_call`` times per jitted call with ``lax.scan`` over stacked batches: the demo networks are so
    small that per-call dispatch would otherwise dominate on CPU. ``on_progress(steps_done, loss)`` is called after
    every jitted call.
    """
    import jax
    from tqdm.auto import tqdm

    from tim_jax import optim, sharding, train_state, train_step

    mesh = sharding.make_mesh(config, devices=jax.devices()[:1])
    tx, schedule = optim.make_optimizer(config)
    state, _, graphdef = train_state.create_train_state(config, mesh, model_fn=model_fn, tx=tx)
    step = train_step.train_step_fn(config, graphdef, tx=tx, schedule=schedule)

    def many_steps(state, batches):
        state, metrics = jax.lax.scan(step, state, batches)
        return state, {"loss": metrics["loss"][-1], "finite": metrics["finite"].min()}

    many_steps = jax.jit(many_steps, donate_argnums=(0,))
    batch_size = int(config.data.global_batch_size)
    num_steps = int(config.train.num_steps)
    rng = np.random.default_rng(config.seed)
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

    def stacked(k):
        idx = np.asarray([next_indices() for _ in range(k)])        # (k, B)
        return {"x": data.x[idx], "cond": data.y[idx]}

    t0 = time.perf_counter()
    t_loop, compile_s, loss, done = None, 0.0, float("nan"), 0
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=True, dynamic_ncols=True, mininterval=0.5)
    while done < num_steps:
        k = min(steps_per_call, num_steps - done)
        state, metrics = many_steps(state, stacked(k))
        loss, finite = float(metrics["loss"]), float(metrics["finite"])
        if not finite:
            raise RuntimeError(f"{desc}: non-finite loss or gradient within steps {done}..{done + k - 1}")
        if t_loop is None:
            compile_s = time.perf_counter() - t0
            t_loop = time.perf_counter()
        done += k
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(k)
        if on_progress is not None:
            on_progress(done, loss)
        if max_seconds and time.perf_counter() - t_loop >= max_seconds:
            break
    bar.close()
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - t_loop
    ema = jax.device_get(state.ema_params)
    return TrainResult(ema[train_state.ema_key(config.ema.decays[0])], graphdef, done, compile_s, train_s, loss,
                       ema_params=ema)


def _train_worker(conn, settings: "DemoSettings", data: Dataset, config, model: str, cpus: Sequence[int]) -> None:
    """Child process of :func:`train_models_in_parallel`: pinned to ``cpus`` BEFORE jax is imported (XLA sizes its
    thread pool from the affinity mask), trains ``model`` on the parent's ``data`` with the parent's ``config`` and
    sends ``("done", fields)`` (or ``("error", text)``)."""
    import traceback

    try:
        os.sched_setaffinity(0, cpus)
        result = train_model(config, model_fn_for(settings, data, config), data, max_seconds=settings.train_seconds,
                             desc=model, progress=False,
                             on_progress=lambda done, loss: conn.send(("progress", (done, loss))))
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "graphdef"}
        conn.send(("done", fields))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which raises
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def can_train_in_parallel() -> bool:
    """Whether this process may use two disjoint CPU sets (Linux affinity API and at least 2 CPUs)."""
    return hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def train_models_in_parallel(settings: "DemoSettings", data: Dataset, configs: dict, *,
                             timeout_s: float = 24 * 3600.0) -> dict[str, TrainResult]:
    """Train every model of ``MODELS`` at once, one spawned process each, pinned to disjoint halves of the CPUs.

    The demo networks are too small for XLA to use two cores well within one step, so two single-core trainings side
    by side finish in about the time of one two-core training. Results are the same training as
    :func:`train_model` in this process (same seed, data order and step); the parent rebuilds the graphdef.
    """
    import multiprocessing

    from tqdm.auto import tqdm

    from tim_jax import train_state

    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    groups = dict(zip(MODELS, (cpus[:half], cpus[half:])))
    ctx = multiprocessing.get_context("spawn")     # no fork after jax is imported
    procs = {}
    for model in MODELS:
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_train_worker, args=(child_end, settings, data, configs[model], model, groups[model]), daemon=True,
                           name=f"tim-demo-train-{model}")
        proc.start()
        child_end.close()
        procs[model] = (proc, parent_end)
    total = int(settings.train_steps) * len(MODELS)
    bar = tqdm(total=total, desc="train " + " + ".join(MODELS), disable=not settings.progress, leave=True,
               dynamic_ncols=True, mininterval=0.5)
    done = {m: 0 for m in MODELS}
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
                    steps, loss = payload
                    bar.update(steps - done[model])
                    done[model] = steps
                    bar.set_postfix({model: f"{loss:.4f}"}, refresh=False)
                elif kind == "error":
                    raise RuntimeError(f"training {model} failed in its worker process:\n{payload}")
                else:
                    graphdef = train_state.abstract_model(configs[model], model_fn_for(settings, data, configs[model]))[0]
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


# --------------------------------------------------------------------------------------------------------------------
# sampling and evaluation
# --------------------------------------------------------------------------------------------------------------------


def generate(apply_fn, params, transport, labels: np.ndarray, shape, *, num_steps: int, mode: str, seed: int,
             null_label: int, chunk: int = 2000) -> np.ndarray:
    """Samples (N, *shape) float32 for ``labels`` (N,) from noise drawn with ``seed`` (same noise for any model)."""
    import jax
    import jax.numpy as jnp

    from tim_jax.sampler import sample

    z = np.asarray(jax.random.normal(jax.random.key(seed), (len(labels), *shape), jnp.float32))
    out = []
    for i in range(0, len(labels), chunk):
        x = sample(apply_fn, params, jnp.asarray(z[i : i + chunk]), jnp.asarray(labels[i : i + chunk]),
                   jnp.int32(null_label), transport=transport, num_steps=num_steps, mode=mode)
        out.append(np.asarray(x))
    return np.concatenate(out)


EVAL_SEED = 0   # the evaluation (classifier, split, reference sample) is the same for every run seed


class Evaluator:
    """Quality metrics of generated samples for one dataset (see METRIC_DOCS).

    Independent of the run's seed (``seed`` defaults to EVAL_SEED), so figures of different runs are comparable.
    """

    def __init__(self, data: Dataset, seed: int = EVAL_SEED):
        from tim_jax import evaluation

        self.data, self.info = data, {}
        if data.name == "digits":
            rng = np.random.default_rng(seed)
            perm = rng.permutation(len(data.x))
            n_test = len(perm) // 5
            test, train = perm[:n_test], perm[n_test:]
            t0 = time.perf_counter()
            self.clf = evaluation.train_classifier(data.x[train], data.y[train], num_classes=data.num_classes,
                                                   x_heldout=data.x[test], y_heldout=data.y[test], seed=seed)
            self.real_features = self.clf.features(data.x)
            half = len(perm) // 2
            self.info = {
                "classifier_heldout_accuracy": self.clf.heldout_accuracy,
                "classifier_train_rows": int(len(train)),
                "classifier_heldout_rows": int(n_test),
                "classifier_seconds": time.perf_counter() - t0,
                # noise floor: two disjoint random halves of the real data
                "fd_real_halves": evaluation.frechet_distance_from_features(
                    self.real_features[perm[:half]], self.real_features[perm[half:]]),
            }
        else:
            self.reference = sample_gmm(8000, seed=20_000 + seed)[0].reshape(-1, 2)
            other = sample_gmm(8000, seed=30_000 + seed)[0].reshape(-1, 2)
            self.info = {"swd_real_vs_real": evaluation.sliced_wasserstein(other, self.reference, seed=seed)}
        self.seed = seed

    def __call__(self, samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from tim_jax import evaluation

        if self.data.name == "digits":
            x = np.clip(samples, -1.0, 1.0)
            return {"fd": evaluation.frechet_distance_from_features(self.clf.features(x), self.real_features),
                    "class_acc": self.clf.accuracy(x, labels)}
        return {"swd": evaluation.sliced_wasserstein(samples.reshape(-1, 2), self.reference, seed=self.seed)}


def sample_labels(data: Dataset, n: int) -> np.ndarray:
    """Balanced class labels (n,), class-major: n // num_classes of each class, the remainder spread from class 0."""
    per = np.full(data.num_classes, n // data.num_classes)
    per[: n % data.num_classes] += 1
    return np.repeat(np.arange(data.num_classes, dtype=np.int32), per)


# --------------------------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------------------------


def save_sample_picture(path: str, samples: np.ndarray, labels: np.ndarray, data: Dataset, title: str,
                        per_class: int = 12) -> None:
    """digits: a grid, one row per class (first ``per_class`` samples of each); gmm: a scatter coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if data.name == "digits":
        from PIL import Image

        h, w = samples.shape[1:3]
        pad, scale = 1, 4
        rows = []
        for c in range(data.num_classes):
            imgs = samples[labels == c][:per_class, ..., 0]
            row = np.full((h + pad, per_class * (w + pad)), -1.0, np.float32)
            for j, im in enumerate(imgs):
                row[:h, j * (w + pad) : j * (w + pad) + w] = im
            rows.append(row)
        grid = np.clip((np.concatenate(rows) + 1.0) / 2.0, 0.0, 1.0)
        grid = (255 * (1.0 - grid)).astype(np.uint8)   # dark ink on white, like the scanned digits
        Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
        return
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    pts = samples.reshape(-1, 2)
    for c in range(data.num_classes):
        sel = labels == c
        ax.scatter(pts[sel, 0], pts[sel, 1], s=1, alpha=0.4, label=f"class {c}")
    lim = (GMM_GRID / 2 + 0.5) * GMM_SPACING
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_quality_plot(path: str, metrics: dict, info: dict, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = ["fd", "class_acc"] if dataset == "digits" else ["swd"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.6), squeeze=False)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metrics_markdown(metrics: dict, info: dict, dataset: str) -> str:
    """The Markdown table: one row per step count, one column per (model, metric)."""
    names = ["fd", "class_acc"] if dataset == "digits" else ["swd"]
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


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


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


# --------------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------------


def run_demo(settings: DemoSettings, log: Callable[[str], None] = print) -> dict:
    """Run the whole demo (see the module docstring); returns ``{"metrics": ..., "run": ...}``.

    ``metrics.json`` is (re)written after every evaluated model, so the folder always holds the figures so far.
    """
    settings = settings.resolved()
    settings.validate()
    out = prepare_out_dir(settings.out)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    import jax

    from tim_jax import train_step
    from tim_jax.models.functional import make_apply_fn

    data = load_dataset(settings.dataset, settings.seed)
    configs = {model: make_config(settings, data, model) for model in MODELS}   # bad --set fails here, early
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    write_json(os.path.join(out, "metrics.json"), metrics)
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
            save_sample_picture(os.path.join(out, f"samples_{model}_{num_steps}steps.png"), x, labels, data,
                                title=f"{model}, {num_steps} step{'s' if num_steps > 1 else ''}")
        sample_s = time.perf_counter() - t0
        nparams = int(sum(np.size(a) for a in jax.tree.leaves(result.params)))
        run["models"][model] = {
            "mode": mode, "train_steps": result.steps, "compile_seconds": round(result.compile_seconds, 2),
            "train_seconds": round(result.train_seconds, 2), "sample_eval_seconds": round(sample_s, 2),
            "final_loss": result.final_loss, "params": nparams,
            "objective": {k: config.objective[k] for k in ("diffusion_ratio", "consistency_ratio", "derivative")},
        }
        write_json(os.path.join(out, "metrics.json"), metrics)
        primary = PRIMARY_METRIC[settings.dataset]
        log(f"[demo] {model}: {result.steps} steps in {result.train_seconds:.1f}s (+{result.compile_seconds:.1f}s "
            f"compile); {primary} by steps: " +
            ", ".join(f"{s}: {metrics[model][str(s)][primary]:.3f}" for s in settings.steps))

    run["summary"] = any_step_summary(metrics, settings.dataset)
    for line in run["summary"]:
        log(f"[demo] {line}")
    run["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    run["process_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    run["load_average_end"] = _loadavg()
    write_json(os.path.join(out, "run.json"), run)
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(metrics_markdown(metrics, run, settings.dataset))
    save_quality_plot(os.path.join(out, "quality_vs_steps.png"), metrics, run, settings.dataset)
    log(f"[demo] done in {run['wall_seconds']:.0f}s; wrote metrics.json, metrics.md, quality_vs_steps.png and "
        f"sample pictures to {out}")
    return {"metrics": metrics, "run": run}


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


def run_seeds(settings: DemoSettings, seeds: Sequence[int], log: Callable[[str], None] = print) -> dict:
    """The demo once per seed into ``<out>/seed_<s>/``, then ``<out>/metrics_over_seeds.{json,md}``."""
    per_seed = {}
    for s in seeds:
        sub = dataclasses.replace(settings, seed=int(s), out=os.path.join(settings.out, f"seed_{s}"))
        per_seed[int(s)] = run_demo(sub, log=log)["metrics"]
    agg = aggregate_seeds(per_seed, settings.dataset)
    write_json(os.path.join(settings.out, "metrics_over_seeds.json"), agg)
    md = seeds_markdown(agg, settings.dataset)
    with open(os.path.join(settings.out, "metrics_over_seeds.md"), "w") as f:
        f.write(md)
    log("[demo] over seeds:\n" + md)
    return agg


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def _int_list(text: str, *, minimum: int, what: str, example: str) -> tuple[int, ...]:
    """A comma-separated list of integers >= ``minimum`` (argparse type); ArgumentTypeError naming ``what``."""
    try:
        values = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like {example}; got {text!r}")
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"{what} must be integers >= {minimum}; got {text!r}")
    return values


def _parse_steps(text: str) -> tuple[int, ...]:
    return _int_list(text, minimum=1, what="step counts", example="1,2,4,8")


def _parse_seeds(text: str) -> tuple[int, ...]:
    return _int_list(text, minimum=0, what="seeds", example="0,1,2")


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected section.field=value; got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass   # a plain string
    return key.strip(), value


def _defaults(field: str) -> str:
    return ", ".join(f"{name} {DEFAULTS[name][field]}" for name in DATASETS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tim_jax.demo",
        description="Train TiM and a flow-matching baseline (same network, data, seed and budget) on a small real "
                    "dataset on CPU, sample both with 1..32 steps and compare quality vs steps.",
        epilog="Exit status: 0 on success, 2 for a bad command line (unknown dataset, unwritable --out, bad value).")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="'digits' (scikit-learn 8x8 digits; the default) or 'gmm' (2-D Gaussian mixture)")
    p.add_argument("--quick", action="store_true",
                   help="the ~1 minute version: --dataset gmm (2-D mixture, sliced Wasserstein distance)")
    p.add_argument("--out", default=None, help="output folder (default: tim_demo, or tim_demo_quick with --quick)")
    p.add_argument("--steps", type=_parse_steps, default=(1, 2, 4, 8, 16, 32), help="comma-separated sampling step counts (default: 1,2,4,8,16,32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the parameter init, data order, training noise and sampling noise "
                                                          "(the evaluation is the same for every seed; default: 0)")
    p.add_argument("--seeds", type=_parse_seeds, default=None, metavar="S1,S2,...",
                   help="run the whole demo once per seed (into OUT/seed_<s>/) and write OUT/metrics_over_seeds.json "
                        "and .md: mean and std over seeds, and the per-seed TiM - flow matching differences")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps per model (default: %s)" % _defaults("train_steps"))
    p.add_argument("--train-seconds", type=float, default=0.0,
                   help="also stop each model's training after this many seconds (after compilation); "
                        "0 = no limit (default)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: %s)" % _defaults("batch_size"))
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: %s)" % _defaults("lr"))
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="'warmup_cosine': 100 warm-up steps then cosine decay to 0 at --train-steps (default); "
                        "'constant': the official constant lr (after the same warm-up)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="decay of the EMA whose params are evaluated (default: %s)" % _defaults("ema_decay"))
    p.add_argument("--num-samples", type=int, default=None,
                   help="generated samples per step count and model (default: %s)" % _defaults("num_samples"))
    p.add_argument("--width", type=int, default=None,
                   help="network width, TiM hidden_size / MLP width (default: %s)" % _defaults("width"))
    p.add_argument("--depth", type=int, default=None,
                   help="number of transformer / MLP blocks (default: %s)" % _defaults("depth"))
    p.add_argument("--set", dest="overrides", type=_parse_override, action="append", default=[],
                   metavar="SECTION.FIELD=VALUE",
                   help="override any field of the run config (configs/base.py), e.g. --set objective.derivative=jvp")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-parallel", action="store_true",
                   help="train the two models one after the other in this process (default: side by side in two "
                        "processes, each pinned to half of the CPUs, when there are at least 2)")
    return p


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    dataset = args.dataset or ("gmm" if args.quick else "digits")
    if args.quick and args.dataset not in (None, "gmm"):
        raise DemoError(f"--quick runs the 'gmm' dataset; it cannot be combined with --dataset {args.dataset}")
    out = args.out or ("tim_demo_quick" if args.quick else "tim_demo")
    return DemoSettings(dataset=dataset, out=out, steps=tuple(args.steps), seed=args.seed,
                        train_steps=args.train_steps, train_seconds=args.train_seconds, batch_size=args.batch_size,
                        lr=args.lr, lr_schedule=args.lr_schedule, ema_decay=args.ema_decay, num_samples=args.num_samples, width=args.width,
                        depth=args.depth, overrides=tuple(args.overrides), progress=not args.no_progress,
                        parallel=not args.no_parallel)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m tim_jax.demo``, ``tim-demo``); returns the exit code.

    When called without ``argv`` (a real command line) the process first re-executes itself with the fast glibc
    malloc settings of :mod:`tim_jax._allocator` (a no-op if already set or opted out with TIM_JAX_NO_REEXEC=1).
    """
    if argv is None:
        try:
            from tim_jax import _allocator
        except ImportError:  # pragma: no cover - the allocator helper is optional
            _allocator = None
        if _allocator is not None:
            _allocator.maybe_reexec()
    parser = build_parser()
    args = parser.parse_args(argv)   # bad options / unknown dataset: argparse prints usage and exits with 2
    try:
        settings = settings_from_args(args)
        if args.seeds is not None:
            if len(set(args.seeds)) != len(args.seeds):
                raise DemoError(f"--seeds must not repeat a seed; got {list(args.seeds)}")
            run_seeds(settings, args.seeds)
        else:
            run_demo(settings)
    except DemoError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
