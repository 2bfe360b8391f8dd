"""Deep-compression autoencoder (DC-AE): diffusers ``AutoencoderDC`` in Flax NNX.

The official TiM-T2I and TiM-C2I-512 encode images with ``mit-han-lab/dc-ae-f32c32-sana-1.1-
diffusers`` (32x spatial compression, 32 latent channels). This module builds the network from
the Hub ``config.json``, loads ``diffusion_pytorch_model.safetensors`` and computes::

    encode: images (B, H, W, in_channels) in [-1, 1] -> raw latent (B, H/f, W/f, latent_channels)
    decode: latent (B, h, w, latent_channels)        -> images (B, h*f, w*f, in_channels)

with f = :attr:`AutoencoderDC.spatial_factor`, NHWC throughout, no scaling factor applied (the
caller multiplies by :attr:`AutoencoderDC.scaling_factor`). Layers are in ``dc_ae_blocks``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tim_jax.encoders import hub
from tim_jax.encoders.dc_ae_blocks import (ACTIVATIONS, NORM_TYPES, AEWeight, Conv2d, DownBlock,
                                           EfficientViTBlock, ResBlock, RMSNorm, UpBlock,
                                           activation)

PARITY_TOLERANCE = 1e-5  # max|ours - ref| / max|ref| against diffusers in float32
BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
DOWNSAMPLE_TYPES = ("conv", "pixel_unshuffle")  # "conv" in any case ("Conv" on the Hub)
UPSAMPLE_TYPES = ("interpolate", "pixel_shuffle")


def _per_level(value, n: int, field: str) -> tuple:
    """A str broadcast to ``n`` levels, or a list that must have ``n`` entries."""
    if isinstance(value, str):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{field} has {len(value)} entries, the config has {n} levels")
    return value


def _choice(value, allowed, field: str):
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; supported values: {list(allowed)}")
    return value


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """The ``AutoencoderDC`` config fields (defaults: diffusers' constructor defaults), with
    every per-level field expanded to one entry per level."""
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple = ("ResBlock",) * 6
    decoder_block_types: tuple = ("ResBlock",) * 6
    encoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple = ("rms_norm",) * 6
    decoder_act_fns: tuple = ("silu",) * 6
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    @classmethod
    def from_hub(cls, raw: dict) -> "DCAEConfig":
        """Read a diffusers ``config.json`` dict; ValueError naming any unknown or unsupported
        field. Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are metadata."""
        name = raw.get("_class_name", "AutoencoderDC")
        if name != "AutoencoderDC":
            raise ValueError(f"config _class_name is {name!r}, expected 'AutoencoderDC'")
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"unknown AutoencoderDC config fields {unknown}; known: "
                             f"{sorted(fields)}")
        v = {**fields, **{k: raw[k] for k in raw if k in fields}}
        for side in ("encoder", "decoder"):
            n = len(v[f"{side}_block_out_channels"])
            if n < 1:
                raise ValueError(f"{side}_block_out_channels is empty")
            v[f"{side}_block_out_channels"] = tuple(int(c) for c in v[f"{side}_block_out_channels"])
            v[f"{side}_block_types"] = tuple(
                _choice(t, BLOCK_TYPES, f"{side}_block_types[{i}]") for i, t in
                enumerate(_per_level(v[f"{side}_block_types"], n, f"{side}_block_types")))
            layers = tuple(int(k) for k in _per_level(v[f"{side}_layers_per_block"], n,
                                                      f"{side}_layers_per_block"))
            if min(layers) < 0 or (layers[0] == 0 and n < 2):
                raise ValueError(f"{side}_layers_per_block={list(layers)} is not supported "
                                 "(counts must be >= 0; a first count of 0 needs >= 2 levels)")
            v[f"{side}_layers_per_block"] = layers
            scales = _per_level(v[f"{side}_qkv_multiscales"], n, f"{side}_qkv_multiscales")
            for i, ks in enumerate(scales):
                if any(int(k) < 1 or int(k) % 2 == 0 for k in ks):
                    raise ValueError(f"{side}_qkv_multiscales[{i}]={list(ks)}: kernel sizes must "
                                     "be odd and positive")
            v[f"{side}_qkv_multiscales"] = tuple(tuple(int(k) for k in ks) for ks in scales)
        n = len(v["decoder_block_out_channels"])
        v["decoder_norm_types"] = tuple(
            _choice(t, NORM_TYPES, f"decoder_norm_types[{i}]") for i, t in
            enumerate(_per_level(v["decoder_norm_types"], n, "decoder_norm_types")))
        v["decoder_act_fns"] = tuple(
            _choice(a, tuple(ACTIVATIONS), f"decoder_act_fns[{i}]") for i, a in
            enumerate(_per_level(v["decoder_act_fns"], n, "decoder_act_fns")))
        _choice(v["decoder_conv_act_fn"], tuple(ACTIVATIONS), "decoder_conv_act_fn")
        down = str(v["downsample_block_type"])
        v["downsample_block_type"] = _choice(down.lower() if down.lower() == "conv" else down,
                                             DOWNSAMPLE_TYPES, "downsample_block_type")
        _choice(v["upsample_block_type"], UPSAMPLE_TYPES, "upsample_block_type")
        latent = int(v["latent_channels"])
        if v["encoder_out_shortcut"] and v["encoder_block_out_channels"][-1] % latent:
            raise ValueError(f"encoder_out_shortcut needs encoder_block_out_channels[-1]="
                             f"{v['encoder_block_out_channels'][-1]} divisible by "
                             f"latent_channels={latent}")
        if v["decoder_in_shortcut"] and v["decoder_block_out_channels"][-1] % latent:
            raise ValueError(f"decoder_in_shortcut needs decoder_block_out_channels[-1]="
                             f"{v['decoder_block_out_channels'][-1]} divisible by "
                             f"latent_channels={latent}")
        if int(v["attention_head_dim"]) < 1:
            raise ValueError(f"attention_head_dim={v['attention_head_dim']} must be >= 1")
        return cls(**v)


def _make_block(kind: str, channels: int, cfg: DCAEConfig, kernel_sizes, norm: str, act: str,
                field: str, dtype):
    if kind == "ResBlock":
        return ResBlock(channels, norm, act, field=field, dtype=dtype)
    return EfficientViTBlock(channels, cfg.attention_head_dim, kernel_sizes, norm, field=field,
                             dtype=dtype)


class Encoder(nnx.Module):
    """conv_in, per level [blocks..., downsample], conv_out (+ channel-averaged shortcut).
    The encoder's blocks always use RMSNorm and SiLU (as diffusers hard-codes)."""

    def __init__(self, cfg: DCAEConfig, *, dtype=jnp.float32):
        ch, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, dtype=dtype)
        else:
            self.conv_in = DownBlock(cfg.in_channels, ch[1], unshuffle=unshuffle, shortcut=False,
                                     field="encoder conv_in", dtype=dtype)
        levels = []
        for i, (c, n) in enumerate(zip(ch, layers)):
            field = f"encoder level {i}"
            blocks = [_make_block(cfg.encoder_block_types[i], c, cfg,
                                  cfg.encoder_qkv_multiscales[i], "rms_norm", "silu", field, dtype)
                      for _ in range(n)]
            if i < len(ch) - 1 and n > 0:
                blocks.append(DownBlock(c, ch[i + 1], unshuffle=unshuffle, shortcut=True,
                                        field=field, dtype=dtype))
            levels.append(nnx.List(blocks))
        self.down_blocks = nnx.List(levels)
        self.conv_out = Conv2d(ch[-1], cfg.latent_channels, 3, dtype=dtype)
        self.out_group = ch[-1] // cfg.latent_channels if cfg.encoder_out_shortcut else 0
        self.num_downsamples = int(layers[0] == 0) + sum(
            1 for i, n in enumerate(layers[:-1]) if n > 0)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level in self.down_blocks:
            for block in level:
                x = block(x)
        y = self.conv_out(x)
        if self.out_group:
            y = y + x.reshape(*x.shape[:-1], -1, self.out_group).mean(-1)
        return y


