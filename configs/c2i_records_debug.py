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

from configs import debug_cpu


def get_config() -> ml_collections.ConfigDict:
    config = debug_cpu.get_config()   # its tiny c2i network and toy recipe, on records here
    config.model.input_size = 16      # 16x16x4 latents (sd_vae_tiny at --size 32) -> 64 tokens
    config.model.z_dim = 32           # the REPA encoder's width (dinov2_tiny: 32)

    d = config.data
    d.source = "arrayrecord"
    d.path = ""                    # required: the directory of `python -m tim_jax.prepare`
    d.use_repa_target = False      # records carry no REPA targets (an encoder computes them)
    d.images = False               # True with objective.repa_encoder (needs --keep-images)
    d.flip = True
    d.read_threads = 1
    d.read_buffer = 2

    config.train.num_steps = 8
    config.train.log_every = 1
    config.ckpt.every_steps = 4
    return config
