"""TiM-T2I (the 865M flagship), text-conditional, DC-AE f32c32 latents (32 channels, /32):
official ``configs/t2i/tim_xl_p1_t2i.yaml`` (873,109,408 params incl. REPA head).

Network: depth 28, D 1152, 16 heads, patch 1, adaLN bottleneck 384, caption cross-attention on
Gemma-3-1B last hidden states (cap_feat_dim 1152), REPA after block 8. The network accepts any
latent size divisible by the patch (input_size 16 is only the default sample size).
Recipe differences from the base: t sampled with P_mean 0.0 / P_std 1.6, lr 1e-4 quoted at batch
512, caption dropout 0.1 (official proportion_empty_prompts), 500k steps, checkpoints every 1000
steps, bf16 compute. (The caption data pipeline is chosen in ``config.data``.)
"""
import ml_collections

from configs import base
from tim_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = presets.model_config("t2i_xl1", **presets.knobs_of(config.model))
    config.model.dtype = "bfloat16"  # official mixed_precision: bf16
    config.transport.P_mean = 0.0
    config.transport.P_std = 1.6
    config.optim.base_batch_size = 512
    config.objective.label_dropout = 0.1
    config.train.num_steps = 500_000
    config.ckpt.every_steps = 1000
    config.ckpt.keep_steps = (100_000, 200_000, 300_000, 400_000)
    return config
