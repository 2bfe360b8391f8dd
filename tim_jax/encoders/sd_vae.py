"""diffusers ``AutoencoderKL`` (the SD-VAE, e.g. ``stabilityai/sd-vae-ft-ema``) in Flax NNX.

Inference only, frozen weights (:class:`VAEWeight`, deliberately not ``nnx.Param``). Images and
latents are NHWC. Built from the Hub ``config.json``; the architecture (diffusers' inference
path, ``temb`` absent, dropout off)::

    encoder: conv_in -> [ResnetBlock x layers_per_block (+ Downsample)] per level
             -> mid (Resnet, Attention, Resnet) -> GroupNorm -> act -> conv_out (2*latent ch)
    encode_moments: quant_conv -> split channels into (mean, logvar), logvar clamped to [-30, 20]
    decode: post_quant_conv -> conv_in -> mid -> [ResnetBlock x (layers_per_block+1)
            (+ Upsample)] per level (reversed widths) -> GroupNorm -> act -> conv_out

ResnetBlock: ``y = shortcut(x) + conv2(act(GN2(conv1(act(GN1(x))))))``, shortcut a 1x1 conv
when the width changes. Downsample: zero-pad bottom/right by 1, 3x3 conv stride 2. Upsample:
nearest x2 then 3x3 conv. Attention (mid block): GroupNorm, one head per ``block_out_channels[-1]``
channels (i.e. one head), softmax(q k^T / sqrt(d)) v, output Linear, plus the residual.
GroupNorms use eps 1e-6 and run, with the softmax, in float32; convolutions and matmuls run in
the compute dtype (float32 default, bfloat16 option) at ``precision`` (HIGHEST for float32).

Weights: ``from_pretrained(folder)`` reads ``config.json`` + ``diffusion_pytorch_model.safetensors``
(torch layouts: conv OIHW -> HWIO, Linear (out, in) -> (in, out)). The attention keys may use the
current names (``to_q/to_k/to_v/to_out.0``) or the old ones (``query/key/value/proj_attn``, as in
``sd-vae-ft-ema``), and old uploads storing them as 1x1 convs (out, in, 1, 1) are accepted.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tim_jax.encoders import hub

#: relative-to-scale tolerance of :func:`parity_check` (fp32): max|diff| <= tol * max|ref|
PARITY_TOLERANCE = 1e-5
DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
               "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x))}
GN_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)   # diffusers' DiagonalGaussianDistribution clamp
# old diffusers attention names -> current ones (diffusers' _fix_state_dict_keys_on_load)
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class VAEWeight(nnx.Variable):
    """A pretrained, frozen autoencoder weight (not an ``nnx.Param``: optimizers skip it)."""


@dataclasses.dataclass(frozen=True)
class SDVAEConfig:
    """The ``config.json`` fields of a diffusers ``AutoencoderKL`` that the network uses."""
    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int
    latent_channels: int
    in_channels: int = 3
    out_channels: int = 3
    act_fn: str = "silu"
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None

    @classmethod
    def from_hub(cls, config: dict) -> "SDVAEConfig":
        """Validate a diffusers config dict; ValueError naming the unsupported value."""
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"expected an AutoencoderKL config, got _class_name {name!r}")
        required = ("block_out_channels", "layers_per_block", "norm_num_groups", "latent_channels")
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"AutoencoderKL config.json lacks {missing}")
        widths = tuple(int(c) for c in config["block_out_channels"])
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES),
                             ("up_block_types", UP_BLOCK_TYPES)):
            types = list(config.get(key, [allowed[0]] * len(widths)))
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"unsupported {key} {bad}: this AutoencoderKL port supports "
                                 f"only {list(allowed)}")
            if len(types) != len(widths):
                raise ValueError(f"{key} has {len(types)} entries, block_out_channels "
                                 f"{len(widths)}")
        act = config.get("act_fn", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported act_fn {act!r} (supported: {sorted(ACTIVATIONS)})")
        groups = int(config["norm_num_groups"])
        bad_widths = [c for c in widths if c % groups]
        if bad_widths:
            raise ValueError(f"block_out_channels {bad_widths} are not multiples of "
                             f"norm_num_groups {groups}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        values["block_out_channels"] = widths
        return cls(**values)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each axis: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


# -- layers ------------------------------------------------------------------------------------
def _set(var: VAEWeight, value, name: str) -> None:
    """Write ``value`` (already in our layout) into ``var``; None (a missing key, recorded by
    the loader) is skipped."""
    if value is None:
        return
    if tuple(var[...].shape) != tuple(value.shape):
        raise ValueError(f"weight {name!r} has shape {tuple(value.shape)} after layout "
                         f"conversion, the model expects {tuple(var[...].shape)} "
                         "(config and checkpoint disagree)")
    var[...] = jnp.asarray(value, jnp.float32)


class Conv2d(nnx.Module):
    """NHWC convolution, kernel (kh, kw, in, out) HWIO; torch weight (out, in, kh, kw)."""

    def __init__(self, c_in, c_out, k, *, stride=1, padding=((1, 1), (1, 1)), dtype, precision):
        self.kernel = VAEWeight(jnp.zeros((k, k, c_in, c_out), jnp.float32))
        self.bias = VAEWeight(jnp.zeros((c_out,), jnp.float32))
        self.stride, self.padding = stride, padding
        self.dtype, self.precision = dtype, precision

    def load(self, take, prefix):
        _set(self.kernel, take(f"{prefix}.weight", lambda w: w.transpose(2, 3, 1, 0)),
             f"{prefix}.weight")
        _set(self.bias, take(f"{prefix}.bias"), f"{prefix}.bias")

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        return y + self.bias[...].astype(self.dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel (in, out); torch weight (out, in) or (out, in, 1, 1)."""

    def __init__(self, c_in, c_out, *, dtype, precision):
        self.kernel = VAEWeight(jnp.zeros((c_in, c_out), jnp.float32))
        self.bias = VAEWeight(jnp.zeros((c_out,), jnp.float32))
        self.dtype, self.precision = dtype, precision

    def load(self, take, prefix):
        _set(self.kernel, take(f"{prefix}.weight", _linear_kernel), f"{prefix}.weight")
        _set(self.bias, take(f"{prefix}.bias"), f"{prefix}.bias")

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                    precision=self.precision)
        return y + self.bias[...].astype(self.dtype)


