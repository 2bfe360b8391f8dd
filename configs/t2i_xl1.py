"""TiM-T2I (the 865M flagship), text-conditional, DC-AE f32c32 latents (32 channels, /32):
official ``configs/t2i/tim_xl_p1_t2i.yaml`` (873,109,408 params incl. REPA head).

    python -m tim_jax.prepare --images DIR --captions DIR/captions.jsonl \\
        --vae dc-ae-f32c32-sana-1.1-diffusers --text-encoder gemma-3-1b-it \\
        [--native --max-area 262144 --patch-size 1] --out RECORDS
    python -m tim_jax.train --config configs/t2i_xl1.py --config.data.path=RECORDS --workdir RUN

Network: depth 28, D 1152, 16 heads, patch 1, adaLN bottleneck 384, caption cross-attention on
Gemma-3-1B last hidden states (cap_feat_dim 1152), REPA after block 8. The network accepts any
latent size divisible by the patch (input_size 16 is only the default sample size), so native-
resolution records (``--native``, the official multi-scale buckets) train as they are.

Data: the prepared records of ``data.path`` (``data.source = "arrayrecord"``): latents and the
captions' Gemma features cached at preparation (``tim_jax.data.captions``; the choice and its
cost figures: docs/data-format.md, "T2I captions"). ``data.null_caption`` follows ``data.path``
(``<data.path>/null_caption.npy``, written by prepare). No mirroring (the official T2I loader
does not flip: captions name left and right).

Recipe (the yaml): t sampled with P_mean 0.0 / P_std 1.6; lr 1e-4 quoted at batch 512 (scaled
with the batch), AdamW betas (0.9, 0.95), weight decay 0.01, eps 1e-6, clip 1.0, constant lr;
EMA 0.9999; 10 % caption dropout to the encoded empty prompt (official proportion_empty_prompts,
done by the objective's label_dropout); 500k steps, checkpoints every 1000 steps, 2 kept plus
steps 100k-400k; bf16 compute. The global batch: 512 here, the batch the lr is quoted at (the
official batch is set by its packed bucket file and GPU count).
REPA (official: RADIO-v2.5-B on the image at half resolution, coefficient 1.0) is opt-in, since
it needs the encoder and the images in the records (``prepare --keep-images``):
``--config.objective.repa_encoder=radio --config.objective.repa_encoder_path=DIR
--config.data.images=True``.
"""
import ml_collections

from configs import base
from tim_jax.data import captions
from tim_jax.models import presets


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = presets.model_config("t2i_xl1", **presets.knobs_of(config.model))
    config.model.dtype = "auto"  # bf16 where native (GPU, TPU, CPUs with AVX512-BF16/AMX), else fp32
    config.transport.P_mean = 0.0
    config.transport.P_std = 1.6
    config.optim.base_batch_size = 512
    config.objective.label_dropout = 0.1
    config.objective.repa_coeff = 1.0
    config.objective.repa_encoder = ""      # opt-in (see the module docstring)

    d = config.data
    d.source = "arrayrecord"
    d.path = ""                             # the records directory: the one field to set
    d.null_caption = captions.null_caption_ref(d)   # <data.path>/null_caption.npy
    d.flip = False
    d.images = False
    d.use_repa_target = False
    d.global_batch_size = 512

    config.train.num_steps = 500_000
    config.ckpt.every_steps = 1000
    config.ckpt.keep = 2
    config.ckpt.keep_steps = (100_000, 200_000, 300_000, 400_000)
    return config
