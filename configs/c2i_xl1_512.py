"""TiM-XL/1, class-conditional ImageNet 512x512 (16x16x32 DC-AE f32c32 latents): official
``configs/c2i/tim_xl_p1_512.yaml`` (672,296,224 params incl. REPA head; 664M without it).

Network: depth 28, D 1152, 16 heads, patch 1 (256 tokens), adaLN bottleneck 384, REPA after block
8. Recipe: the base defaults (this yaml's values), 750k steps, bf16 compute. The guided-target
``*_mg`` variant: ``--config.transport.enhance_target=True``.
"""
import ml_collections

from configs import base
from tim_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = presets.model_config("c2i_xl1_512", **presets.knobs_of(config.model))
    config.model.dtype = "bfloat16"  # official mixed_precision: bf16
    config.train.num_steps = 750_000
    config.ckpt.keep_steps = (100_000, 250_000, 500_000)
    return config
