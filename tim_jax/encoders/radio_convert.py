"""One-off conversion of an NVIDIA RADIO checkpoint (``radio-v2.5-b_half.pth.tar`` layout) into a
folder that :mod:`tim_jax.encoders.radio` loads without torch: ``config.json`` + ``model.safetensors``.

The ``.pth.tar`` is a torch pickle (``{"args": Namespace, "state_dict": ..., maybe
"state_dict_ema": ...}``), so reading it needs torch; this module imports torch only inside
:func:`convert_radio_checkpoint` (and no jax at all), so it can run in a torch-only
environment. Usage::

    python -m tim_jax.encoders.radio_convert radio-v2.5-b_half.pth.tar checkpoints/radio-v2.5-b

What is kept (names as in the checkpoint, with the ``base_model.`` prefix dropped):
``patch_generator.{embedder,pos_embed,cls_token.token,patch_normalizer}``, ``blocks.*``,
``norm.*`` (only when the checkpoint's args set ``model_norm``: RADIO replaces the final norm by
an identity otherwise), ``input_conditioner.norm_{mean,std}`` (3, 1, 1) and, when present,
``feature_normalizer.{mean,tx}``. Adaptor heads (``_heads.*``, ``_feature_projections.*``) and
intermediate-feature normalisers are not needed for REPA and are dropped. As the official
``radio_model`` does, ``state_dict_ema`` is used when the checkpoint has it. Tensors keep their
stored dtype (fp16 for ``_half``); the loader widens them to float32.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

#: heads of the timm ViT names RADIO uses, by name prefix (override with ``num_heads=``)
TIMM_HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "vit_large": 16,
              "vit_huge": 16, "vit_giant": 24, "vit_bigG": 16}


def _arg(args, name, default=None):
    return getattr(args, name, default) if not isinstance(args, dict) else args.get(name, default)


def radio_config(args, state: dict, num_heads: int | None = None) -> dict:
    """The ``config.json`` of a converted RADIO ViT from the checkpoint's ``args`` and its
    model state dict (``base_model.`` prefix already dropped; values: anything with ``.shape``)."""
    model = str(_arg(args, "model", ""))
    kwargs = dict(_arg(args, "model_kwargs", None) or {})
    if "patch_generator.embedder.weight" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise ValueError(f"checkpoint model {model!r} is not a CPE ViT (no patch_generator/"
                         "blocks.N.attn.qkv weights): only RADIO's timm-ViT models are supported")
    bad = sorted(k for k in state if "parametrizations" in k or ".q_norm." in k or ".k_norm." in k)
    if bad:
        raise NotImplementedError(f"unsupported RADIO weights (spectral reparametrisation or "
                                  f"qk-norm): {bad[:4]}")
    width, in_features = state["patch_generator.embedder.weight"].shape
    patch = int(round(math.sqrt(in_features / 3)))
    if 3 * patch * patch != in_features:
        raise ValueError(f"embedder weight {tuple(state['patch_generator.embedder.weight'].shape)}"
                         " is not (D, 3*p*p)")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if num_heads is None:
        num_heads = kwargs.get("num_heads")
    if num_heads is None:
        num_heads = next((h for p, h in TIMM_HEADS.items() if model.startswith(p)), None)
    if num_heads is None:
        raise ValueError(f"cannot tell the head count of timm model {model!r}: pass num_heads=")

    cpe_max = _arg(args, "cpe_max_size")
    if cpe_max is None:
        raise ValueError("checkpoint args have no cpe_max_size: not a CPE RADIO model")
    max_img = int(round(cpe_max / patch) * patch)
    grid = max_img // patch
    n_pos = state["patch_generator.pos_embed"].shape[1]
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed holds {n_pos} positions, cpe_max_size {cpe_max} with patch "
                         f"{patch} gives {grid}x{grid} = {grid * grid}")
    img_size = kwargs.get("img_size") or (518 * 16 // 14 if "_v2_" in model else 224)
    img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)

    teachers = list(_arg(args, "teachers", None) or [])
    per_teacher = _arg(args, "cls_token_per_teacher", True)
    num_cls = len({t["name"] for t in teachers}) if per_teacher else 1
    if per_teacher:
        first = {}
        for i, t in enumerate(teachers):
            if t.get("use_summary", True):
                first.setdefault(t["name"], i)
        summary_idxs = sorted(first.values())
    else:
        summary_idxs = [0]
    n_tokens = state["patch_generator.cls_token.token"].shape[0]
    if n_tokens < num_cls:
        raise ValueError(f"cls_token.token has {n_tokens} rows but the args give {num_cls} "
                         "teachers' class tokens")
    norm_on = bool(_arg(args, "model_norm", False))
    return {
        "model_type": "radio_vit",
        "timm_model": model,
        "patch_size": patch,
        "embed_dim": int(width),
        "depth": depth,
        "num_heads": int(num_heads),
        "mlp_hidden": int(state["blocks.0.mlp.fc1.weight"].shape[0]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "layerscale": any(f"blocks.0.ls1.{n}" in state for n in ("gamma", "grandma")),
        "layer_norm_eps": 1e-6,                     # timm ViT LayerNorm
        "patch_norm": "patch_generator.patch_normalizer.weight" in state,
        "patch_norm_eps": 1e-5,                     # torch nn.LayerNorm default
        "embedder_bias": "patch_generator.embedder.bias" in state,
        "max_grid": [grid, grid],
        "cpe_mode": (max_img, max_img) != tuple(img_size),
        "num_cls_tokens": num_cls,
        "num_registers": int(n_tokens - num_cls),
        "summary_idxs": summary_idxs,
        "final_norm": norm_on,
        "checkpoint_dtype": str(_arg(args, "dtype", "torch.float32")),
    }


def select_tensors(state_dict: dict, final_norm: bool) -> tuple[dict, dict, list]:
    """Split a RADIO checkpoint state dict into (model tensors without ``base_model.``,
    extra tensors (input conditioner, feature normaliser), dropped key names)."""
    model, extra, dropped = {}, {}, []
    for key, value in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith("base_model."):
            name = k[len("base_model."):]
            if name.startswith("norm.") and not final_norm:
                dropped.append(key)
            elif name.startswith(("patch_generator.", "blocks.", "norm.")):
                model[name] = value
            else:
                dropped.append(key)
        elif k in ("input_conditioner.norm_mean", "input_conditioner.norm_std"):
            extra[k] = value
        elif k in ("_feature_normalizer.mean", "_feature_normalizer.tx"):
            extra[k[1:]] = value
        else:
            dropped.append(key)
    return model, extra, dropped


def convert_radio_checkpoint(src, out_dir, *, num_heads: int | None = None) -> Path:
    """Read a RADIO ``.pth.tar`` with torch and write ``out_dir/config.json`` +
    ``out_dir/model.safetensors``. Returns ``out_dir``. Needs torch (ImportError otherwise)."""
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("converting a RADIO .pth.tar needs torch (the checkpoint is a torch "
                          "pickle); the converted folder then loads without torch") from e
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"RADIO checkpoint {src} does not exist")
    chk = torch.load(src, map_location="cpu", weights_only=False)
    if "args" not in chk or not ({"state_dict", "state_dict_ema"} & set(chk)):
        raise ValueError(f"{src} is not a RADIO checkpoint (expected keys 'args' and "
                         f"'state_dict'; has {sorted(chk)[:8]})")
    args = chk["args"]
    state = chk["state_dict_ema"] if "state_dict_ema" in chk else chk["state_dict"]
    final_norm = bool(_arg(args, "model_norm", False))
    model, extra, dropped = select_tensors(state, final_norm)
    config = radio_config(args, model, num_heads=num_heads)
    config["source_checkpoint"] = src.name
    config["dropped_keys"] = len(dropped)
    config["feature_normalizer"] = "feature_normalizer.mean" in extra
    missing = {"input_conditioner.norm_mean", "input_conditioner.norm_std"} - set(extra)
    if missing:   # the official loader requires them too (strict load of the conditioner)
        raise ValueError(f"{src} lacks {sorted(missing)} (RADIO's input normalisation)")
    tensors = {k: v.detach().contiguous() for k, v in {**model, **extra}.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Convert a RADIO .pth.tar to config.json + "
                                             "model.safetensors (needs torch).")
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir")
    ap.add_argument("--num-heads", type=int, default=None)
    a = ap.parse_args(argv)
    out = convert_radio_checkpoint(a.checkpoint, a.out_dir, num_heads=a.num_heads)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
