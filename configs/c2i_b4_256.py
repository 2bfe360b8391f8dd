"""TiM-B/4, class-conditional ImageNet 256x256 (32x32x4 SD-VAE latents): official
``configs/c2i/tim_b_p4.yaml`` (the paper's ablation model; 136,173,120 params incl. REPA head).

    python -m tim_jax.train --config=configs/c2i_b4_256.py --workdir=...

Network: depth 12, D 768, 12 heads, patch 4 (64 tokens), adaLN bottleneck 256, REPA after block 4.
Recipe: the base defaults (OT-FM P_mean -0.4 / P_std 1.0, DDE, sqrt-tangent weights, AdamW 1e-4 at
batch 256, betas (0.9, 0.95), wd 0.01, clip 1.0, EMA 0.9999) with the official 100k steps and bf16
compute (official ``mixed_precision: bf16``; set ``--config.model.dtype=float32`` on CPU).
"""
import ml_collections

from configs import base
from tim_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = presets.model_config("c2i_b4_256", **presets.knobs_of(config.model))
    config.model.dtype = "bfloat16"
    config.train.num_steps = 100_000
    config.ckpt.keep_steps = (100_000, 200_000, 300_000)
    return config
