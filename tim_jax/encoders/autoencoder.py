"""The image autoencoder seen by the rest of tim_jax: pixels <-> TiM's normalised latents.

``load_autoencoder(folder)`` reads a diffusers Hub folder and dispatches on ``_class_name``:
``AutoencoderKL`` (the SD-VAE, :mod:`tim_jax.encoders.sd_vae`) or ``AutoencoderDC`` (the DC-AE,
:mod:`tim_jax.encoders.dc_ae`). It returns a :class:`LatentCodec`.

Normalisation, as the official TiM wrappers (``tim/models/vae/{sd_vae,dc_ae}.py``) compute it.
They keep the latent statistics in an affine-free ``BatchNorm2d`` (eps 1e-4) whose buffers are
set at construction to ``running_mean = 0`` and ``running_var = 1 / scaling_factor**2`` (float32),
and ``mean = running_mean``, ``std = sqrt(running_var)``: the BatchNorm eps is NOT used, and
``shift_factor`` / ``latents_mean`` / ``latents_std`` of the config are ignored. Per channel::

    mean = 0
    std  = sqrt(float32(1) / float32(scaling_factor ** 2))            # float32, ~ 1/scaling_factor
    SD-VAE encode: (m, logvar) = posterior(x);  z = m + exp(0.5 * logvar) * eps,  eps ~ N(0, I)
    DC-AE  encode: z = encoder(x)                                      # deterministic
    latents = (z - mean) / std
    decode:  images = decoder(latents * std + mean)                    # not clipped

Here the posterior noise comes from ``jax.random`` (the official one from torch's global RNG).
torch's CPU float32 ``sqrt`` may differ from the correctly rounded value by one ulp; here
``std`` is correctly rounded. Images are NHWC in [-1, 1], latents NHWC float32.

DC-AE caveat: the official ``MyAutoencoderDC`` passes its constructor arguments positionally to
diffusers' ``AutoencoderDC``; with TiM's pinned diffusers 0.33.1 ``scaling_factor`` lands in
place (std = 1/0.41407 for ``dc-ae-f32c32-sana-1.1``), but diffusers >= 0.35 inserted three
arguments before it, so there the official wrapper silently gets scaling_factor 1 (std = 1).
This codec follows the pinned version: std from the config's ``scaling_factor``.

Pure functions for ``jax.jit``: the network is split once (``nnx.split``) into a graph and
``codec.params`` (an ``nnx.State``); ``codec.encode_fn(params, images, key=None, sample=True)``
and ``codec.decode_fn(params, latents)`` merge it back and compute (``jax.jit(codec.encode_fn)``
works; ``sample`` may be a Python bool or a traced boolean). ``codec.encode`` / ``codec.decode``
call cached jitted versions with ``codec.params``.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tim_jax.encoders import hub

SUPPORTED = ("AutoencoderKL", "AutoencoderDC")
SAMPLE_NEEDS_KEY = ("the SD-VAE encode samples the posterior (the official TiM behaviour): pass a "
                    "jax.random key, or sample=False for the posterior mean")


def official_latent_stats(scaling_factor: float, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (channels,) float32, as the official wrappers' BatchNorm buffers give
    them: mean 0, std = sqrt(float32(1) / float32(scaling_factor ** 2))."""
    if not scaling_factor or scaling_factor <= 0:
        raise ValueError(f"scaling_factor must be positive, got {scaling_factor!r}")
    var = np.ones((channels,), np.float32) / np.float32(scaling_factor ** 2)
    return np.zeros((channels,), np.float32), np.sqrt(var)


