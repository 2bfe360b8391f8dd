"""The trunk shared by the class- and text-conditional TiM networks (Flax NNX).

Function (identical to the official forward; NHWC here, NCHW there)::

    tokens = x_embedder(x_t)                                  (B, N, D), N = (H/p)(W/p)
    E_t    = t_embedder(t);  E_Δ = interval embedding of (t, r) per ``new_condition``
    c      = E_t + E_Δ (+ label embedding for c2i)            (B, 1, D), float32
    for each block: adaLN-Zero(SwiGLU(c)) around its sub-blocks
    h_proj = projector(tokens after block ``encoder_depth``)  (B, N, z_dim)  (return_proj only)
    F      = unpatchify(final_layer(tokens, c))               (B, H, W, C) float32

The residual stream is kept in float32; the block inputs are cast to the compute dtype.
Subclasses (``c2i.TiMC2I``, ``t2i.TiMT2I``) choose the block type and the condition embedder.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tim_jax.models import layers as L
from tim_jax.models.attention import get_attention_impl
from tim_jax.models.rope import rope_tables

Array = jax.Array

NEW_CONDITIONS = ("t-r", "r", "t,r", "t,t-r", "r,t-r", "t,r,t-r")

# Per-block rematerialisation policies (config.model.remat).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,                     # no remat (fastest when memory allows)
    "full": "full",                   # save only the block inputs, recompute everything
    "dots": jax.checkpoint_policies.dots_saveable,                          # save all matmuls
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls
}


def require(cond: bool, msg: str) -> None:
    """Raises ValueError(msg) unless cond (config validation)."""
    if not cond:
        raise ValueError(msg)


def _remat(fn: Callable, remat: str, *, prevent_cse: bool) -> Callable:
    policy = REMAT_POLICIES[remat]
    if policy is None:
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=prevent_cse)
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)


def build_blocks(factory: Callable[[L.KeyGen], nnx.Module], depth: int, *, scan: bool,
                 rngs: L.KeyGen):
    """``depth`` blocks from ``factory(keys)``: an ``nnx.List`` (paths ('blocks', i, ...)) or,
    with ``scan``, ONE block module whose params are stacked on a leading depth axis with
    logical axis name 'layers' (paths ('blocks', ...), shapes (depth, ...))."""
    if not scan:
        return nnx.List([factory(rngs) for _ in range(depth)])

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(key):
        return factory(L.KeyGen(key))

    return make(rngs.split(depth))


def run_blocks(blocks, x: Array, ctx: tuple, *, start: int, stop: int, scan: bool,
               remat: str) -> Array:
    """Applies blocks [start, stop) as ``x = block(x, *ctx)`` (list layout: a Python loop;
    scanned layout: ``jax.lax.scan`` over the stacked params), rematerialised per block."""
    if stop <= start:
        return x
    if scan:
        graphdef, state = nnx.split(blocks)
        state = jax.tree.map(lambda a: a[start:stop], state)

        def step(s, h, ctx):
            return nnx.merge(graphdef, s)(h, *ctx)

        step = _remat(step, remat, prevent_cse=False)
        x, _ = jax.lax.scan(lambda h, s: (step(s, h, ctx), None), x, state)
        return x
    for i in range(start, stop):
        block = blocks[i]
        if REMAT_POLICIES[remat] is None:
            x = block(x, *ctx)
        else:
            graphdef, state = nnx.split(block)
            step = _remat(lambda s, h, ctx, g=graphdef: nnx.merge(g, s)(h, *ctx), remat,
                          prevent_cse=True)
            x = step(state, x, ctx)
    return x


class AdaLNBlock(nnx.Module):
    """Base of the TiM blocks: ``_sub`` is one adaLN-Zero residual sub-block,
    ``x + gate * fn(modulate(LN(x), shift, scale))`` with LN affine-free (eps 1e-6)."""

    dtype: Any

    def _sub(self, x, shift, scale, gate, fn):
        h = L.modulate(L.layer_norm(x, 1e-6), shift, scale).astype(self.dtype)
        return x + gate * fn(h).astype(jnp.float32)


def mlp_hidden_features(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU MLP width, official ``(int(hidden_size * mlp_ratio) * 2) // 3``."""
    return (int(hidden_size * mlp_ratio) * 2) // 3