class Decoder(nnx.Module):
    """conv_in (+ channel-repeated shortcut), per level from the deepest [upsample, blocks...],
    RMSNorm, activation, conv_out."""

    def __init__(self, cfg: DCAEConfig, *, dtype=jnp.float32):
        ch, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        interpolate = cfg.upsample_block_type == "interpolate"
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, dtype=dtype)
        self.in_repeats = ch[-1] // cfg.latent_channels if cfg.decoder_in_shortcut else 0
        levels = []
        for i, (c, n) in enumerate(zip(ch, layers)):
            field = f"decoder level {i}"
            blocks = []
            if i < len(ch) - 1 and n > 0:
                blocks.append(UpBlock(ch[i + 1], c, interpolate=interpolate, shortcut=True,
                                      field=field, dtype=dtype))
            blocks += [_make_block(cfg.decoder_block_types[i], c, cfg,
                                   cfg.decoder_qkv_multiscales[i], cfg.decoder_norm_types[i],
                                   cfg.decoder_act_fns[i], field, dtype) for _ in range(n)]
            levels.append(nnx.List(blocks))
        self.up_blocks = nnx.List(levels)  # index = level; run from the deepest
        c0 = ch[0] if layers[0] > 0 else ch[1]
        self.norm_out = RMSNorm(c0, dtype=dtype)
        self.conv_act = activation(cfg.decoder_conv_act_fn, "decoder_conv_act_fn")
        if layers[0] > 0:
            self.conv_out = Conv2d(c0, cfg.in_channels, 3, dtype=dtype)
        else:
            self.conv_out = UpBlock(c0, cfg.in_channels, interpolate=interpolate, shortcut=False,
                                    field="decoder conv_out", dtype=dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        if self.in_repeats:
            x = x + jnp.repeat(z, self.in_repeats, axis=-1).astype(x.dtype)
        for level in reversed(self.up_blocks):
            for block in level:
                x = block(x)
        return self.conv_out(self.conv_act(self.norm_out(x)))


def torch_to_layout(value: np.ndarray) -> np.ndarray:
    """A torch tensor of this model in our layout: every 4-D tensor is a conv weight (OIHW ->
    HWIO, grouped/depthwise included), every 2-D one a Linear weight ((out, in) -> (in, out))."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


class AutoencoderDC(nnx.Module):
    """diffusers ``AutoencoderDC`` (no tiling or slicing): see the module docstring.

    ``dtype`` is the compute dtype (float32 default, bfloat16 option); weights stay float32,
    norms and the linear attention run in float32, outputs are float32.
    """

    def __init__(self, config, *, dtype=jnp.float32):
        cfg = config if isinstance(config, DCAEConfig) else DCAEConfig.from_hub(dict(config))
        self.config, self.dtype = cfg, dtype
        self.encoder = Encoder(cfg, dtype=dtype)
        self.decoder = Decoder(cfg, dtype=dtype)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent position along H and W (2 ** downsampling stages; 32 for f32c32)."""
        return 2 ** self.encoder.num_downsamples

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        """The config's ``scaling_factor``: diffusion latents are ``encode(x) * scaling_factor``."""
        return float(self.config.scaling_factor)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, dtype=jnp.float32) -> "AutoencoderDC":
        """Build from a diffusers Hub folder (``config.json`` +
        ``diffusion_pytorch_model.safetensors``); FileNotFoundError / ValueError naming the
        problem."""
        config = DCAEConfig.from_hub(hub.read_config(folder))
        model = nnx.eval_shape(lambda: cls(config, dtype=dtype))  # no placeholder allocation
        model.load_torch_state(hub.read_weights(folder), what=f"AutoencoderDC {Path(folder)}")
        return model

    def load_torch_state(self, state: dict, what: str = "AutoencoderDC") -> None:
        """Load a diffusers ``AutoencoderDC`` state dict (replacing every weight, so ``self`` may
        be abstract, from ``nnx.eval_shape``). Every weight's module path is its torch key;
        ValueError listing missing and unused keys, or a shape that does not fit."""
        targets = {".".join(map(str, path)): var
                   for path, var in nnx.to_flat_state(nnx.state(self, AEWeight))}
        state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
        missing = sorted(set(targets) - set(state))
        unused = sorted(set(state) - set(targets))
        if missing or unused:
            def show(keys):
                more = f" ... ({len(keys)} in all)" if len(keys) > 12 else ""
                return ", ".join(keys[:12]) + more
            parts = ([f"missing weights: {show(missing)}"] if missing else []) + \
                    ([f"unused weights: {show(unused)}"] if unused else [])
            raise ValueError(f"{what}: checkpoint does not fit the config; " + "; ".join(parts))
        for key, var in targets.items():
            value = torch_to_layout(np.asarray(state[key], np.float32))
            if tuple(value.shape) != tuple(var.get_value().shape):
                raise ValueError(f"{what}: weight {key!r} has shape {tuple(state[key].shape)} "
                                 f"(torch layout), the config expects "
                                 f"{tuple(var.get_value().shape)} in ours (config and "
                                 "checkpoint disagree)")
            var.set_value(jnp.asarray(value))

    # -- forward ---------------------------------------------------------------------------
    def encode(self, x: jax.Array) -> jax.Array:
        """images (B, H, W, in_channels) in [-1, 1], H and W multiples of ``spatial_factor``
        -> raw latent (B, H/f, W/f, latent_channels) float32 (= diffusers ``encode(x).latent``)."""
        c, f = self.config.in_channels, self.spatial_factor
        if x.ndim != 4 or x.shape[-1] != c:
            raise ValueError(f"expected images (B, H, W, {c}) NHWC, got shape {x.shape}")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not a multiple of the "
                             f"spatial factor {f}")
        return self.encoder(x.astype(self.dtype)).astype(jnp.float32)

    def decode(self, z: jax.Array) -> jax.Array:
        """raw latent (B, h, w, latent_channels) -> images (B, h*f, w*f, in_channels) float32
        (= diffusers ``decode(z).sample``; no scaling factor applied)."""
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[-1] != c:
            raise ValueError(f"expected latents (B, h, w, {c}) NHWC, got shape {z.shape}")
        return self.decoder(z.astype(self.dtype)).astype(jnp.float32)