class LatentCodec:
    """A loaded autoencoder plus TiM's latent normalisation (see the module docstring).

    Attributes: ``kind`` ("AutoencoderKL" / "AutoencoderDC"), ``network`` (the NNX module),
    ``params``, ``spatial_factor`` (pixels per latent cell: 8 for the SD-VAE, 32 for the f32
    DC-AE), ``latent_channels``, ``scaling_factor``, ``mean`` / ``std`` ((C,) float32),
    ``stochastic`` (True where encode samples the posterior: the SD-VAE).
    """

    def __init__(self, network: nnx.Module, *, kind: str, spatial_factor: int,
                 latent_channels: int, scaling_factor: float, in_channels: int = 3):
        if kind not in SUPPORTED:
            raise ValueError(f"unknown autoencoder kind {kind!r} (supported: {list(SUPPORTED)})")
        self.kind = kind
        self.network = network
        self.spatial_factor = int(spatial_factor)
        self.latent_channels = int(latent_channels)
        self.in_channels = int(in_channels)
        self.scaling_factor = float(scaling_factor)
        self.stochastic = kind == "AutoencoderKL"
        self.mean, self.std = official_latent_stats(self.scaling_factor, self.latent_channels)
        self._graph, self.params = nnx.split(network)
        self._encode_jit = jax.jit(self.encode_fn)
        self._decode_jit = jax.jit(self.decode_fn)

    # -- pure functions (jit-able) ---------------------------------------------------------
    def encode_fn(self, params, images, key=None, sample=True) -> jax.Array:
        """images (B, H, W, 3) in [-1, 1], H and W multiples of ``spatial_factor`` ->
        normalised latents (B, H/f, W/f, C) float32. SD-VAE: ``sample`` true (the official
        behaviour) draws z from the posterior with ``key`` (required); ``sample`` false uses the
        posterior mean. ``sample`` may be a Python bool or a traced boolean scalar (then a key
        is needed either way). DC-AE: deterministic, ``key`` and ``sample`` are ignored."""
        self._check_images(images)
        net = nnx.merge(self._graph, params)
        if self.kind == "AutoencoderKL":
            mean, logvar = net.encode_moments(images)
            traced = isinstance(sample, jax.Array)
            if key is None:
                if traced or sample:
                    raise ValueError(SAMPLE_NEEDS_KEY)
                z = mean
            elif not traced and not sample:
                z = mean
            else:
                noise = jax.random.normal(key, mean.shape, jnp.float32)
                z = mean + jnp.where(sample, jnp.exp(0.5 * logvar) * noise, 0.0)
        else:
            z = net.encode(images).astype(jnp.float32)
        return (z - self.mean) / self.std

    def decode_fn(self, params, latents) -> jax.Array:
        """Normalised latents (B, h, w, C) -> images (B, h*f, w*f, 3) float32, about [-1, 1]
        (not clipped, as the official decode)."""
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"expected latents (B, h, w, {self.latent_channels}) NHWC, got "
                             f"shape {latents.shape}")
        z = latents.astype(jnp.float32) * self.std + self.mean
        return nnx.merge(self._graph, params).decode(z).astype(jnp.float32)

    # -- convenience -----------------------------------------------------------------------
    def encode(self, images, key=None, *, sample: bool = True) -> jax.Array:
        """:meth:`encode_fn` with ``self.params``, jitted: one compile per input shape serves
        both ``sample`` modes (``sample=False`` passes a dummy key, its noise unused)."""
        self._check_images(images)
        if self.stochastic and sample and key is None:
            raise ValueError(SAMPLE_NEEDS_KEY)
        if key is None:
            key = jax.random.key(0)
        return self._encode_jit(self.params, jnp.asarray(images), key, jnp.asarray(bool(sample)))

    def decode(self, latents) -> jax.Array:
        """:meth:`decode_fn` with ``self.params``, jitted (one compile per input shape)."""
        return self._decode_jit(self.params, jnp.asarray(latents))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, C) of the latents of a ``height`` x ``width`` image."""
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of the "
                             f"autoencoder's spatial factor {f}")
        return height // f, width // f, self.latent_channels

    def _check_images(self, images) -> None:
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(f"expected images (B, H, W, {self.in_channels}) NHWC in [-1, 1], "
                             f"got shape {images.shape}")
        self.latent_shape(images.shape[1], images.shape[2])

    def __repr__(self) -> str:
        return (f"LatentCodec({self.kind}, spatial_factor={self.spatial_factor}, "
                f"latent_channels={self.latent_channels}, "
                f"scaling_factor={self.scaling_factor})")


def load_autoencoder(folder, dtype=jnp.float32) -> LatentCodec:
    """Load a diffusers autoencoder Hub folder (``config.json`` + safetensors) as a
    :class:`LatentCodec`; compute dtype ``dtype`` (float32 default, bfloat16 option)."""
    config = hub.read_config(folder)
    kind = config.get("_class_name")
    if kind == "AutoencoderKL":
        from tim_jax.encoders.sd_vae import AutoencoderKL

        net = AutoencoderKL.from_pretrained(folder, dtype=dtype)
        widths = config["block_out_channels"]
    elif kind == "AutoencoderDC":
        from tim_jax.encoders.dc_ae import AutoencoderDC

        net = AutoencoderDC.from_pretrained(folder, dtype=dtype)
        widths = config.get("encoder_block_out_channels")
        if not widths:
            raise ValueError(f"{Path(folder)}: AutoencoderDC config lacks "
                             "encoder_block_out_channels")
    else:
        raise ValueError(f"{Path(folder)}: unsupported autoencoder class {kind!r} "
                         f"(config _class_name); supported: {list(SUPPORTED)}")
    if "scaling_factor" not in config or "latent_channels" not in config:
        raise ValueError(f"{Path(folder)}: config.json lacks scaling_factor or latent_channels")
    return LatentCodec(net, kind=kind, spatial_factor=2 ** (len(widths) - 1),
                       latent_channels=config["latent_channels"],
                       scaling_factor=config["scaling_factor"],
                       in_channels=config.get("in_channels", 3))
