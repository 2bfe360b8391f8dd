"""Metric writers and the periodic sample-grid hook of the train loop.

:class:`MetricWriter` writes one record of scalars per log step to
  * stdout: ``step 120 | loss 0.4132 | grad_norm 1.02 | lr 1e-04 | img_per_s 53.1 ...``
    (replaced by a ``tqdm`` progress bar's postfix when stdout is a terminal),
  * ``<workdir>/metrics.jsonl``: one JSON object per line, ``{"step": int, "loss": float, ...}``
    (appended, so a resumed run continues the same file; each record carries the step),
  * TensorBoard event files under ``<workdir>/tb`` (tensorboardX), one scalar tag per key.
Only process 0 writes (``enabled=False`` elsewhere makes every method a no-op).

The train loop keeps the step's metrics on device and calls :func:`fetch` only at log steps,
so there is no host sync on the other steps. :class:`Throughput` turns wall time between log
steps into images/s.

:class:`SampleHook` draws a grid of samples from the EMA params with
``tim_jax.sampler.sample`` at several step counts and writes
``<workdir>/samples/step_<step:08d>_nfe<N>.png`` (and a TensorBoard image). With
``config.sample.vae`` set (a diffusers autoencoder Hub folder, e.g. the SD-VAE of the run's
latents) the latents are first decoded to pictures with it (float32, on the default device,
process 0 only). Display convention (:func:`to_display`): samples with C = 3 (RGB) or C = 1
(gray) are taken to be in [-1, 1] and mapped to [0, 1]; latents with any other channel count
(SD-VAE: 4, DC-AE: 32), i.e. when no ``sample.vae`` is set, show their **first three channels
as RGB, each min-max normalised over the whole grid** (not a decoded image: a quick visual
check that samples are structured and differ by class).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

__all__ = [
    "MetricWriter",
    "Throughput",
    "fetch",
    "to_display",
    "make_grid",
    "save_image_grid",
    "SampleHook",
]


def fetch(device_metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars -> python floats (one blocking transfer for the whole dict)."""
    host = jax.device_get(dict(device_metrics))
    return {k: float(np.asarray(v).reshape(())) if np.size(v) == 1 else np.asarray(v).tolist()
            for k, v in host.items()}


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0.0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class MetricWriter:
    """Writes scalar metrics to stdout, ``metrics.jsonl`` and TensorBoard (process 0 only).

    Args:
      workdir: run directory (created if needed).
      enabled: False on every process but 0: all methods become no-ops.
      tensorboard, jsonl: which file writers to open.
      total_steps: last step of the run, for the progress bar.
      initial_step: step the run (re)starts from, for the progress bar.
      progress: show a tqdm bar; default: only when stdout is a terminal.
      purge_step: on resume, the first step of the resumed run: TensorBoard hides the events
        of the old run at and after it (they were never checkpointed).
      stream: where the text lines go (stdout).
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        jsonl: bool = True,
        total_steps: int | None = None,
        initial_step: int = 0,
        progress: bool | None = None,
        purge_step: int | None = None,
        stream=None,
    ):
        self.enabled = bool(enabled)
        self.workdir = workdir
        self._stream = sys.stdout if stream is None else stream
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if jsonl:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"), flush_secs=30,
                                     purge_step=purge_step)
        if progress is None:
            progress = bool(getattr(self._stream, "isatty", lambda: False)())
        if progress and total_steps is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                             file=self._stream, unit="step")
            self._bar_step = initial_step

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.workdir, "tb")

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One record: ``{"step": step, **scalars}`` to every enabled sink."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        for k, v in scalars.items():
            record[k] = float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, global_step=int(step))
        if self._bar is not None:
            self._bar.update(int(step) - self._bar_step)
            self._bar_step = int(step)
            self._bar.set_postfix({k: _fmt(v) for k, v in record.items() if k != "step"}, refresh=True)
        else:
            line = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items())
            print(line, file=self._stream, flush=True)

    def write_text(self, message: str) -> None:
        """A free-form line (through the progress bar when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def write_image(self, tag: str, step: int, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image to TensorBoard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Throughput:
    """Images/s and s/step between consecutive log steps (call after the metrics are fetched,
    i.e. after the device has finished those steps)."""

    def __init__(self, global_batch_size: int, start_step: int):
        self.global_batch_size = int(global_batch_size)
        self._t = time.perf_counter()
        self._step = int(start_step)

    def reset(self, step: int) -> None:
        """Restart the window (e.g. after compilation, a checkpoint save or a sample grid)."""
        self._t = time.perf_counter()
        self._step = int(step)

    def __call__(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = int(step) - self._step
        dt = max(now - self._t, 1e-9)
        self._t, self._step = now, int(step)
        if steps <= 0:
            return {}
        return {"img_per_s": steps * self.global_batch_size / dt, "s_per_step": dt / steps}


# ----------------------------------------------------------------------------------------------
# sample grids
def to_display(x: np.ndarray) -> np.ndarray:
    """Samples (N, H, W, C) -> float32 (N, H, W, 3) in [0, 1] (see the module docstring).

    C = 3 or 1: ``(x + 1) / 2`` clipped (gray repeated to RGB). Any other C: channels 0-2
    (channel 0 repeated when C = 2), each min-max normalised over the whole batch.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        raise ValueError(f"to_display: expected (N, H, W, C) samples, got shape {x.shape}")
    c = x.shape[-1]
    if c in (1, 3):
        y = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
        return np.repeat(y, 3, axis=-1) if c == 1 else y
    y = x[..., :3] if c >= 3 else np.concatenate([x, x[..., :1]], axis=-1)
    lo = y.min(axis=(0, 1, 2), keepdims=True)
    hi = y.max(axis=(0, 1, 2), keepdims=True)
    return (y - lo) / np.maximum(hi - lo, 1e-8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 image.

    ``ncols`` defaults to ceil(sqrt(N)); ``upscale`` repeats pixels (tiny latents are 8x8).
    """
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, q = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = images[i]
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image_grid(path: str, samples: np.ndarray, *, ncols: int | None = None) -> np.ndarray:
    """Samples (N, H, W, C) -> PNG at ``path`` (through :func:`to_display`); returns the grid."""
    from PIL import Image

    x = np.asarray(samples)
    upscale = max(1, 64 // max(x.shape[1], 1))
    grid = make_grid(to_display(x), ncols=ncols, upscale=upscale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


class SampleHook:
    """Every ``every_steps`` steps: sample a grid from the EMA params at each step count.

    Args:
      apply_fn: the network's pure apply function (docs/design.md contract).
      transport: the run's ``tim_jax.transports.Transport``.
      sample_config: ``config.sample`` (every_steps, num_steps, num_images, cfg_scale,
        cfg_low, cfg_high, stochasticity_ratio, mode; optional ``vae``: an autoencoder Hub
        folder to decode the latent samples with, loaded here; its latent channels must equal
        ``shape[-1]``).
      shape: per-sample (H, W, C).
      cond: per-row condition for the ``num_images`` samples (c2i: labels (N,); t2i: caption
        features (N, L, D)), and ``null_cond`` the unconditional condition (for guidance).
      seed: fixes the noise (the same z at every step, so grids are comparable over training).
      out_dir: where PNGs go (``<workdir>/samples``).
      writer: optional MetricWriter for the TensorBoard images.
      mesh: the training mesh: noise and conditions are replicated on it and the samples come
        back replicated (fully addressable on every process); None: default device.
      enabled: False on processes other than 0 (they still run the sampler: it is a
        collective over the mesh; only the writing is skipped).
    """

    def __init__(
        self,
        apply_fn: Callable,
        transport,
        sample_config,
        *,
        shape: Sequence[int],
        cond,
        null_cond,
        seed: int,
        out_dir: str,
        writer: MetricWriter | None = None,
        mesh=None,
        enabled: bool = True,
    ):
        from tim_jax import sampler

        self.every_steps = int(sample_config.every_steps)
        self.step_counts = tuple(int(n) for n in sample_config.num_steps)
        if any(n < 1 for n in self.step_counts):
            raise ValueError(f"sample.num_steps must be integers >= 1, got {self.step_counts}")
        n = int(sample_config.num_images)
        if n < 1:
            raise ValueError(f"sample.num_images must be >= 1, got {n}")
        self.out_dir = out_dir
        self.writer = writer
        self.enabled = enabled
        self.codec = None
        vae = sample_config.get("vae", None) if hasattr(sample_config, "get") else getattr(
            sample_config, "vae", None)
        if vae:
            from tim_jax.encoders.autoencoder import load_autoencoder

            self.codec = load_autoencoder(vae)
            if self.codec.latent_channels != int(shape[-1]):
                raise ValueError(
                    f"sample.vae {vae} has {self.codec.latent_channels} latent channels but the "
                    f"samples have {int(shape[-1])}: it is not the autoencoder of these latents")
        noise = np.random.default_rng([int(seed), 0x5A]).standard_normal((n, *shape)).astype(np.float32)
        rng = np.asarray(jax.random.key_data(jax.random.PRNGKey(int(seed))))
        place = (lambda a: a) if mesh is None else (
            lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
        self._z = place(noise)
        self._rng = place(rng)
        self._cond = jax.tree.map(lambda a: place(np.asarray(a)), cond)
        self._null = None if null_cond is None else jax.tree.map(lambda a: place(np.asarray(a)), null_cond)
        kw = dict(
            transport=transport,
            cfg_scale=float(sample_config.cfg_scale),
            cfg_low=float(sample_config.cfg_low),
            cfg_high=float(sample_config.cfg_high),
            stochasticity_ratio=float(sample_config.stochasticity_ratio),
            mode=str(sample_config.mode),
        )

        def _run(params, z, c, nc, rng, *, num_steps):
            return sampler.sample(apply_fn, params, z, c, nc, num_steps=num_steps,
                                  rng=rng if kw["stochasticity_ratio"] > 0 else None, **kw)

        out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._fn = jax.jit(_run, static_argnames=("num_steps",), out_shardings=out)

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    def __call__(self, step: int, params) -> list[str]:
        """Samples with ``params`` at every step count; returns the PNG paths written."""
        paths = []
        for n in self.step_counts:
            x = self._fn(params, self._z, self._cond, self._null, self._rng, num_steps=n)
            x = np.asarray(jax.device_get(x))
            if not self.enabled:
                continue
            if self.codec is not None:
                x = np.asarray(self.codec.decode(x))       # (N, H*f, W*f, 3) in about [-1, 1]
            path = os.path.join(self.out_dir, f"step_{int(step):08d}_nfe{n}.png")
            grid = save_image_grid(path, x)
            if self.writer is not None:
                self.writer.write_image(f"samples/nfe{n}", step, grid)
            paths.append(path)
        return paths
