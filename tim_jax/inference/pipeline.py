"""``TiMPipeline``: class labels or prompts -> pictures, with a TiM network, its autoencoder and
(T2I) the Gemma-3 text encoder.

    pipe = TiMPipeline.from_pretrained("c2i_model_256.safetensors", "sd-vae-ft-ema")
    out = pipe(labels=[207, 360], num_steps=4, cfg_scale=2.5, cfg_interval=(0.0, 0.6), seed=0)
    out.images            # (2, 256, 256, 3) uint8;  out.pil() -> PIL images;  out.latents

What one call does (as the official sample scripts, ``projects/sample/sample_*_ddp.py``):
  * noise: sample i of the call (global index i, 0-based) starts from
    ``z_i = jax.random.normal(fold_in(key(seed), i), (h, w, C))``, so an image depends only on
    (seed, i, condition, settings), not on the batch size or the number of devices;
  * conditions: c2i labels with the null class ``num_classes`` for guidance; t2i prompt features
    of the Gemma-3 encoder cut to the longest prompt of the WHOLE call (the official scripts cut
    per batch) and the features of ``""`` as the null condition;
  * the any-step sampler (:func:`tim_jax.sampler.sample`) on the latent (height/f, width/f, C),
    f = the VAE factor; any size that is a multiple of f x patch size, non-square included (the
    network builds the official RoPE grid for it);
  * decode with the VAE (float32), in tiles (``vae_tiling.decode_tiled``) when a latent side
    exceeds ``tile_above`` cells; pixels = clamp(255 (x + 1) / 2, 0, 255) as uint8.

Data parallel over a 1-D mesh (all local devices by default): a batch is padded to a multiple
of the device count (padding rows repeat the last sample) and sharded; the padding is dropped.
The sampling loop is one ``jax.jit`` per (batch and latent shape, steps, guidance, stochasticity,
mode) and the decode one per shape, both cached by jax (``traces`` counts the sampler's
compiles); when no step falls inside the guidance window (e.g. 1 step: t = T_max is never
guided) the unguided sampler runs. With ``stochasticity > 0`` the sampler's extra noise is drawn
per batch (key ``fold_in(fold_in(key(seed), 2**32 - 1), first index of the batch)``), so those
images also depend on ``batch_size`` (not on the device count).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tim_jax import sampler
from tim_jax.inference.images import image_grid, size_step
from tim_jax.inference.loading import LoadedNetwork, load_network, resolve_dtype
from tim_jax.inference.prompts import PromptEncoder, load_text_parts
from tim_jax.inference.request import SampleRequest, make_request

__all__ = ["TiMPipeline", "PipelineOutput", "initial_noise"]

STOCHASTIC_STREAM = 0xFFFFFFFF  # fold_in tag of the sampler-noise key stream (noise uses i)


def initial_noise(seed: int, indices, shape: Sequence[int]) -> np.ndarray:
    """The starting noise of samples ``indices`` (global indices within a call):
    ``z[k] = jax.random.normal(fold_in(jax.random.key(seed), indices[k]), shape)`` float32,
    as numpy (len(indices), *shape). Called op by op, outside the sampling jit: jax's own jitted
    ``fold_in`` / ``normal`` compile once per shape, for every pipeline and batch size
    (threefry is slow to compile on XLA:CPU)."""
    key = jax.random.key(int(seed))
    shape = tuple(int(d) for d in shape)
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, int(i)), shape,
                                                  jnp.float32)) for i in indices])


@dataclasses.dataclass
class PipelineOutput:
    """``images`` (N, H, W, 3) uint8, ``latents`` (N, H/f, W/f, C) float32 (the sampler's
    output, normalised latent units), the conditions and the request that made them."""

    images: np.ndarray
    latents: np.ndarray
    request: SampleRequest

    @property
    def labels(self):
        return self.request.labels

    @property
    def prompts(self):
        return self.request.prompts

    def pil(self) -> list:
        """The images as a list of ``PIL.Image.Image``."""
        from PIL import Image

        return [Image.fromarray(im) for im in self.images]

    def grid(self, ncols: int | None = None) -> np.ndarray:
        """All images in one uint8 grid (row-major; ``ncols`` default ceil(sqrt(N)))."""
        return image_grid(self.images, ncols)


def _make_mesh(mesh) -> jax.sharding.Mesh:
    if mesh is None:
        return jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    if not isinstance(mesh, jax.sharding.Mesh) or len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must be a 1-D jax.sharding.Mesh (batch axis), got {mesh!r}")
    return mesh


class TiMPipeline:
    """See the module docstring. Build it with :meth:`from_pretrained`, or directly from a
    model config, graphdef, params (float32) and a loaded ``LatentCodec`` (plus, for T2I, a
    ``Gemma3TextEncoder`` and a ``CaptionTokenizer``).

    Args:
      tile_above, tile, tile_overlap: decode in ``tile`` x ``tile`` latent-cell tiles sharing
        ``tile_overlap`` cells when a latent side exceeds ``tile_above`` cells.
      text_batch: prompts encoded per Gemma call (the last call padded with "": one shape).
      max_length: token length of the text encoder input (official 256).
      escape_prompts: apply the official training-time caption escaping (unicode-escape).
    """

    def __init__(self, model_config, graphdef, params, vae, *, transport=None,
                 text_encoder=None, tokenizer=None, mesh=None, tile_above: int = 96,
                 tile: int = 64, tile_overlap: int = 16, text_batch: int = 8,
                 max_length: int = 256, escape_prompts: bool = True, source: str | None = None):
        from tim_jax import transports
        from tim_jax.models import make_apply_fn

        self.model_config = model_config
        self.kind = str(model_config.kind)
        self.in_channels = int(model_config.in_channels)
        self.patch_size = int(model_config.patch_size)
        self.num_classes = int(model_config.num_classes) if self.kind == "c2i" else None
        self.has_null = self.kind == "t2i" or float(model_config.class_dropout_prob) > 0
        self.transport = transport if transport is not None else transports.OT_FM()
        self.vae = vae
        self.source = source
        if vae.latent_channels != self.in_channels:
            raise ValueError(
                f"the VAE ({vae.kind}) has {vae.latent_channels} latent channels but the TiM "
                f"model takes in_channels={self.in_channels}: they do not belong together "
                "(SD-VAE: 4 channels, the 256 C2I models; DC-AE f32c32: 32, the 512 C2I and T2I)")
        self._check_text(text_encoder, tokenizer)
        self.prompt_encoder = None if text_encoder is None else PromptEncoder(
            text_encoder, tokenizer, max_length=max_length, text_batch=text_batch,
            escape=bool(escape_prompts))
        self.tile_above, self.tile, self.tile_overlap = int(tile_above), int(tile), int(tile_overlap)
        self.mesh = _make_mesh(mesh)
        self._axis = self.mesh.axis_names[0]
        self.num_devices = int(self.mesh.devices.size)
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(params, replicated)
        self._vae_params = jax.device_put(vae.params, replicated)
        self._apply = make_apply_fn(graphdef)
        self._sample_jit = jax.jit(self._sample_impl, static_argnames=(
            "num_steps", "cfg_scale", "cfg_low", "cfg_high", "stochasticity", "mode"))
        self._decode_jit = jax.jit(self._decode_impl)
        self._decode_float_jit = jax.jit(vae.decode_fn)
        self.traces = 0  # times the sampling loop was traced (= compiled)

    def _check_text(self, text_encoder, tokenizer) -> None:
        if self.kind == "c2i":
            if text_encoder is not None or tokenizer is not None:
                raise ValueError("a text encoder / tokenizer was given for a class-conditional "
                                 "(c2i) model, which takes class labels")
            return
        if text_encoder is None or tokenizer is None:
            raise ValueError("a text-to-image (t2i) model needs a text encoder and a tokenizer "
                             "(e.g. the google/gemma-3-1b-it folder for both)")
        hidden, want = int(text_encoder.spec.hidden_size), int(self.model_config.cap_feat_dim)
        if hidden != want:
            raise ValueError(f"the text encoder's hidden size is {hidden} but the TiM model "
                             f"expects caption features of cap_feat_dim={want}")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint, vae, text_encoder=None, tokenizer=None, *,
                        preset: str | None = None, dtype: Any = "auto", ema: bool | None = None,
                        transport=None, **kwargs) -> "TiMPipeline":
        """Load everything from files (see the module docstring of ``inference.loading``).

        checkpoint: official TiM file (+ ``preset``, or inferred from its shapes), converted
          weights directory or EMA export directory. vae: a diffusers Hub folder (SD-VAE
          ``AutoencoderKL`` or DC-AE ``AutoencoderDC``) or a loaded ``LatentCodec``.
          text_encoder / tokenizer (T2I): Hub folders (the tokenizer defaults to the text
          encoder's folder) or loaded objects. dtype: TiM and Gemma compute dtype ("auto":
          bfloat16 on GPU/TPU, float32 on CPU); the VAE always decodes in float32.
          ``transport`` overrides the checkpoint's (OT_FM unless an EMA export says otherwise).
        """
        from tim_jax.encoders.autoencoder import LatentCodec, load_autoencoder

        dtype = resolve_dtype(dtype)
        net: LoadedNetwork = load_network(checkpoint, preset=preset, dtype=dtype, ema=ema)
        kind = str(net.model_config.kind)
        if kind == "c2i" and (text_encoder is not None or tokenizer is not None):
            raise ValueError(f"{checkpoint} is a class-conditional (c2i) model: it takes class "
                             "labels, no text encoder or tokenizer")
        if kind == "t2i" and text_encoder is None:
            raise ValueError(f"{checkpoint} is a text-to-image (t2i) model: give the text encoder "
                             "folder (google/gemma-3-1b-it)")
        codec = vae if isinstance(vae, LatentCodec) else load_autoencoder(vae, dtype=jnp.float32)
        if codec.latent_channels != int(net.model_config.in_channels):
            raise ValueError(
                f"VAE {vae} has {codec.latent_channels} latent channels but the TiM checkpoint "
                f"{checkpoint} takes in_channels={net.model_config.in_channels}: mismatched files")
        if kind == "t2i":
            text_encoder, tokenizer = load_text_parts(text_encoder, tokenizer, dtype)
        return cls(net.model_config, net.graphdef, net.params, codec,
                   transport=transport or net.transport, text_encoder=text_encoder,
                   tokenizer=tokenizer, source=net.source, **kwargs)

    # ------------------------------------------------------------------------------------------
    @property
    def size_step(self) -> int:
        """Image sides must be multiples of this many pixels (VAE factor x patch size)."""
        return size_step(self.vae.spatial_factor, self.patch_size)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the network was trained at: input_size x VAE factor."""
        s = int(self.model_config.input_size) * self.vae.spatial_factor
        return s, s

    def make_request(self, labels=None, prompts=None, **settings) -> SampleRequest:
        """Validate a request (see :meth:`__call__`) without compiling anything; also checks
        that every prompt's tokens exist in the text encoder's vocabulary."""
        req = make_request(kind=self.kind, num_classes=self.num_classes,
                           spatial_factor=self.vae.spatial_factor, patch_size=self.patch_size,
                           default_size=self.default_size, labels=labels, prompts=prompts,
                           has_null=self.has_null,
                           stochastic_ok=self.transport.supports_stochasticity, **settings)
        if req.prompts is not None:
            self.prompt_encoder.check(req.prompts)
        return req

    def __call__(self, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                 *, num_steps: int = 4, cfg_scale: float = 1.0,
                 cfg_interval: Sequence[float] = (0.0, 1.0), stochasticity: float = 0.0,
                 mode: str = "transition", height: int | None = None, width: int | None = None,
                 seed: int = 0, batch_size: int | None = None, progress=False) -> PipelineOutput:
        """Generate one image per label (c2i) or prompt (t2i).

        num_steps: sampler steps (1 = one network call per image without guidance).
        cfg_scale: classifier-free guidance scale (> 1 to guide); cfg_interval: (low, high)
          fractions of T_max where guidance applies (official --guidance-low/-high).
        stochasticity: the OT-FM SDE ratio in [0, 1). mode: "transition" | "diffusion".
        height, width: pixels (default: the trained size). seed: noise seed.
        batch_size: samples per device batch (default: all at once), rounded up to a multiple
          of the device count. progress: True for a tqdm bar, or an object with ``update(n)``.
        """
        req = self.make_request(labels, prompts, num_steps=num_steps, cfg_scale=cfg_scale,
                                cfg_interval=cfg_interval, stochasticity=stochasticity,
                                mode=mode, height=height, width=width, seed=seed,
                                batch_size=batch_size)
        return self.run(req, progress=progress)

    def run(self, req: SampleRequest, progress=False) -> PipelineOutput:
        """Generate the images of a validated request (:meth:`make_request`)."""
        n = req.num_samples
        cond, null = self._conditions(req)
        rows = self._rows(req)
        bar, own_bar = _progress(progress, n)
        guided = self.guided_steps(req) > 0
        h, w = req.latent_hw
        decode_whole = max(h, w) <= self.tile_above
        replicated = NamedSharding(self.mesh, P())
        null_dev = jax.device_put(null, replicated) if guided else None
        images, latents = [], []
        try:
            for start in range(0, n, rows):
                take = np.minimum(np.arange(start, start + rows), n - 1)  # padding: last row
                stoch_key = None if req.stochasticity <= 0 else jax.device_put(
                    jax.random.fold_in(jax.random.fold_in(
                        jax.random.key(req.seed), STOCHASTIC_STREAM), start), replicated)
                z = initial_noise(req.seed, take, (h, w, self.in_channels))
                lat = self._sample_jit(
                    self.params, self._shard(z), self._shard(cond[take]), null_dev, stoch_key,
                    num_steps=req.num_steps, cfg_scale=req.cfg_scale if guided else 1.0,
                    cfg_low=req.cfg_low, cfg_high=req.cfg_high,
                    stochasticity=req.stochasticity, mode=req.mode)
                pix = (self._decode_jit(self._vae_params, lat) if decode_whole
                       else self._decode_tiled(lat))
                keep = min(rows, n - start)
                latents.append(np.asarray(lat)[:keep])
                images.append(np.asarray(pix)[:keep])
                if bar is not None:
                    bar.update(keep)
        finally:
            if own_bar:
                bar.close()
        return PipelineOutput(np.concatenate(images), np.concatenate(latents), req)

    def guided_steps(self, req: SampleRequest) -> int:
        """How many steps of ``req`` apply guidance: those with cfg_low*T_max < t_k <
        cfg_high*T_max (in float32, as the sampler compares), when cfg_scale > 1. With none
        (e.g. one step: t_0 = T_max is never guided) the unguided sampler is compiled."""
        if req.cfg_scale <= 1.0:
            return 0
        t = sampler.time_grid(self.transport, req.num_steps)[:-1]
        t_max = float(self.transport.T_max)
        low, high = np.float32(req.cfg_low * t_max), np.float32(req.cfg_high * t_max)
        return int(np.sum((t > low) & (t < high)))

    # ------------------------------------------------------------------------------------------
    def _rows(self, req: SampleRequest) -> int:
        """Rows per device batch: the batch size (default all samples) rounded up to a
        multiple of the device count."""
        want = req.num_samples if req.batch_size is None else min(req.batch_size, req.num_samples)
        return int(math.ceil(want / self.num_devices)) * self.num_devices

    def _shard(self, x):
        return jax.device_put(np.asarray(x), NamedSharding(self.mesh, P(self._axis)))

    def _conditions(self, req: SampleRequest) -> tuple[np.ndarray, np.ndarray]:
        """(per-sample conditions (N, ...), the null condition broadcastable to one row)."""
        if req.labels is not None:
            null = np.asarray(self.num_classes if self.has_null else 0, np.int32)
            return np.asarray(req.labels, np.int32), null
        return self.prompt_encoder(req.prompts)

    def _decode_tiled(self, latents) -> np.ndarray:
        from tim_jax.encoders.vae_tiling import decode_tiled
        from tim_jax.inference.images import to_uint8

        def decode(tile):
            return self._decode_float_jit(self._vae_params, self._shard(tile))

        return to_uint8(decode_tiled(decode, np.asarray(latents), tile=self.tile,
                                     overlap=self.tile_overlap))

    def _sample_impl(self, params, z, cond, null_cond, stoch_key, *, num_steps, cfg_scale,
                     cfg_low, cfg_high, stochasticity, mode):
        """Noise z (rows, h, w, C) -> the sampler's latents (rows, h, w, C) float32."""
        self.traces += 1
        latents = sampler.sample(
            self._apply, params, z, cond, null_cond, transport=self.transport,
            num_steps=num_steps, cfg_scale=cfg_scale, cfg_low=cfg_low, cfg_high=cfg_high,
            stochasticity_ratio=stochasticity, mode=mode,
            rng=stoch_key if stochasticity > 0 else None)
        return jax.lax.with_sharding_constraint(latents.astype(jnp.float32),
                                                NamedSharding(self.mesh, P(self._axis)))

    def _decode_impl(self, vae_params, latents):
        """Latents (rows, h, w, C) -> uint8 pixels (rows, h*f, w*f, 3), official rounding."""
        images = self.vae.decode_fn(vae_params, latents)
        pixels = jnp.clip(255.0 * ((images + 1.0) / 2.0), 0.0, 255.0).astype(jnp.uint8)
        return jax.lax.with_sharding_constraint(pixels, NamedSharding(self.mesh, P(self._axis)))

    def __repr__(self) -> str:
        return (f"TiMPipeline({self.kind}, source={self.source!r}, vae={self.vae.kind} "
                f"f{self.vae.spatial_factor}c{self.vae.latent_channels}, "
                f"transport={self.transport.name}, devices={self.num_devices})")


def _progress(progress, total: int):
    """(bar or None, whether we own it)."""
    if progress is True:
        from tqdm import tqdm

        return tqdm(total=total, unit="img"), True
    if progress:
        return progress, False
    return None, False
