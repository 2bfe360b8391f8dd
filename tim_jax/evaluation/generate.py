"""Class-conditional samples -> Inception features on device, for FID / IS over many samples.

    gen = C2IGenerator.from_files("c2i_model_256.safetensors", "sd-vae-ft-ema",
                                  "pt_inception-2015-12-05.safetensors", batch_size=256)
    labels = class_labels(50_000, gen.num_classes, seed=0)
    out = gen.generate(np.arange(1000), labels[:1000], SamplerSettings(num_steps=2))
    out["pool"]  # (1000, 2048) float32;  out["logits"] (1000, 1008) float32

Sample ``i`` (a global index in [0, N)) starts from the noise of :class:`TiMPipeline` for the same
index: ``jax.random.normal(fold_in(key(seed), i), (h, w, C))``; its label is ``labels[i]``. So a
sample (its pixels, hence its features) depends only on (seed, i, label, settings), not on the
batch size, the device count or which process made it. Per batch of ``rows`` samples (a multiple
of the device count, sharded over a 1-D mesh of the local devices) four jitted programs run:
noise, the sampler, the VAE decode to uint8 pixels (as the pipeline: ``clip(255 (x + 1) / 2)``
truncated), then the FID Inception on ``pixels / 255`` (pytorch-fid's input: what a PNG of the
sample would give), resized to ``FeatureNet.size`` (299) with torch's bilinear resize. The
pixels stay on device unless asked for. Exception: with ``stochasticity > 0`` the sampler's
extra noise is drawn per batch (key ``fold_in(fold_in(key(seed), STOCHASTIC_TAG), first index
of the batch)``, as the pipeline), so those samples also depend on the batch size.

The Inception is built with ``logits_bias=False``: the logits are the ADM evaluator's bias-free
``pool3 @ W`` (its Inception Score), the pool3 features are pytorch-fid's (see
:mod:`tim_jax.evaluation.inception` for how they differ from the ADM evaluator's TF graph).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tim_jax import sampler

__all__ = ["SamplerSettings", "FeatureNet", "C2IGenerator", "class_labels", "load_inception",
           "load_codec", "guided_steps", "STOCHASTIC_TAG", "LABEL_BALANCES"]

STOCHASTIC_TAG = 0xFFFFFFFF  # fold_in tag of the per-batch sampler-noise stream (as the pipeline)
LABEL_BALANCES = ("uniform", "balanced")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """One sampler configuration (hashable: a static jit argument).

    num_steps: sampler steps; cfg_scale: guidance scale (> 1 guides); cfg_low / cfg_high: the
    guidance window as fractions of T_max; stochasticity: the OT-FM SDE ratio in [0, 1);
    mode: "transition" | "diffusion"."""

    num_steps: int
    cfg_scale: float = 1.0
    cfg_low: float = 0.0
    cfg_high: float = 1.0
    stochasticity: float = 0.0
    mode: str = "transition"

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)) \
                or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if not self.cfg_low < self.cfg_high:
            raise ValueError(f"the guidance interval needs low < high, got "
                             f"({self.cfg_low}, {self.cfg_high})")
        if not 0.0 <= self.stochasticity < 1.0:
            raise ValueError(f"stochasticity must be in [0, 1), got {self.stochasticity}")
        if self.mode not in sampler.MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {list(sampler.MODES)}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0


def guided_steps(transport, settings: SamplerSettings) -> int:
    """How many of the steps apply guidance (each costs two network evaluations): the grid
    times t_k (k < num_steps) with cfg_low T_max < t_k < cfg_high T_max, compared in float32 as
    the sampler does, when cfg_scale > 1. With none the unguided sampler runs (as the pipeline)."""
    if not settings.guided:
        return 0
    t = sampler.time_grid(transport, settings.num_steps)[:-1]
    t_max = float(transport.T_max)
    lo, hi = np.float32(settings.cfg_low * t_max), np.float32(settings.cfg_high * t_max)
    return int(np.sum((t > lo) & (t < hi)))


def class_labels(num_samples: int, num_classes: int, seed: int = 0,
                 balance: str = "uniform") -> np.ndarray:
    """Labels (num_samples,) int32 of the samples, fixed by the seed.

    "uniform": i.i.d. uniform over the classes, as the official ``sample_c2i_ddp.py`` draws them
    (``torch.randint`` per batch; here numpy's generator seeded with ``seed``, the labels of
    ``tim_jax.inference.random_labels``), so class counts vary (about 50 +- 7 per class for 50k).
    "balanced": exactly ``num_samples // num_classes`` of every class (the first
    ``num_samples % num_classes`` classes get one more), in an order shuffled by ``seed``."""
    if int(num_samples) < 1 or int(num_classes) < 1:
        raise ValueError(f"need num_samples >= 1 and num_classes >= 1, got {num_samples}, "
                         f"{num_classes}")
    if balance == "uniform":
        from tim_jax.inference.request import random_labels

        return np.asarray(random_labels(int(num_samples), int(num_classes), int(seed)), np.int32)
    if balance == "balanced":
        labels = np.arange(int(num_samples), dtype=np.int64) % int(num_classes)
        return np.random.default_rng(int(seed)).permutation(labels).astype(np.int32)
    raise ValueError(f"label balance {balance!r} is not one of {list(LABEL_BALANCES)}")


class FeatureNet:
    """The feature network seen by the generator: ``model(images in [0, 1] (B, S, S, 3)) ->
    (pool (B, D), logits (B, K))`` with the images resized to ``size`` x ``size`` first (torch
    bilinear, align_corners=False). ``FIDInceptionV3`` built with ``resize_input=False`` (see
    :func:`load_inception`), or any NNX module with that call (tests use a tiny one)."""

    def __init__(self, model: nnx.Module, size: int = 299, name: str = "inception"):
        if int(size) < 1:
            raise ValueError(f"feature input size must be >= 1, got {size}")
        self.graph, self.state = nnx.split(model)
        self.size, self.name = int(size), name

    @functools.cached_property
    def dim(self) -> int:
        """Feature dimension D (from an abstract evaluation: nothing is compiled)."""
        x = jax.ShapeDtypeStruct((1, self.size, self.size, 3), jnp.uint8)
        return int(jax.eval_shape(self.apply, self.state, x)[0].shape[-1])

    def apply(self, state, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """uint8 pixels (B, H, W, 3) -> (pool, logits) float32 (pure; jit-able)."""
        from tim_jax.evaluation.inception import resize_bilinear

        x = pixels.astype(jnp.float32) / 255.0
        if x.shape[1:3] != (self.size, self.size):
            x = resize_bilinear(x, (self.size, self.size))
        pool, logits = nnx.merge(self.graph, state)(x)
        return pool.astype(jnp.float32), logits.astype(jnp.float32)


def load_inception(path, *, size: int = 299, dtype: Any = jnp.float32) -> FeatureNet:
    """pytorch-fid's FID Inception from its converted safetensors (see
    :func:`tim_jax.evaluation.inception.convert_pytorch_fid_weights`), with the ADM evaluator's
    bias-free logits. ``size`` 299 is the standard; another size only for quick smoke tests
    (its FIDs compare with nothing). FileNotFoundError names the download address. Loaded once
    per process and file (the same object again while the file is unchanged)."""
    from tim_jax.evaluation.inception import MIN_INPUT_SIZE, from_safetensors

    if int(size) < MIN_INPUT_SIZE:
        raise ValueError(f"the Inception input size must be >= {MIN_INPUT_SIZE}, got {size}")
    if not Path(path).is_file():
        from_safetensors(path)  # raises FileNotFoundError with the download address
    return _load_inception_cached(*_file_key(path), int(size), jnp.dtype(dtype).name)


def _file_key(path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=2)
def _load_inception_cached(path: str, mtime: int, nbytes: int, size: int, dtype: str):
    from tim_jax.evaluation.inception import from_safetensors

    model = from_safetensors(path, resize_input=False, normalize_input=True, logits_bias=False,
                             dtype=jnp.dtype(dtype))
    return FeatureNet(model, size=size, name="fid_inception_v3")


@functools.lru_cache(maxsize=2)
def _load_codec_cached(path: str, mtime: int, nbytes: int):
    from tim_jax.encoders.autoencoder import load_autoencoder

    return load_autoencoder(path, dtype=jnp.float32)


def load_codec(folder):
    """The autoencoder of a Hub folder in float32, loaded once per process and folder."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} is not an autoencoder Hub folder (no config.json)")
    _, mtime, nbytes = _file_key(config)
    return _load_codec_cached(str(Path(folder).resolve()), mtime, nbytes)


