"""TiM-S/2, class-conditional, 256x256 images as 32x32x4 SD-VAE latents (ImageNet-1k).

    python -m tim_jax.train --config=configs/c2i_s2_256.py --workdir=...
    python -m tim_jax.bench train --config=configs/c2i_s2_256.py --config.data.global_batch_size=16

A small member of the official family (the official configs ship B/4 and XL/2): depth 12,
width 384, 6 heads of dim 64, patch 2 -> 256 tokens, SwiGLU MLP hidden int(384 * 4 * 2/3) = 1024,
adaLN SwiGLU bottleneck 128, REPA projector 384 -> 2048 -> 2048 -> 768 after block 4.
39,086,736 parameters (the same count as the official ``TiM`` built with these values).
It is the model of the CPU speed comparison (``tim_jax.bench``; /work/shared/notes/cpu-perf.md).

The training recipe is the official one of ``tim_b_p4.yaml`` (OT-FM with P_mean -0.4, DDE,
sqrt/tangent interval weights, AdamW 1e-4 at batch 256 with betas (0.9, 0.95), wd 0.01,
eps 1e-6, clipping 1.0, EMA 0.9999, bf16 mixed precision), all base defaults except the
bf16 compute dtype set here.
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()

    m = config.model
    m.kind = "c2i"
    m.input_size = 32
    m.patch_size = 2
    m.in_channels = 4
    m.hidden_size = 384
    m.depth = 12
    m.num_heads = 6
    m.mlp_ratio = 4.0
    m.lora_hidden_size = 128
    m.encoder_depth = 4
    m.projector_dim = 2048
    m.z_dim = 768
    m.num_classes = 1000
    m.dtype = "auto"  # bf16 where native (GPU, TPU, CPUs with AVX512-BF16/AMX), else fp32

    config.data.global_batch_size = 256
    config.train.num_steps = 400_000
    return config
