"""REPA targets computed inside the jitted train step from the batch's images.

The official recipe aligns the network's projector output (block ``encoder_depth``) with the
patch features of a frozen vision encoder run on the training image: RADIO v2.5-B in the
official TiM trainer, DINOv2-B/14 in the REPA paper. Computing them online, on device, means no
terabytes of stored features. Config (``objective``)::

    repa_encoder        ""  (off: batches carry "repa_target", or none) | "dinov2" | "radio"
    repa_encoder_path   the encoder's folder (config.json + model.safetensors; RADIO: made by
                        ``python -m tim_jax.encoders.radio_convert``)

With an encoder the batches carry ``"image"`` (B, H, W, 3) uint8 (the crop whose latent is
``x``) and the step replaces it by ``"repa_target"`` (B, N, z_dim) float32 under
``stop_gradient``. N must be the network's token count and the feature width ``model.z_dim``;
:func:`load_repa_encoder` checks both before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ENCODERS = ("dinov2", "radio")


@dataclasses.dataclass(frozen=True)
class RepaEncoder:
    """A frozen encoder as a pure function: ``targets(params, images_uint8) -> (B, N, D)``."""

    kind: str
    graphdef: Any
    params: Any           # the encoder's frozen weights (a pytree); passed to the jitted step
    num_tokens: int
    dim: int
    fn: Callable          # fn(module, images in [-1, 1]) -> (B, N, D)

    def targets(self, params, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) uint8 (or float in [-1, 1]) -> (B, N, D) float32, no gradient."""
        x = images.astype(jnp.float32)
        if images.dtype == jnp.uint8:
            x = x / 127.5 - 1.0
        out = self.fn(nnx.merge(self.graphdef, params), x)
        return jax.lax.stop_gradient(out.astype(jnp.float32))


def model_tokens(config) -> int:
    """The network's token count for the training latents: (input_size / patch_size)^2."""
    m = config.model
    return (int(m.input_size) // int(m.patch_size)) ** 2


def load_repa_encoder(config, *, image_size: Optional[int] = None) -> Optional[RepaEncoder]:
    """The encoder of ``config.objective.repa_encoder`` (None when off), loaded from its folder,
    checked against the network (token count, ``model.z_dim``) on an abstract image batch.

    image_size: the training images' side in pixels (default: latent side x 8, the SD-VAE
    factor; records give it exactly)."""
    ob = config.objective
    kind = str(ob.get("repa_encoder", "") or "")
    if not kind:
        return None
    if kind not in ENCODERS:
        raise ValueError(f"objective.repa_encoder={kind!r}; allowed: '' (off) or {ENCODERS}")
    path = str(ob.get("repa_encoder_path", "") or "")
    if not path:
        raise ValueError(f"objective.repa_encoder={kind!r} needs objective.repa_encoder_path "
                         "(the encoder's folder: config.json + model.safetensors)")
    if not os.path.isdir(path):  # a clean usage error, not a FileNotFoundError traceback
        raise ValueError(f"objective.repa_encoder_path={path!r} is not a folder (config.json + model.safetensors)")
    d = config.data
    if str(d.get("source", "")) == "arrayrecord" and not d.get("images", False):
        raise ValueError("objective.repa_encoder runs on the batch's images: set data.images=True "
                         "(records prepared with --keep-images) and data.use_repa_target=False")
    if d.get("use_repa_target", False):
        raise ValueError("objective.repa_encoder computes the REPA targets in the step: set "
                         "data.use_repa_target=False (the data would carry targets too)")
    tokens = model_tokens(config)
    side = int(image_size or _records_image_size(config) or int(config.model.input_size) * 8)
    if kind == "dinov2":
        from tim_jax.encoders.dinov2 import Dinov2Encoder, repa_size

        module = Dinov2Encoder.from_pretrained(path)
        size = repa_size(side, side) if side >= 256 else int(module.config.patch_size) * round(
            tokens ** 0.5)

        def fn(m, x):
            return m.patch_features(x, size=size)
    else:
        from tim_jax.encoders.radio import RadioEncoder

        module = RadioEncoder.from_pretrained(path)

        def fn(m, x):
            return m.patch_features(x, num_tokens=tokens)

    graphdef, params = nnx.split(module)
    probe = RepaEncoder(kind, graphdef, params, tokens, 0, fn)
    out = jax.eval_shape(lambda p, x: probe.targets(p, x), params,
                         jax.ShapeDtypeStruct((1, side, side, 3), jnp.uint8))
    if out.shape[1] != tokens:
        raise ValueError(f"the {kind} REPA encoder gives {out.shape[1]} tokens for {side}px "
                         f"images but the network has {tokens} tokens "
                         f"((input_size/patch_size)^2)")
    if out.shape[2] != int(config.model.z_dim):
        raise ValueError(f"the {kind} REPA encoder's features are {out.shape[2]}-d but "
                         f"model.z_dim={config.model.z_dim}: set model.z_dim to {out.shape[2]}")
    return dataclasses.replace(probe, dim=int(out.shape[2]))


def _records_image_size(config) -> Optional[int]:
    """The crop size of prepared records (their manifest's ``image_size``), if the run uses
    them."""
    d = config.data
    if str(d.get("source", "")) != "arrayrecord" or not os.path.isfile(os.path.join(str(d.get("path") or ""), "manifest.json")):
        return None  # no records (yet): the data source names the problem
    from tim_jax.data import records

    size = records.read_manifest(d.path).get("image_size")
    return int(size) if size else None


def replicate(params, mesh) -> Any:
    """The encoder's weights placed on every device of ``mesh`` (they are small and frozen)."""
    from jax.sharding import NamedSharding, PartitionSpec

    sh = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), sh), params)
