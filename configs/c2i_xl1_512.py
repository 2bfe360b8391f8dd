"""TiM-XL/1, class-conditional ImageNet 512x512 (16x16x32 DC-AE f32c32 latents): official
``configs/c2i/tim_xl_p1_512.yaml`` (672,296,224 params incl. REPA head; 664M without it).

    python -m tim_jax.prepare --images /data/imagenet/train \\
        --vae /ckpt/dc-ae-f32c32-sana-1.1-diffusers --size 512 --keep-images \\
        --out /data/latents/dcae-512
    python -m tim_jax.train --config=configs/c2i_xl1_512.py --workdir=RUN \\
        --config.data.path=/data/latents/dcae-512 \\
        --config.objective.repa_encoder_path=/ckpt/radio-v2.5-b
    python -m tim_jax.train --config=configs/c2i_xl1_512.py:synthetic --workdir=RUN  # smoke run

Data (``get_config(variant)``):
  * ``records`` (default): ``data.path`` is the directory of ``python -m tim_jax.prepare
    --keep-images``; the REPA targets are computed in the step by RADIO v2.5-B from the
    records' 512 px crops, resized to 256 px (16 x 16 tokens) as the official trainer does
    (official ``enc_dir: radio-v2.5-b_half.pth.tar``);
    ``objective.repa_encoder_path`` is the folder of ``python -m
    tim_jax.encoders.radio_convert``. Both paths are empty here: the CLI stops (exit 2)
    naming the missing one (``data.path``: run ``python -m tim_jax.prepare``).
  * ``synthetic``: random latents and REPA targets (no files; smoke runs and benchmarks).

Network: depth 28, D 1152, 16 heads, patch 1 (256 tokens), adaLN bottleneck 384, REPA after block
8. Recipe (the yaml + its launch script ``train_tim_c2i_xl_512.sh``, 8 GPUs x 64): global batch
512, AdamW lr 1e-4 quoted at batch 256 and scaled linearly (2e-4 at 512), betas (0.9, 0.95),
eps 1e-6, wd 0.01, clip 1.0, constant lr, EMA 0.9999, REPA coefficient 1.0, 750k steps,
checkpoints every 2000 steps (2 kept + 100k/250k/500k), bf16 compute. The guided-target ``*_mg``
variant: ``--config.transport.enhance_target=True``.
"""
import ml_collections

from configs import base
from tim_jax.models import presets

VARIANTS = ("records", "synthetic")


def get_config(variant: str = "records") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/c2i_xl1_512.py:<variant>: one of {VARIANTS}, got {variant!r}")
    config = base.get_config()
    config.model = presets.model_config("c2i_xl1_512", **presets.knobs_of(config.model))
    config.model.dtype = "auto"  # bf16 where native (GPU, TPU, CPUs with AVX512-BF16/AMX), else fp32
    config.data.global_batch_size = 512  # official: 64 per GPU x 8 GPUs (lr scaled to 2e-4)
    if variant == "records":
        config.data.source = "arrayrecord"
        config.data.path = ""                       # required: `python -m tim_jax.prepare` output
        config.data.images = True                   # the crops, for the online REPA encoder
        config.data.use_repa_target = False
        config.objective.repa_encoder = "radio"
        config.objective.repa_encoder_path = ""     # required: the converted RADIO v2.5-B
    config.train.num_steps = 750_000
    config.ckpt.keep_steps = (100_000, 250_000, 500_000)
    return config
