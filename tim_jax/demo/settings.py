"""What one demo run depends on: :class:`DemoSettings`, the per-dataset defaults, and the two
run configs (TiM and flow matching) built from them.

The two configs come from ``configs/base.py`` and differ only in the objective's row mix, so the
comparison isolates the TiM objective: same network, data order, seed and training budget.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from tim_jax.demo.data import Dataset

DATASETS = ("digits", "gmm")
MODELS = ("tim", "flow_matching")
LR_SCHEDULES = ("warmup_cosine", "constant")
PRIMARY_METRIC = {"digits": "fd", "gmm": "swd"}


class DemoError(Exception):
    """A problem with the command line or the environment: printed as one line, exit code 2."""


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


# Per-dataset defaults: sized so that the full digits run and --quick fit the wall times the README's demo section
# states for an idle 2-core CPU (the two models train side by side, one core each), with the any-step property
# holding over seeds (figures: README, "The demo"). At width 64, or with fewer steps at width 128, TiM's FD rose
# from 4 to 32 steps on every seed (capacity-bound at the small intervals).
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(train_steps=3000, batch_size=64, lr=2e-3, lr_schedule="warmup_cosine", ema_decay=0.995,
                   num_samples=2000, width=128, depth=3),
    "gmm": dict(train_steps=3000, batch_size=256, lr=2e-3, lr_schedule="warmup_cosine", ema_decay=0.995,
                num_samples=4000, width=64, depth=3),
}


def make_config(settings: DemoSettings, data: "Dataset", model: str):
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
        set_override(c, key, value)
    return c


def base_config():
    """``configs/base.py``'s ``get_config()``: the importable ``configs`` package, else the file beside the package."""
    try:
        from configs import base
    except ImportError:
        import importlib.util
        import pathlib

        path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "base.py"
        if not path.is_file():
            raise DemoError("cannot find the run config configs/base.py (neither an importable 'configs' package "
                            f"nor {path})")
        spec = importlib.util.spec_from_file_location("_tim_jax_demo_base_config", path)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    return base.get_config()


def set_override(config, key: str, value) -> None:
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


def model_fn_for(settings: DemoSettings, data: "Dataset", config) -> Callable:
    """``rngs -> nnx.Module`` of the demo network: the MLP for ``gmm``, the TiM transformer for ``digits``."""
    if settings.dataset == "gmm":
        from tim_jax.demo.toy_model import MLPTiM

        shape = tuple(data.x.shape[1:])
        return lambda rngs: MLPTiM(shape, data.num_classes, width=settings.width, depth=settings.depth, rngs=rngs)
    from tim_jax.models import presets

    return lambda rngs: presets.build_model(config.model, rngs)
