"""Live comparison with the official PyTorch TiM: the same weights and random inputs through
both networks, compared stage by stage (``python -m tim_jax.parity --live``).

Needs torch (the ``tim-jax[torch]`` extra) and a checkout of the official repository
(``official_repo``, put on ``sys.path``). ``flash_attn`` (CUDA-only) is stubbed, timm is imported
through the torchvision op-schema shim, or replaced by stand-ins where it is not installed
(:mod:`tim_jax.interop.torch_shims`); the notes say which were needed.
"""
from __future__ import annotations

import pathlib
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tim_jax.interop.parity_network import load_fixture_model
from tim_jax.interop.torch_shims import prepare_official_imports
from tim_jax.interop.parity_report import (
    TOLERANCES,
    CheckResult,
    ParityInputError,
    compare,
    load_json,
    nchw_to_nhwc,
)

__all__ = ["live_compare", "LIVE_BF16_TOL"]

#: tolerance of the bf16 live comparison (tim_jax bf16 vs official bf16 autocast), relative
LIVE_BF16_TOL = 5e-2


def _official_model(official_cfg: dict, kind: str, state_dict: dict, official_repo: str | None):
    try:
        import torch
    except ImportError as e:
        raise ParityInputError(
            "--live needs torch: pip install 'tim-jax[torch]' (torch==2.13.0)") from e
    if official_repo:
        repo = str(pathlib.Path(official_repo).absolute())
        if not (pathlib.Path(repo) / "tim").is_dir():
            raise ParityInputError(f"--official-repo {official_repo}: no 'tim' package inside")
        if repo not in sys.path:
            sys.path.insert(0, repo)
    shims = prepare_official_imports(timm_standins=True)
    import importlib

    try:
        module = importlib.import_module(f"tim.models.{kind}.tim_model")
    except ImportError as e:
        raise ParityInputError(
            f"cannot import the official tim.models.{kind}.tim_model ({e}); pass --official-repo PATH "
            "of a WZDTHU/TiM checkout") from e
    net = module.TiM(**official_cfg)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state_dict.items()}
    net.load_state_dict(tensors, strict=True)
    return net.eval().float(), [name for name, used in shims.items() if used]


def _tim_jax_intermediates(model, x, t, r, cond, kind: str) -> dict:
    """Same computation as the model's forward, returning every stage (list block layout)."""
    from tim_jax.models.rope import rope_tables

    b, h_img, w_img, _ = x.shape
    p = model.patch_size
    h, w = h_img // p, w_img // p
    out = {}
    tokens = model.x_embedder(x).astype(jnp.float32)
    out["x_embedder"] = tokens
    emb_t, delta = model.time_embeddings(t, r)
    emb_t, delta = emb_t[:, None, :], delta[:, None, :]
    if kind == "c2i":
        c, extra = emb_t + delta + model.y_embedder(cond)[:, None, :], ()
    else:
        c, extra = emb_t + delta, (model.y_embedder(cond),)
        out["y_embedder"] = extra[0]
    rope = rope_tables(h, w, model.head_dim)
    for i in range(model.depth):
        tokens = model.blocks[i](tokens, *extra, c, delta, rope)
        out[f"block{i}"] = tokens
        if i + 1 == model.encoder_depth:
            out["projector"] = model.projector(tokens).astype(jnp.float32)
    out["final_layer"] = model.final_layer(tokens, c)
    return out