def _linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> (in, out); very old uploads store it as a 1x1 conv
    weight (out, in, 1, 1)."""
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    return w.T


class GroupNorm(nnx.Module):
    """torch GroupNorm over (H, W, C/G) per group of an NHWC array, in float32."""

    def __init__(self, groups, channels, *, dtype):
        self.scale = VAEWeight(jnp.ones((channels,), jnp.float32))
        self.bias = VAEWeight(jnp.zeros((channels,), jnp.float32))
        self.groups, self.dtype = groups, dtype

    def load(self, take, prefix):
        _set(self.scale, take(f"{prefix}.weight"), f"{prefix}.weight")
        _set(self.bias, take(f"{prefix}.bias"), f"{prefix}.bias")

    def __call__(self, x):
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(b, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


LEAVES = (Conv2d, Linear, GroupNorm)


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: (B,H,W,c_in) -> (B,H,W,c_out)."""

    def __init__(self, c_in, c_out, cfg: SDVAEConfig, **kw):
        g = cfg.norm_num_groups
        self.norm1 = GroupNorm(g, c_in, dtype=kw["dtype"])
        self.conv1 = Conv2d(c_in, c_out, 3, **kw)
        self.norm2 = GroupNorm(g, c_out, dtype=kw["dtype"])
        self.conv2 = Conv2d(c_out, c_out, 3, **kw)
        self.conv_shortcut = (Conv2d(c_in, c_out, 1, padding=((0, 0), (0, 0)), **kw)
                              if c_in != c_out else None)
        self.act_fn = cfg.act_fn

    def __call__(self, x):
        act = ACTIVATIONS[self.act_fn]
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip.astype(h.dtype) + h