class TiMBackbone(nnx.Module):
    """Trunk shared by the c2i and t2i TiM: patch embedding, time/interval embedders, blocks,
    REPA projector, final layer. Subclasses choose the block type and the condition
    embedder."""

    def __init__(
        self, *, block_factory: Callable[..., nnx.Module],
        y_embedder_factory: Callable[[int, L.KeyGen], nnx.Module],
        rngs: nnx.Rngs | L.KeyGen | int, input_size: int = 32, patch_size: int = 2,
        in_channels: int = 4, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
        mlp_ratio: float = 4.0, encoder_depth: int = 8, projector_dim: int = 2048,
        z_dim: int = 768, new_condition: str = "t-r", use_new_embed: bool = True,
        qk_norm: bool = True, distance_aware: bool = True, lora_hidden_size: int | None = 384,
        dtype: str = "float32", scan_blocks: bool = False, remat: str = "none",
        attention_impl: str = "xla", matmul_precision: str | None = None,
    ):
        """The official constructor arguments (names and defaults of the c2i TiM);
        ``block_factory(hidden_size, num_heads, rngs=keys, **block_kw)`` builds one block and
        ``y_embedder_factory(hidden_size, keys)`` the condition embedder."""
        require(new_condition in NEW_CONDITIONS,
               f"new_condition={new_condition!r}; allowed: {list(NEW_CONDITIONS)}")
        require(remat in REMAT_POLICIES, f"remat={remat!r}; allowed: {list(REMAT_POLICIES)}")
        get_attention_impl(attention_impl)  # ValueError listing the registered impls
        for name, v in (("input_size", input_size), ("patch_size", patch_size),
                        ("in_channels", in_channels), ("hidden_size", hidden_size),
                        ("depth", depth), ("num_heads", num_heads),
                        ("projector_dim", projector_dim), ("z_dim", z_dim)):
            require(isinstance(v, int) and v >= 1, f"{name}={v!r} must be a positive int")
        require(hidden_size % num_heads == 0,
               f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        require((hidden_size // num_heads) % 4 == 0,
               f"head dim hidden_size/num_heads={hidden_size // num_heads} must be divisible by 4 "
               "(2D RoPE with interleaved pairs per axis)")
        require(isinstance(encoder_depth, int) and 1 <= encoder_depth <= depth,
               f"encoder_depth={encoder_depth!r} must be in [1, depth={depth}]")
        require(mlp_ratio > 0, f"mlp_ratio={mlp_ratio!r} must be > 0")
        if lora_hidden_size is None:
            lora_hidden_size = (hidden_size // 4) * 3  # official default
        require(isinstance(lora_hidden_size, int) and lora_hidden_size >= 1,
               f"lora_hidden_size={lora_hidden_size!r} must be a positive int or None")

        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.encoder_depth = encoder_depth
        self.new_condition = new_condition
        self.use_new_embed = use_new_embed
        self.dtype = L.resolve_dtype(dtype)
        self.scan_blocks = bool(scan_blocks)
        self.remat = remat
        precision = L.resolve_precision(matmul_precision)
        rngs = L.as_keygen(rngs)
        kw = dict(dtype=dtype, precision=precision, rngs=rngs)

        self.x_embedder = L.PatchEmbed(patch_size, in_channels, hidden_size, **kw)
        self.t_embedder = L.TimestepEmbedder(hidden_size, kernel_init=L.normal(0.02),
                                             precision=precision, rngs=rngs)
        self.delta_embedder = (
            L.TimestepEmbedder(hidden_size, precision=precision, rngs=rngs)
            if use_new_embed else None)
        block_kw = dict(mlp_ratio=mlp_ratio, qk_norm=qk_norm, distance_aware=distance_aware,
                        lora_hidden_size=lora_hidden_size, attention_impl=attention_impl,
                        dtype=dtype, precision=precision)
        self.blocks = build_blocks(
            lambda r: block_factory(hidden_size, num_heads, rngs=r, **block_kw),
            depth, scan=self.scan_blocks, rngs=rngs)
        self.projector = L.projector(hidden_size, projector_dim, z_dim, **kw)
        self.final_layer = L.FinalLayer(hidden_size, patch_size, self.out_channels, **kw)
        self.y_embedder = y_embedder_factory(hidden_size, rngs)

    # -- pieces used by the subclasses' __call__ ------------------------------------------

    def _times(self, t, r, batch: int) -> tuple[Array, Array]:
        t = jnp.asarray(t, jnp.float32)
        r = jnp.asarray(r, jnp.float32)
        for name, v in (("t", t), ("r", r)):
            if v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, batch)):
                raise ValueError(f"{name} must have shape (B,)=({batch},) or be a scalar; "
                                 f"got {tuple(v.shape)}")
        return jnp.broadcast_to(t, (batch,)), jnp.broadcast_to(r, (batch,))

    def time_embeddings(self, t: Array, r: Array) -> tuple[Array, Array]:
        """(E_t, E_Δ), each (B, D) float32. E_Δ follows ``new_condition`` (official
        ``get_delta_embed``); its embedder is ``delta_embedder`` if use_new_embed else
        ``t_embedder``."""
        emb_t = self.t_embedder(t)
        d = self.delta_embedder if self.delta_embedder is not None else self.t_embedder
        nc = self.new_condition
        if nc == "t-r":
            delta = d(t - r)
        elif nc == "r":
            delta = d(r)
        elif nc == "t,r":
            delta = emb_t + d(r)
        elif nc == "t,t-r":
            delta = emb_t + d(t - r)
        elif nc == "r,t-r":
            delta = self.t_embedder(r) + d(t - r)
        elif nc == "t,r,t-r":
            delta = emb_t + self.t_embedder(r) + d(t - r)
        else:  # unreachable: validated in __init__
            raise ValueError(f"new_condition={nc!r}; allowed: {list(NEW_CONDITIONS)}")
        return emb_t, delta

    def _forward(self, x: Array, t, r, *, cond_fn, return_proj: bool):
        """Shared forward. ``cond_fn(E_t, E_Δ) -> (c (B,1,D) float32, extra ctx tuple)``; the
        block is called as ``block(x, *extra, c, E_Δ, rope)``."""
        L.check_image(x, self.patch_size, self.in_channels)
        b, h_img, w_img, _ = x.shape
        h, w = h_img // self.patch_size, w_img // self.patch_size
        t, r = self._times(t, r, b)

        tokens = self.x_embedder(x).astype(jnp.float32)               # (B, N, D)
        emb_t, delta = self.time_embeddings(t, r)
        delta = delta[:, None, :]                                     # (B, 1, D)
        c, extra = cond_fn(emb_t[:, None, :], delta)
        rope = rope_tables(h, w, self.head_dim)
        ctx = (*extra, c, delta, rope)

        run = dict(scan=self.scan_blocks, remat=self.remat)
        tokens = run_blocks(self.blocks, tokens, ctx, start=0, stop=self.encoder_depth, **run)
        h_proj = self.projector(tokens).astype(jnp.float32) if return_proj else None
        tokens = run_blocks(self.blocks, tokens, ctx, start=self.encoder_depth, stop=self.depth,
                            **run)
        out = self.final_layer(tokens, c)                            # (B, N, p*p*C) float32
        out = L.unpatchify(out, h, w, self.patch_size, self.out_channels)
        return (out, h_proj) if return_proj else out