def live_compare(
    directory: str | pathlib.Path, *, official_repo: str | None = None, batch: int = 2, seed: int = 0,
    precisions: Sequence[str] = ("fp32", "bf16"), **config_overrides,
) -> list[CheckResult]:
    """Official torch network vs tim_jax on random inputs, stage by stage, fp32 and/or bf16.

    ``directory`` holds ``config.json`` + ``model.safetensors`` (any official checkpoint of that
    architecture, converted to safetensors). The official network runs on CPU with
    ``attn_type='fused_attn'``; forward hooks capture x_embedder, y_embedder (t2i), every block,
    the projector and the final layer (tokens before unpatchify), compared with the tim_jax
    stages of the same weights. fp32 rows must be within 1e-5 of the scale; bf16 rows (tim_jax
    ``dtype='bfloat16'`` vs torch CPU bf16 autocast) within ``LIVE_BF16_TOL``, their note gives
    the official bf16-vs-fp32 error as the inherent bf16 noise level.
    """
    from flax import nnx

    from tim_jax.interop.official_io import load_official_state_dict

    directory = pathlib.Path(directory)
    official_cfg = load_json(directory / "config.json")
    cfg, _, params = load_fixture_model(directory, **{**config_overrides, "scan_blocks": False})
    kind = cfg.kind
    sd = load_official_state_dict(directory / "model.safetensors")
    net, shims_used = _official_model(official_cfg, kind, sd, official_repo)
    import torch

    rng = np.random.default_rng(seed)
    size, ch = int(cfg.input_size), int(cfg.in_channels)
    x = rng.standard_normal((batch, ch, size, size)).astype(np.float32)
    t = rng.uniform(0.05, 1.0, batch).astype(np.float32)
    r = (t * rng.uniform(0.0, 1.0, batch)).astype(np.float32)
    r[0] = t[0]  # a diffusion row
    if kind == "c2i":
        rows = int(cfg.num_classes) + int(float(cfg.class_dropout_prob) > 0)
        cond = rng.integers(0, rows, batch).astype(np.int64)
    else:
        cond = rng.standard_normal((batch, 7, int(cfg.cap_feat_dim))).astype(np.float32)

    def run_official(autocast: bool) -> dict:
        got = {}
        hooks = [net.x_embedder.register_forward_hook(lambda m, i, o: got.__setitem__("x_embedder", o)),
                 net.projector.register_forward_hook(lambda m, i, o: got.__setitem__("projector", o)),
                 net.final_layer.register_forward_hook(lambda m, i, o: got.__setitem__("final_layer", o))]
        if kind == "t2i":
            hooks.append(net.y_embedder.register_forward_hook(
                lambda m, i, o: got.__setitem__("y_embedder", o)))
        for i, blk in enumerate(net.blocks):
            hooks.append(blk.register_forward_hook(
                lambda m, inp, o, i=i: got.__setitem__(f"block{i}", o)))
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(r),
                    torch.from_numpy(cond), attn_type="fused_attn", return_zs=True)
        finally:
            for hk in hooks:
                hk.remove()
        return {k: v.float().numpy() for k, v in got.items()}

    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise ValueError(f"precisions must be a non-empty subset of ('fp32', 'bf16'); got {precisions}")
    ref32 = run_official(False)
    ref16 = run_official(True) if "bf16" in precisions else None
    results = []
    x_nhwc = jnp.asarray(nchw_to_nhwc(x))
    jcond = jnp.asarray(cond.astype(np.int32) if kind == "c2i" else cond)
    note_stub = f"shims: {'+'.join(shims_used)}" if shims_used else ""
    for tag, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        if tag not in precisions:
            continue
        model_cfg = cfg.copy_and_resolve_references()
        model_cfg.dtype = dtype
        from tim_jax.models import functional

        graphdef = functional.abstract_model(model_cfg)[0]

        @jax.jit
        def stages(params, x_, t_, r_, c_):
            return _tim_jax_intermediates(nnx.merge(graphdef, params), x_, t_, r_, c_, kind)

        ours = {k: np.asarray(v, np.float32) for k, v in
                stages(params, x_nhwc, jnp.asarray(t), jnp.asarray(r), jcond).items()}
        ref = ref32 if tag == "fp32" else ref16
        for k in ref:
            if tag == "fp32":
                note = note_stub
                tol = TOLERANCES["network"]
            else:
                inherent = compare(str(directory), k, ref16[k], ref32[k], 1.0).max_rel_err
                note = f"official bf16 vs fp32: {inherent:.2e}" + (f"; {note_stub}" if note_stub else "")
                tol = LIVE_BF16_TOL
            results.append(compare(str(directory), f"live/{k}[{tag}]", ours[k], ref[k], tol, note))
    return results