@functools.lru_cache(maxsize=8)
def _apply_fn(graphdef):
    """One apply function per network structure, so equal graphdefs share compilations."""
    from tim_jax.models import make_apply_fn

    return make_apply_fn(graphdef)


@functools.partial(jax.jit, static_argnames=("latent_shape", "batch"))
def _noise(key, indices, *, latent_shape, batch):
    """(rows,) uint32 global indices -> (rows, h, w, C) float32 noise (the pipeline's)."""
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), latent_shape,
                                             jnp.float32))(indices)
    return jax.lax.with_sharding_constraint(z, batch)


@functools.partial(jax.jit, static_argnames=("apply_fn", "transport", "settings", "guided",
                                             "batch"))
def _sample(params, z, labels, null, stoch_key, *, apply_fn, transport, settings, guided, batch):
    """noise (rows, h, w, C) -> the sampler's latents float32, sharded (the pipeline's jit)."""
    s = settings
    latents = sampler.sample(
        apply_fn, params, z, labels, null if guided else None, transport=transport,
        num_steps=s.num_steps, cfg_scale=s.cfg_scale if guided else 1.0, cfg_low=s.cfg_low,
        cfg_high=s.cfg_high, stochasticity_ratio=s.stochasticity, mode=s.mode,
        rng=stoch_key if s.stochasticity > 0 else None)
    return jax.lax.with_sharding_constraint(latents.astype(jnp.float32), batch)


