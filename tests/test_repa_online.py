"""REPA targets computed inside the train step by a frozen encoder (tim_jax.training.repa):
the step with ``batch["image"]`` equals the step with the encoder's targets given as
``batch["repa_target"]`` (same loss, same new params), and a mismatched encoder is refused
before anything is compiled, naming both token counts / widths. Encoder: the committed
DINOv2 fixture (random weights, width 32, patch 4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import parity_path

from configs import debug_cpu
from tim_jax.training import repa, sharding
from tim_jax.training import state as train_state
from tim_jax.training import step as train_step


def _config(z_dim=32):
    cfg = debug_cpu.get_config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.data.global_batch_size = 8
    cfg.sharding_rules.min_shard_size = 256
    cfg.model.z_dim = z_dim
    cfg.objective.repa_encoder = "dinov2"
    cfg.objective.repa_encoder_path = str(parity_path("dinov2_tiny"))
    cfg.data.use_repa_target = False
    return cfg


def _batch(cfg):
    b, m = cfg.data.global_batch_size, cfg.model
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {"x": jax.random.normal(k1, (b, m.input_size, m.input_size, m.in_channels)),
            "cond": jax.random.randint(k2, (b,), 0, m.num_classes).astype(jnp.int32),
            "image": jax.random.randint(k3, (b, 64, 64, 3), 0, 256).astype(jnp.uint8)}


def test_step_with_images_equals_step_with_precomputed_targets():
    cfg = _config()
    enc = repa.load_repa_encoder(cfg, image_size=64)
    assert (enc.num_tokens, enc.dim) == (16, 32)
    mesh = sharding.make_mesh(cfg)
    batch = _batch(cfg)
    targets = enc.targets(enc.params, batch["image"])
    assert targets.shape == (8, 16, 32)
    results = []
    for use_encoder in (True, False):
        state, shardings, graphdef = train_state.create_train_state(cfg, mesh)
        step = train_step.make_train_step(cfg, graphdef, mesh, shardings,
                                          repa=enc if use_encoder else None)
        b = dict(batch)
        if not use_encoder:
            b["repa_target"] = targets
            del b["image"]
        new_state, metrics = step(state, b)
        results.append((float(metrics["loss"]), jax.device_get(new_state.params)))
    (l1, p1), (l2, p2) = results
    assert l1 == pytest.approx(l2, rel=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mismatched_encoder_is_refused_naming_both():
    with pytest.raises(ValueError, match="features are 32-d but model.z_dim=24"):
        repa.load_repa_encoder(_config(z_dim=24), image_size=64)
    # 256 px images: REPA's DINOv2 size 224 -> 56 x 56 patches of 4 px; the network has 16
    with pytest.raises(ValueError, match="gives 3136 tokens for 256px images but the network "
                                         "has 16 tokens"):
        repa.load_repa_encoder(_config(), image_size=256)
    cfg = _config()
    cfg.objective.repa_encoder = "clip"
    with pytest.raises(ValueError, match="repa_encoder='clip'"):
        repa.load_repa_encoder(cfg)
