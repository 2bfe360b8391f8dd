"""TiM-B/4, class-conditional ImageNet 256x256 (32x32x4 SD-VAE latents): official
``configs/c2i/tim_b_p4.yaml`` (the paper's ablation model; 136,173,120 params incl. REPA head).

    python -m tim_jax.prepare --images /data/imagenet/train --vae /ckpt/sd-vae-ft-ema \\
        --size 256 --keep-images --out /data/latents/sdvae-256
    python -m tim_jax.train --config=configs/c2i_b4_256.py --workdir=RUN \\
        --config.data.path=/data/latents/sdvae-256 \\
        --config.objective.repa_encoder_path=/ckpt/radio-v2.5-b
    python -m tim_jax.train --config=configs/c2i_b4_256.py:synthetic --workdir=RUN  # smoke run

Data: ``records`` (default) or ``synthetic``, see :func:`configs.base.paper_config`.

Network: depth 12, D 768, 12 heads, patch 4 (64 tokens), adaLN bottleneck 256, REPA after block 4.
Recipe (the yaml + its launch script ``train_tim_c2i_b.sh``, 4 GPUs x 256): global batch 1024,
AdamW lr 1e-4 quoted at batch 256 and scaled linearly (4e-4 at 1024), betas (0.9, 0.95),
eps 1e-6, wd 0.01, clip 1.0, constant lr, EMA 0.9999, REPA coefficient 1.0; OT-FM P_mean -0.4 /
P_std 1.0, DDE, sqrt-tangent weights; 100k steps, checkpoints every 2000 steps (2 kept +
100k/200k/300k), bf16 compute where the hardware has it (``model.dtype = "auto"``; the official
``mixed_precision: bf16``).
"""
import ml_collections

from configs import base


def get_config(variant: str = "records") -> ml_collections.ConfigDict:
    # batch official: 256 per GPU x 4 GPUs (lr scaled to 4e-4)
    return base.paper_config("c2i_b4_256", variant, global_batch_size=1024, num_steps=100_000,
                             keep_steps=(100_000, 200_000, 300_000))