@functools.partial(jax.jit, static_argnames=("decode_fn", "batch"))
def _decode(vae_params, latents, *, decode_fn, batch):
    """latents -> uint8 pixels (rows, H, W, 3): clip(255 (x + 1) / 2) truncated, sharded."""
    images = decode_fn(vae_params, latents)
    pixels = jnp.clip(255.0 * ((images + 1.0) / 2.0), 0.0, 255.0).astype(jnp.uint8)
    return jax.lax.with_sharding_constraint(pixels, batch)


@functools.partial(jax.jit, static_argnames=("feature_apply", "batch"))
def _extract(state, pixels, *, feature_apply, batch):
    pool, logits = feature_apply(state, pixels)
    return (jax.lax.with_sharding_constraint(pool, batch),
            jax.lax.with_sharding_constraint(logits, batch))


def _local_mesh(mesh) -> jax.sharding.Mesh:
    if mesh is None:
        return jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    if not isinstance(mesh, jax.sharding.Mesh) or len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be a 1-D jax.sharding.Mesh (batch axis), got {mesh!r}")
    return mesh


class C2IGenerator:
    """Class-conditional TiM + autoencoder + feature network, data parallel over ``mesh`` (a 1-D
    mesh, default all local devices). ``batch_size`` is rounded up to a multiple of the device
    count (``self.rows``). ``image_size`` (pixels, square) defaults to the trained size."""

    def __init__(self, model_config, graphdef, params, transport, codec, features: FeatureNet, *,
                 mesh=None, batch_size: int = 256, seed: int = 0, image_size: int | None = None,
                 source: str | None = None):
        if str(model_config.kind) != "c2i":
            raise ValueError(f"FID generation needs a class-conditional (c2i) model, got a "
                             f"{model_config.kind} model")
        if codec.latent_channels != int(model_config.in_channels):
            raise ValueError(f"the VAE has {codec.latent_channels} latent channels but the TiM "
                             f"model takes in_channels={model_config.in_channels}")
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_config, self.transport, self.codec, self.features = (
            model_config, transport, codec, features)
        self.num_classes = int(model_config.num_classes)
        self.has_null = float(model_config.class_dropout_prob) > 0
        self.seed, self.source = int(seed), source
        step = codec.spatial_factor * int(model_config.patch_size)
        size = int(model_config.input_size) * codec.spatial_factor if image_size is None \
            else int(image_size)
        if size < step or size % step:
            raise ValueError(f"image size {size} is not a positive multiple of {step} (VAE factor "
                             f"{codec.spatial_factor} x patch size {model_config.patch_size})")
        self.image_size = size
        self.latent_shape = (size // codec.spatial_factor, size // codec.spatial_factor,
                             codec.latent_channels)
        self.mesh = _local_mesh(mesh)
        self.num_devices = int(self.mesh.devices.size)
        self.rows = int(math.ceil(int(batch_size) / self.num_devices)) * self.num_devices
        replicated = NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P(self.mesh.axis_names[0]))
        self.params = jax.device_put(params, replicated)
        self._vae_params = jax.device_put(codec.params, replicated)
        self._feature_state = jax.device_put(features.state, replicated)
        self._noise_key = jax.device_put(jax.random.key(self.seed), replicated)
        self._null = jax.device_put(np.asarray(self.num_classes, np.int32), replicated)
        self._replicated = replicated
        self._apply = _apply_fn(graphdef)

    @classmethod
    def from_files(cls, checkpoint, vae, inception, *, preset: str | None = None,
                   dtype: Any = "auto", inception_size: int = 299, ema: bool | None = None,
                   **kwargs) -> "C2IGenerator":
        """Load the TiM checkpoint (official file, converted directory or EMA export; see
        :func:`tim_jax.inference.load_network`), the VAE Hub folder and the Inception weights."""
        from tim_jax.inference import load_network

        net = load_network(checkpoint, preset=preset, dtype=dtype, ema=ema)
        codec = load_codec(vae)
        features = load_inception(inception, size=inception_size)
        return cls(net.model_config, net.graphdef, net.params, net.transport, codec, features,
                   source=net.source, **kwargs)

    # ------------------------------------------------------------------------------------------
    def check(self, settings: SamplerSettings) -> None:
        """ValueError for settings this model cannot run (before anything compiles)."""
        if settings.guided and not self.has_null:
            raise ValueError("cfg_scale > 1 needs the model's null class (class_dropout_prob > 0)")
        if settings.stochasticity > 0 and not self.transport.supports_stochasticity:
            raise ValueError(f"stochasticity > 0 is not supported by the {self.transport.name} "
                             "transport")

    def nfe(self, settings: SamplerSettings) -> int:
        """Network evaluations per sample: one per step, two on guided steps."""
        return settings.num_steps + guided_steps(self.transport, settings)

    def generate(self, indices, labels, settings: SamplerSettings, *,
                 return_images: bool = False) -> dict[str, np.ndarray]:
        """Samples of the global ``indices`` (n,) with their ``labels`` (n,).

        Returns ``pool`` (n, D) and ``logits`` (n, K) float32, plus ``images`` (n, H, W, 3) uint8
        when ``return_images``. Runs in batches of ``self.rows`` (the last one padded), all
        dispatched before the results are fetched."""
        self.check(settings)
        idx = np.asarray(indices, np.int64).reshape(-1)
        lab = np.asarray(labels, np.int64).reshape(-1)
        if idx.shape != lab.shape or idx.size == 0:
            raise ValueError(f"indices {idx.shape} and labels {lab.shape} must be the same "
                             "non-empty length")
        if idx.min() < 0 or idx.max() >= 2 ** 32:
            raise ValueError("sample indices must be in [0, 2**32)")
        if lab.min() < 0 or lab.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got "
                             f"[{lab.min()}, {lab.max()}]")
        guided = guided_steps(self.transport, settings) > 0
        out: dict[str, list] = {"pool": [], "logits": [], "images": []}
        for start in range(0, idx.size, self.rows):
            keep = min(self.rows, idx.size - start)
            take = np.arange(start, start + self.rows).clip(max=idx.size - 1)
            b_idx, b_lab = idx[take].astype(np.uint32), lab[take].astype(np.int32)
            stoch = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed),
                                                          STOCHASTIC_TAG), int(b_idx[0]))
            z = _noise(self._noise_key, jax.device_put(b_idx, self._batch),
                       latent_shape=self.latent_shape, batch=self._batch)
            latents = _sample(self.params, z, jax.device_put(b_lab, self._batch), self._null,
                              jax.device_put(stoch, self._replicated), apply_fn=self._apply,
                              transport=self.transport, settings=settings, guided=guided,
                              batch=self._batch)
            pixels = _decode(self._vae_params, latents, decode_fn=self.codec.decode_fn,
                             batch=self._batch)
            pool, logits = _extract(self._feature_state, pixels,
                                    feature_apply=self.features.apply, batch=self._batch)
            out["pool"].append((pool, keep))  # fetched below: the batches queue up on device
            out["logits"].append((logits, keep))
            if return_images:
                out["images"].append((pixels, keep))
        return {k: np.concatenate([np.asarray(a)[:keep] for a, keep in v])
                for k, v in out.items() if v}

    def __repr__(self) -> str:
        return (f"C2IGenerator(source={self.source!r}, image_size={self.image_size}, "
                f"rows={self.rows}, devices={self.num_devices}, features={self.features.name}"
                f"@{self.features.size})")
