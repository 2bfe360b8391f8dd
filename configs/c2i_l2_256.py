"""TiM-L/2, class-conditional ImageNet 256x256 (32x32x4 SD-VAE latents; 467,015,408 params incl.
REPA head). No official config ships this size: DiT-L (depth 24, D 1024, 16 heads, patch 2) with
adaLN bottleneck 384 and REPA after block 8 (our choice, see ``tim_jax.models.presets``); the
recipe is the XL one (``tim_xl_p2_256.yaml``: the base defaults, 750k steps) with bf16 compute.
"""
import ml_collections

from configs import base
from tim_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = presets.model_config("c2i_l2_256", **presets.knobs_of(config.model))
    config.model.dtype = "auto"  # bf16 where native (GPU, TPU, CPUs with AVX512-BF16/AMX), else fp32
    config.train.num_steps = 750_000
    config.ckpt.keep_steps = (100_000, 250_000, 500_000)
    return config
