"""TiM-XL/2, class-conditional ImageNet 256x256 (32x32x4 SD-VAE latents): official
``configs/c2i/tim_xl_p2_256.yaml`` (672,259,344 params incl. REPA head; 664M without it).

    python -m tim_jax.prepare --images /data/imagenet/train --vae /ckpt/sd-vae-ft-ema \\
        --size 256 --keep-images --out /data/latents/sdvae-256
    python -m tim_jax.train --config=configs/c2i_xl2_256.py --workdir=RUN \\
        --config.data.path=/data/latents/sdvae-256 \\
        --config.objective.repa_encoder_path=/ckpt/radio-v2.5-b
    python -m tim_jax.train --config=configs/c2i_xl2_256.py:synthetic --workdir=RUN  # smoke run

Data: ``records`` (default) or ``synthetic``, see :func:`configs.base.paper_config`.

Network: depth 28, D 1152, 16 heads, patch 2 (256 tokens), adaLN bottleneck 384, REPA after block
8. Recipe (the yaml + its launch script ``train_tim_c2i_xl_256.sh``, 8 GPUs x 64): global batch
512, AdamW lr 1e-4 quoted at batch 256 and scaled linearly (2e-4 at 512), betas (0.9, 0.95),
eps 1e-6, wd 0.01, clip 1.0, constant lr, EMA 0.9999, REPA coefficient 1.0, 750k steps,
checkpoints every 2000 steps (2 kept + 100k/250k/500k), bf16 compute (official
``mixed_precision: bf16``). The guided-target ``*_mg`` variant:
``--config.transport.enhance_target=True``.
"""
import ml_collections

from configs import base


def get_config(variant: str = "records") -> ml_collections.ConfigDict:
    # batch official: 64 per GPU x 8 GPUs (lr scaled to 2e-4)
    return base.paper_config("c2i_xl2_256", variant, global_batch_size=512, num_steps=750_000,
                             keep_steps=(100_000, 250_000, 500_000))
