"""TiM-XL/2, class-conditional ImageNet 256x256 (32x32x4 SD-VAE latents): official
``configs/c2i/tim_xl_p2_256.yaml`` (672,259,344 params incl. REPA head; 664M without it).

    python -m tim_jax.train --config=configs/c2i_xl2_256.py --workdir=...

Network: depth 28, D 1152, 16 heads, patch 2 (256 tokens), adaLN bottleneck 384, REPA after block
8. Recipe: the base defaults (they are this yaml's values), 750k steps, bf16 compute (official
``mixed_precision: bf16``). The guided-target ``*_mg`` variant: ``--config.transport.enhance_target=True``.
"""
import ml_collections

from configs import base
from tim_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = presets.model_config("c2i_xl2_256", **presets.knobs_of(config.model))
    config.model.dtype = "bfloat16"
    config.train.num_steps = 750_000
    config.ckpt.keep_steps = (100_000, 250_000, 500_000)
    return config
