"""Batched, data-parallel encoding of crops and their mirrors into TiM's normalised latents.

:class:`PairEncoder` runs one jitted function over a 1-D mesh (axis ``"data"``) of the local
devices: the batch is split across devices, the autoencoder's parameters replicated. Input:
(n, H, W, 3) uint8 crops and their (n,) int global record indices. On the device, as the
official ``ToTensor`` + ``Normalize(0.5, 0.5)``::

    x      = (float32(pixels) / 255 - 0.5) / 0.5          # [-1, 1], bit-exact (a lookup table)
    x_flip = x[:, :, ::-1]                                 # horizontal mirror (torchvision hflip)
    latent, latent_flip = codec.encode(x), codec.encode(x_flip)

SD-VAE posterior sampling (the official behaviour) draws per-record noise::

    k = fold_in(key(seed), index);  k_image, k_flip = split(k)

so ``latent[i]`` equals ``codec.encode(x[i:i+1], k_image)[0]`` whatever the batch, device count
or process split (the encode is vmapped over records, each with its own key). ``posterior
"mean"`` uses the posterior mean; the DC-AE is deterministic. Outputs are cast to the storage
dtype on the device; ``finite`` flags records whose stored latents are all finite.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

POSTERIORS = ("sample", "mean")


def record_keys(seed: int, indices) -> jax.Array:
    """(n, 2) typed keys: per record ``split(fold_in(key(seed), index))`` = (image, mirror)."""
    base = jax.random.key(seed)
    indices = jnp.asarray(indices, jnp.uint32)
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base, i)))(indices)


# uint8 -> [-1, 1] for the 256 pixel values, computed in numpy with IEEE float32 division as
# torch does; XLA would turn "/ 255" into a multiply by the reciprocal (1 ulp off on some values).
_UNIT_RANGE = ((np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5))
               / np.float32(0.5))


def pixels_to_unit_range(pixels) -> jax.Array:
    """uint8 (..., 3) -> float32 in [-1, 1], bit-exact torchvision ToTensor + Normalize(0.5)."""
    return jnp.asarray(_UNIT_RANGE)[pixels.astype(jnp.int32)]


class PairEncoder:
    """Encodes batches of crops and their mirrors with ``codec`` (a
    :class:`tim_jax.encoders.autoencoder.LatentCodec`) on ``devices`` (default: all local).

    ``batch_size`` records (each two images) per device call, rounded up to a multiple of the
    device count. ``compiler_options`` go to ``jax.jit`` (e.g. a lower XLA optimisation level in
    tests).
    """

    def __init__(self, codec, *, posterior: str = "sample", seed: int = 0,
                 batch_size: int = 64, latent_dtype=np.float16, devices=None,
                 compiler_options: dict | None = None):
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior {posterior!r}: expected one of {POSTERIORS}")
        self.codec = codec
        self.sample = bool(codec.stochastic and posterior == "sample")
        self.seed = int(seed)
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.num_devices = len(self.devices)
        self.batch_size = max(1, math.ceil(batch_size / self.num_devices)) * self.num_devices
        self.latent_dtype = np.dtype(latent_dtype)
        self.mesh = Mesh(np.asarray(self.devices), ("data",))
        self._data = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(codec.params, replicated)
        kwargs = {"compiler_options": compiler_options} if compiler_options else {}
        self._encode = jax.jit(self._encode_pairs, in_shardings=(replicated, self._data,
                                                                 self._data),
                               out_shardings=(self._data, self._data, self._data), **kwargs)

    @property
    def mode(self) -> str:
        """"sample" / "mean" (SD-VAE) or "deterministic" (DC-AE)."""
        if not self.codec.stochastic:
            return "deterministic"
        return "sample" if self.sample else "mean"

    def _encode_pairs(self, params, pixels, indices):
        n = pixels.shape[0]
        x = pixels_to_unit_range(pixels)
        both = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
        if self.sample:
            keys = record_keys(self.seed, indices)
            keys = jnp.concatenate([keys[:, 0], keys[:, 1]], axis=0)
            one = lambda im, k: self.codec.encode_fn(params, im[None], k, True)[0]  # noqa: E731
            z = jax.vmap(one)(both, keys)
        else:
            z = self.codec.encode_fn(params, both, None, False)
        z = z.astype(self.latent_dtype)
        finite = jnp.all(jnp.isfinite(z).reshape(2, n, -1), axis=(0, 2))
        return z[:n], z[n:], finite

    def padded_size(self, n: int, *, exact_batches: bool = True) -> int:
        """Rows a call with ``n`` records is padded to: the full batch size
        (``exact_batches``: one compiled shape per image size) or the next power of two
        (at least the device count, a multiple of it, at most the batch size)."""
        if n > self.batch_size:
            raise ValueError(f"{n} records exceed the batch size {self.batch_size}")
        if exact_batches:
            return self.batch_size
        size = 1 << max(0, (n - 1).bit_length())
        size = max(self.num_devices, math.ceil(size / self.num_devices) * self.num_devices)
        return min(size, self.batch_size)

    def dispatch(self, pixels: np.ndarray, indices, *, exact_batches: bool = True):
        """Start encoding (n, H, W, 3) uint8 ``pixels`` (all one size) with their global
        ``indices``; returns a handle for :meth:`fetch` (JAX dispatch is asynchronous)."""
        n = len(indices)
        rows = self.padded_size(n, exact_batches=exact_batches)
        if rows != n:
            pad = np.zeros((rows - n,) + pixels.shape[1:], np.uint8)
            pixels = np.concatenate([pixels, pad])
        idx = np.zeros((rows,), np.uint32)
        idx[:n] = np.asarray(indices, np.uint32)
        pixels = jax.device_put(pixels, self._data)
        idx = jax.device_put(idx, self._data)
        return n, self._encode(self.params, pixels, idx)

    @staticmethod
    def fetch(handle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latent, latent_flip, finite) of a :meth:`dispatch`, as numpy, padding removed."""
        n, (lat, lat_flip, finite) = handle
        return np.asarray(lat)[:n], np.asarray(lat_flip)[:n], np.asarray(finite)[:n]
