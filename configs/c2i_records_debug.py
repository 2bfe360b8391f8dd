"""Debug config: a tiny c2i TiM trained on prepared records (``data.source = "arrayrecord"``).

For tests and smoke runs of the real-data path on CPU (seconds per step). Made for records of the
tiny SD-VAE fixture (spatial factor 2, 4 channels) at ``--size 32``, i.e. 16x16x4 latents::

    python -m tim_jax.prepare --images DIR --vae tests/fixtures/parity/sd_vae_tiny --size 32 \\
        --out REC --keep-images
    python -m tim_jax.train --config configs/c2i_records_debug.py --config.data.path=REC --workdir W

``data.path`` is the only required field: empty, the CLI stops (exit 2) asking for the directory
written by ``python -m tim_jax.prepare``. ``model.input_size`` must equal the records' latent side
(16 here; another VAE or ``--size``: override it). With ``prepare --native`` the records are
bucketed by latent shape and the step compiles once per bucket shape.

REPA targets online from the records' images (needs ``--keep-images``), e.g. the DINOv2 fixture::

    --config.objective.repa_encoder=dinov2
    --config.objective.repa_encoder_path=tests/fixtures/parity/dinov2_tiny
    --config.data.images=True --config.model.z_dim=32

Without an encoder the REPA loss is off (the records carry no targets; ``proj_loss`` is 0).
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()

    m = config.model
    m.input_size = 16              # 16x16x4 latents (sd_vae_tiny at --size 32) -> 64 tokens
    m.patch_size = 2
    m.in_channels = 4
    m.hidden_size = 32
    m.depth = 2
    m.num_heads = 2
    m.mlp_ratio = 4.0
    m.lora_hidden_size = 16
    m.encoder_depth = 1
    m.projector_dim = 32
    m.z_dim = 32                   # the REPA encoder's width (dinov2_tiny: 32)
    m.num_classes = 10             # >= the records' classes (their manifest's num_classes)

    d = config.data
    d.source = "arrayrecord"
    d.path = ""                    # required: the directory of `python -m tim_jax.prepare`
    d.use_repa_target = False      # records carry no REPA targets (an encoder computes them)
    d.images = False               # True with objective.repa_encoder (needs --keep-images)
    d.flip = True
    d.global_batch_size = 8
    d.read_threads = 1
    d.read_buffer = 2

    config.optim.lr = 1e-3         # toy model: a larger lr shows learning within a few steps
    config.optim.scale_lr = False
    config.ema.decays = (0.999,)

    config.mesh.data = -1          # all devices data-parallel
    config.mesh.fsdp = 1
    config.sharding_rules.min_shard_size = 2 ** 10

    config.train.num_steps = 8
    config.train.log_every = 1
    config.ckpt.every_steps = 4
    config.ckpt.keep = 2
    config.sample.every_steps = 0  # no sampling in the debug loop
    config.sample.num_steps = (1, 4)
    config.sample.num_images = 8
    return config
