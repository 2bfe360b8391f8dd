"""TiM-B/2, class-conditional ImageNet 256x256 (32x32x4 SD-VAE latents): B/4 with patch 2
(256 tokens; 136,099,344 params incl. REPA head). No official config ships this size; the recipe
is that of ``tim_b_p4.yaml`` (see ``configs/c2i_b4_256.py``).
"""
import ml_collections

from configs import base
from tim_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = presets.model_config("c2i_b2_256", **presets.knobs_of(config.model))
    config.model.dtype = "auto"  # bf16 where native (GPU, TPU, CPUs with AVX512-BF16/AMX), else fp32
    config.train.num_steps = 100_000
    config.ckpt.keep_steps = (100_000, 200_000, 300_000)
    return config