class Attention(nnx.Module):
    """Mid-block self-attention over the H*W positions, one head of width C, residual added."""

    def __init__(self, c, cfg: SDVAEConfig, **kw):
        self.group_norm = GroupNorm(cfg.norm_num_groups, c, dtype=kw["dtype"])
        self.to_q, self.to_k, self.to_v = (Linear(c, c, **kw) for _ in range(3))
        self.to_out = nnx.List([Linear(c, c, **kw)])   # torch key ``to_out.0``
        self.dtype, self.precision = kw["dtype"], kw["precision"]

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision,
                            preferred_element_type=jnp.float32) / np.sqrt(c).astype(np.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bqk,bkc->bqc", probs, v.astype(self.dtype), precision=self.precision)
        return self.to_out[0](o).reshape(b, h, w, c) + x.astype(self.dtype)


class MidBlock(nnx.Module):
    """Resnet, (Attention), Resnet at the lowest resolution, width ``c``."""

    def __init__(self, c, cfg: SDVAEConfig, **kw):
        self.resnets = nnx.List([ResnetBlock(c, c, cfg, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(c, cfg, **kw)] if cfg.mid_block_add_attention
                                   else [])

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Resample(nnx.Module):
    """``down``: pad (0,1) bottom/right + 3x3 conv stride 2; ``up``: nearest x2 + 3x3 conv."""

    def __init__(self, c, down: bool, **kw):
        pad = ((0, 1), (0, 1)) if down else ((1, 1), (1, 1))
        self.conv = Conv2d(c, c, 3, stride=2 if down else 1, padding=pad, **kw)
        self.down = down

    def __call__(self, x):
        if not self.down:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Level(nnx.Module):
    """One encoder/decoder level: resnets then an optional down/up sampler."""

    def __init__(self, c_in, c_out, n, resample, cfg, **kw):
        self.resnets = nnx.List([ResnetBlock(c_in if i == 0 else c_out, c_out, cfg, **kw)
                                 for i in range(n)])
        samplers = [] if resample is None else [Resample(c_out, resample == "down", **kw)]
        self.downsamplers = nnx.List(samplers) if resample == "down" else None
        self.upsamplers = nnx.List(samplers) if resample == "up" else None

    def __call__(self, x):
        for block in self.resnets:
            x = block(x)
        for sampler in (self.downsamplers or self.upsamplers or ()):
            x = sampler(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: SDVAEConfig, **kw):
        widths, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, widths[0], 3, **kw)
        self.down_blocks = nnx.List([
            Level(widths[max(i - 1, 0)], c, cfg.layers_per_block,
                  "down" if i < len(widths) - 1 else None, cfg, **kw)
            for i, c in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], cfg, **kw)
        self.conv_norm_out = GroupNorm(g, widths[-1], dtype=kw["dtype"])
        self.conv_out = Conv2d(widths[-1], 2 * cfg.latent_channels, 3, **kw)
        self.act_fn = cfg.act_fn

    def __call__(self, x):
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(ACTIVATIONS[self.act_fn](self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: SDVAEConfig, **kw):
        widths = tuple(reversed(cfg.block_out_channels))
        self.conv_in = Conv2d(cfg.latent_channels, widths[0], 3, **kw)
        self.mid_block = MidBlock(widths[0], cfg, **kw)
        self.up_blocks = nnx.List([
            Level(widths[max(i - 1, 0)], c, cfg.layers_per_block + 1,
                  "up" if i < len(widths) - 1 else None, cfg, **kw)
            for i, c in enumerate(widths)])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, widths[-1], dtype=kw["dtype"])
        self.conv_out = Conv2d(widths[-1], cfg.out_channels, 3, **kw)
        self.act_fn = cfg.act_fn

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(ACTIVATIONS[self.act_fn](self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL``; images (B, H, W, in_channels), latents (B, H/f, W/f, C)."""

    def __init__(self, config: SDVAEConfig, *, dtype=jnp.float32, precision=None):
        if precision is None:
            precision = (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
                         else jax.lax.Precision.DEFAULT)
        kw = dict(dtype=dtype, precision=precision)
        self.config = config
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        c2, c = 2 * config.latent_channels, config.latent_channels
        no_pad = ((0, 0), (0, 0))
        self.quant_conv = (Conv2d(c2, c2, 1, padding=no_pad, **kw)
                           if config.use_quant_conv else None)
        self.post_quant_conv = (Conv2d(c, c, 1, padding=no_pad, **kw)
                                if config.use_post_quant_conv else None)

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def encode_moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, H, W, in_channels) in [-1, 1] -> posterior (mean, logvar), each
        (B, H/f, W/f, latent_channels) float32, logvar clamped to [-30, 20]."""
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"expected images (B, H, W, {cfg.in_channels}) NHWC, got {x.shape}")
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, h, w, latent_channels), unscaled -> images (B, h*f, w*f, out_channels) float32
        (not clipped)."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"expected latents (B, h, w, {self.config.latent_channels}) NHWC, "
                             f"got {z.shape}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder, dtype=jnp.float32, precision=None) -> "AutoencoderKL":
        """Build from a diffusers Hub folder (``config.json`` + safetensors)."""
        config = SDVAEConfig.from_hub(hub.read_config(folder))
        model = cls(config, dtype=dtype, precision=precision)
        model.load_torch_state(hub.read_weights(folder), what=f"AutoencoderKL {Path(folder)}")
        return model

    def load_torch_state(self, state: dict, what: str = "AutoencoderKL") -> None:
        """Load a torch ``state_dict`` (numpy arrays); ValueError listing missing/unused keys."""
        state = normalise_attention_keys(state)
        used, missing = set(), []

        def take(key, convert=None):
            if key not in state:
                missing.append(key)
                return None
            used.add(key)
            value = np.asarray(state[key], np.float32)
            return value if convert is None else convert(value)

        for path, node in nnx.iter_graph(self):
            if isinstance(node, LEAVES):
                node.load(take, ".".join(str(p) for p in path))
        unused = sorted(set(state) - used)
        if missing or unused:
            raise ValueError(f"{what}: checkpoint does not match the config: "
                             f"missing keys {sorted(missing)[:20]}"
                             f"{' ...' if len(missing) > 20 else ''} ({len(missing)}); "
                             f"unused keys {unused[:20]}{' ...' if len(unused) > 20 else ''} "
                             f"({len(unused)})")


def normalise_attention_keys(state: dict) -> dict:
    """Rename old attention keys (``*.attentions.N.query.weight`` ...) to the current names."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if (len(parts) >= 5 and parts[-4] == "attentions" and parts[-2] in OLD_ATTENTION_NAMES):
            key = ".".join(parts[:-2] + [OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
        if key in out:
            raise ValueError(f"checkpoint holds both old and new names for {key!r}")
        out[key] = value
    return out


def parity_check(folder) -> dict:
    """Compare with ``folder/io.npz`` (x NCHW; posterior_mean, posterior_logvar, z, decoded).
    Returns ``{output: {"max_abs_err", "max_rel_err", "tolerance", "passed"}}`` for
    ``posterior_mean``, ``posterior_logvar`` and ``decoded``; rel = max|diff| / max|ref|."""
    folder = Path(folder)
    io_path = folder / "io.npz"
    if not io_path.is_file():
        raise FileNotFoundError(f"{folder} has no io.npz (reference inputs/outputs)")
    io = np.load(io_path)
    need = ("x", "posterior_mean", "posterior_logvar", "z", "decoded")
    absent = [k for k in need if k not in io]
    if absent:
        raise ValueError(f"{io_path} lacks {absent} (has {sorted(io.files)})")
    model = AutoencoderKL.from_pretrained(folder)
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
    mean, logvar = model.encode_moments(jnp.asarray(io["x"]).transpose(0, 2, 3, 1))
    decoded = model.decode(jnp.asarray(io["z"]).transpose(0, 2, 3, 1))
    ours = {"posterior_mean": nchw(mean), "posterior_logvar": nchw(logvar),
            "decoded": nchw(decoded)}
    report = {}
    for name, value in ours.items():
        ref = io[name]
        if value.shape != ref.shape:
            raise ValueError(f"{name}: shape {value.shape} differs from the reference {ref.shape}")
        err = float(np.abs(value - ref).max())
        rel = err / float(np.abs(ref).max())
        report[name] = {"max_abs_err": err, "max_rel_err": rel, "tolerance": PARITY_TOLERANCE,
                        "passed": bool(rel <= PARITY_TOLERANCE)}
    return report