_jit_encode = nnx.jit(lambda model, x: model.encode(x))
_jit_decode = nnx.jit(lambda model, z: model.decode(z))


def parity_check(folder) -> dict:
    """Run the autoencoder of ``folder`` (an AutoencoderDC Hub folder with ``io.npz``: ``x``,
    ``latent``, ``z``, ``decoded``, all NCHW) in float32 under ``nnx.jit`` and compare. Returns
    ``{"latent": {...}, "decoded": {...}}``, each with ``max_abs_err``, ``max_rel_err``
    (max|diff| / max|ref|), ``tolerance`` and ``passed``."""
    folder = Path(folder)
    io_path = folder / "io.npz"
    if not io_path.is_file():
        raise FileNotFoundError(f"{folder} has no io.npz (reference inputs/outputs)")
    io = np.load(io_path)
    for key in ("x", "latent", "z", "decoded"):
        if key not in io:
            raise ValueError(f"{io_path} lacks {key!r} (has {sorted(io.files)})")
    model = AutoencoderDC.from_pretrained(folder)
    nhwc = lambda a: jnp.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731
    ours = {"latent": _jit_encode(model, nhwc(io["x"])),
            "decoded": _jit_decode(model, nhwc(io["z"]))}
    report = {}
    for name, out in ours.items():
        out, ref = np.asarray(out).transpose(0, 3, 1, 2), io[name]
        if out.shape != ref.shape:
            raise ValueError(f"{name} shape {out.shape} differs from the reference {ref.shape}")
        err = float(np.abs(out - ref).max())
        rel = err / float(np.abs(ref).max())
        report[name] = {"max_abs_err": err, "max_rel_err": rel, "tolerance": PARITY_TOLERANCE,
                        "passed": bool(rel <= PARITY_TOLERANCE)}
    return report
