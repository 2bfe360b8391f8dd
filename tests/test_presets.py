"""Official model sizes (exact parameter counts, built abstractly: no parameter memory), the
logical-axis annotations of every parameter, the model-config schema and the preset config files."""
import importlib

import jax
import ml_collections
import pytest
from flax import nnx

from tim_jax.models import (
    LOGICAL_AXES,
    PRESETS,
    abstract_params,
    build_model,
    count_params,
    model_config,
)
from tim_jax.models import presets

# Official TiM parameter counts (the official ``TiM(**network.params)`` of each yaml,
# REPA projector included; 664M / 865M in the paper exclude the projector head).
OFFICIAL = {
    "c2i_xl2_256": 672_259_344,
    "c2i_xl1_512": 672_296_224,
    "c2i_b4_256": 136_173_120,
    "t2i_xl1": 873_109_408,
}


def hand_count(c) -> int:
    """Parameter count of a TiM config, written out from the official architecture
    (tim/models/{c2i,t2i}/tim_model.py), independently of tim_jax's modules."""
    d, p, ch, dh = c.hidden_size, c.patch_size, c.in_channels, c.hidden_size // c.num_heads
    lora = c.lora_hidden_size if c.lora_hidden_size is not None else (d // 4) * 3
    swiglu = lambda i, h, o: i * 2 * h + 2 * h + h * o + o  # noqa: E731  timm SwiGLU, biases
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    norms = 2 * (2 * dh) if c.qk_norm else 0          # q_norm + k_norm (affine LayerNorm)
    attn = linear(d, 3 * d) + (linear(d, 3 * d, False) if c.distance_aware else 0) + norms \
        + linear(d, d)
    block = attn + swiglu(d, (int(d * c.mlp_ratio) * 2) // 3, d)
    t2i = c.kind == "t2i"
    block += swiglu(d, lora, (9 if t2i else 6) * d)    # adaLN modulation
    if t2i:
        block += linear(d, d) + linear(d, 2 * d) + norms + linear(d, d)   # cross-attention
    timestep = linear(256, d) + linear(d, d)
    total = c.depth * block + linear(p * p * ch, d) + timestep * (2 if c.use_new_embed else 1)
    total += linear(d, c.projector_dim) + linear(c.projector_dim, c.projector_dim) \
        + linear(c.projector_dim, c.z_dim)
    total += linear(d, p * p * ch) + swiglu(d, d // 2, 2 * d)      # final layer
    if t2i:
        total += 2 * c.cap_feat_dim + swiglu(c.cap_feat_dim, 4 * d, d)
    else:
        total += (c.num_classes + int(c.class_dropout_prob > 0)) * d
    return total


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_equal_the_architecture(name):
    """Every preset builds exactly the parameters the official architecture has (a hand count),
    and the official presets the count the official code reports."""
    cfg = model_config(name)
    assert count_params(abstract_params(cfg)) == hand_count(cfg)
    if name in OFFICIAL:
        assert hand_count(cfg) == OFFICIAL[name]


def test_projector_share_of_xl():
    """The paper's 664M excludes the REPA head (1152*2048 + 2048^2 + 2048*768 + biases)."""
    params = abstract_params(model_config("c2i_xl2_256"))
    head = count_params(params["projector"])
    assert head == 1152 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768
    assert round((OFFICIAL["c2i_xl2_256"] - head) / 1e6) == 664


def _axes_of(params):
    return {path: var.get_metadata().get("out_sharding") for path, var in nnx.to_flat_state(params)}


@pytest.mark.parametrize("name", ["c2i_b4_256", "t2i_tiny"])
@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axes(name, scan):
    params = abstract_params(model_config(name, scan_blocks=scan))
    axes = _axes_of(params)
    allowed = set(LOGICAL_AXES) | {None}
    for path, names in axes.items():
        var_shape = dict(nnx.to_flat_state(params))[path].shape
        assert names is not None and len(names) == len(var_shape), (path, names, var_shape)
        assert set(names) <= allowed, (path, names)
        in_block = path[0] == "blocks"
        assert (names[0] == "layers") == (scan and in_block), (path, names)
        named = [n for n in names if n is not None]
        assert len(named) == len(set(named)), (path, names)  # no logical name twice per param
    # nnx.get_partition_spec turns them into PartitionSpecs of the same rank
    specs = nnx.get_partition_spec(params)
    qkv = specs["blocks"]["attn"]["qkv"]["kernel"] if scan else specs["blocks"][0]["attn"]["qkv"]["kernel"]
    assert tuple(qkv.get_value()) == ((("layers",) if scan else ()) + ("embed", "heads"))


def test_scan_and_list_layouts_same_count():
    for name in ("c2i_b4_256", "t2i_tiny"):
        a = abstract_params(model_config(name))
        b = abstract_params(model_config(name, scan_blocks=True))
        assert count_params(a) == count_params(b)
        depth = PRESETS[name]["depth"]
        assert b["blocks"]["mlp"]["fc1"]["kernel"].shape[0] == depth


def test_other_presets_build_abstractly():
    counts = {name: count_params(abstract_params(model_config(name)))
              for name in PRESETS if name not in OFFICIAL}
    # B/2 = B/4 with a 2x2 patch: patch-embedding and final-linear weights shrink by 4x.
    assert counts["c2i_b2_256"] == OFFICIAL["c2i_b4_256"] - 2 * 12 * 4 * 768 - 48
    assert counts["c2i_l2_256"] == 467_015_408
    assert counts["c2i_tiny"] == 305_660  # = the official fixture's state dict size


def test_model_config_and_build_errors():
    with pytest.raises(ValueError, match=r"unknown model preset 'xl'; presets: \[.*c2i_b4_256"):
        model_config("xl")
    with pytest.raises(ValueError, match=r"unknown c2i model field\(s\) \['cap_feat_dim'\]"):
        model_config("c2i_tiny", cap_feat_dim=3)
    with pytest.raises(ValueError, match=r"model kind='c3i'"):
        build_model({**model_config("c2i_tiny").to_dict(), "kind": "c3i"})
    with pytest.raises(ValueError, match=r"unknown t2i model field\(s\) \['num_classes'\]"):
        build_model({**model_config("t2i_tiny").to_dict(), "num_classes": 3})
    cfg = model_config("c2i_xl2_256", dtype="bfloat16", scan_blocks=True)
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.dtype == "bfloat16" and cfg.scan_blocks and cfg.hidden_size == 1152


def test_official_values_of_presets():
    xl = model_config("c2i_xl2_256")
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size, xl.encoder_depth,
            xl.lora_hidden_size, xl.z_dim, xl.projector_dim, xl.num_classes) == \
        (28, 1152, 16, 2, 8, 384, 768, 2048, 1000)
    assert xl.new_condition == "t-r" and xl.use_new_embed and xl.distance_aware and xl.qk_norm
    b4 = model_config("c2i_b4_256")
    assert (b4.depth, b4.hidden_size, b4.num_heads, b4.patch_size, b4.encoder_depth,
            b4.lora_hidden_size) == (12, 768, 12, 4, 4, 256)
    x512 = model_config("c2i_xl1_512")
    assert (x512.input_size, x512.in_channels, x512.patch_size) == (16, 32, 1)
    t2i = model_config("t2i_xl1")
    assert (t2i.kind, t2i.cap_feat_dim, t2i.in_channels, t2i.patch_size) == ("t2i", 1152, 32, 1)


@pytest.mark.parametrize("name", ["c2i_b4_256", "c2i_b2_256", "c2i_l2_256", "c2i_xl2_256",
                                  "c2i_xl1_512", "t2i_xl1"])
def test_preset_config_files(name):
    """configs/<preset>.py: a full config (base sections) whose model section is the preset."""
    config = importlib.import_module(f"configs.{name}").get_config()
    for section in ("model", "transport", "objective", "optim", "data", "mesh", "ckpt"):
        assert section in config, section
    if name in OFFICIAL:
        assert count_params(abstract_params(config.model)) == OFFICIAL[name]
    if name == "t2i_xl1":
        assert (config.transport.P_mean, config.transport.P_std) == (0.0, 1.6)


def test_base_config_model_section_builds_and_rules_cover_axes():
    """Contract with configs/base.py: its model section builds, and its sharding rules name every
    logical axis the models use."""
    base = importlib.import_module("configs.base").get_config()
    params = abstract_params(base.model)
    assert count_params(params) == OFFICIAL["c2i_xl2_256"]  # base = XL/2 recipe
    ruled = {rule[0] for rule in base.sharding_rules.rules}
    assert set(LOGICAL_AXES) <= ruled, set(LOGICAL_AXES) - ruled


def test_knobs_carry_over():
    base_model = model_config("c2i_tiny", remat="full", attention_impl="xla_softmax")
    cfg = model_config("c2i_b4_256", **presets.knobs_of(base_model))
    assert cfg.remat == "full" and cfg.attention_impl == "xla_softmax" and cfg.depth == 12
    assert jax.tree.leaves(presets.JAX_KNOBS)  # documented defaults exist
