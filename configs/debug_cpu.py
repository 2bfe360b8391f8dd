"""Debug config: a tiny c2i TiM on synthetic 8x8x4 latents that trains a few steps in seconds on CPU.

    python -m tim_jax.train --config=configs/debug_cpu.py --workdir=/tmp/tim_debug
    python -m tim_jax.train --config=configs/debug_cpu.py:t2i --workdir=/tmp/tim_debug_t2i

``:t2i`` swaps in a tiny text-conditional network (cross-attention on 8 synthetic caption tokens
of width 48, the synthetic source's zero "empty prompt" as the null caption).

Everything not set here is the base default (configs/base.py), so this config exercises the
full objective (DDE derivative, REPA, label dropout, time weighting) at toy scale.
"""
import ml_collections

from configs import base
from tim_jax.models import presets


def get_config(kind: str = "c2i") -> ml_collections.ConfigDict:
    if kind not in ("c2i", "t2i"):
        raise ValueError(f"configs/debug_cpu.py:<kind>: kind must be 'c2i' or 't2i', got {kind!r}")
    config = base.get_config()

    m = config.model
    m.input_size = 8               # 8x8x4 latents -> (8/2)^2 = 16 tokens
    m.patch_size = 2
    m.in_channels = 4
    m.hidden_size = 32
    m.depth = 2
    m.num_heads = 2
    m.mlp_ratio = 4.0
    m.lora_hidden_size = 16
    m.encoder_depth = 1
    m.projector_dim = 32
    m.z_dim = 16
    m.num_classes = 10

    if kind == "t2i":
        config.model = presets.model_config("t2i_tiny", hidden_size=32, num_heads=2, lora_hidden_size=16,
                                            projector_dim=32, z_dim=16, **presets.knobs_of(m))
        config.data.caption_length = 8

    config.data.source = "synthetic"
    config.data.global_batch_size = 8

    config.optim.lr = 1e-3         # toy model: a larger lr shows learning within a few steps
    config.optim.scale_lr = False

    config.ema.decays = (0.999,)

    config.mesh.data = -1          # all devices data-parallel
    config.mesh.fsdp = 1
    config.sharding_rules.min_shard_size = 2 ** 10

    config.train.num_steps = 20
    config.train.log_every = 5
    config.ckpt.every_steps = 10
    config.ckpt.keep = 2
    config.sample.every_steps = 0  # no sampling in the debug loop
    config.sample.num_steps = (1, 4)
    config.sample.num_images = 8
    return config
