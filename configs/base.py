"""Base configuration of every tim_jax run (ml_collections).

Every other config file (``configs/debug_cpu.py``, ``configs/c2i_*.py``, ...) starts from
``base.get_config()`` and overrides what it needs; the CLI overrides single fields with
``--config.optim.lr=2e-4``. The defaults reproduce the official TiM-XL/2 C2I-256 recipe
(``tim_xl_p2_256.yaml`` in WZDTHU/TiM) except where a comment says otherwise.

Sections (each field is documented where it is set below):

  seed             global seed; every random draw of the run derives from it
  model            network constructor values (official names) + JAX-side knobs
  transport        the time parameterisation (``tim_jax.transports.make_transport``)
  objective        the TiM loss (``tim_jax.objective.ObjectiveConfig``)
  optim            AdamW + schedule + clipping + gradient accumulation (``tim_jax.training.optimizer``)
  ema              EMA decays, updated inside the train step
  data             data source and the *global* batch
  mesh             device mesh sizes (``tim_jax.training.sharding.make_mesh``)
  sharding_rules   logical param/activation axis -> mesh axes (``tim_jax.training.sharding``)
  train            loop length and logging cadence
  ckpt             Orbax checkpointing
  sample           periodic sampling during training
  log              metric writers

Units: steps are optimizer steps (one step = one global batch, however many micro-batches
it is accumulated from); batch sizes are global (over all devices and hosts).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Root seed (key = PRNGKey(seed)). Parameter init uses fold_in(key, 0); micro-batch j of
    # train step k draws from fold_in(fold_in(fold_in(key, 1), k), j), so a resumed run draws
    # exactly the same numbers.
    config.seed = 0

    # ------------------------------------------------------------------------------------------
    # model: constructor values with the official names (tim/models/{c2i,t2i}/tim_model.py).
    m = config.model = ml_collections.ConfigDict()
    m.kind = "c2i"                 # "c2i" (class-conditional) | "t2i" (text-conditional)
    m.input_size = 32              # latent height = width, in latent pixels
    m.patch_size = 2               # patch side, in latent pixels (tokens = (input_size/patch)^2)
    m.in_channels = 4              # latent channels (4: SD-VAE, 32: DC-AE)
    m.hidden_size = 1152           # token width D
    m.depth = 28                   # number of transformer blocks
    m.num_heads = 16               # attention heads (head dim = hidden_size / num_heads)
    m.mlp_ratio = 4.0              # SwiGLU hidden = int(hidden_size * mlp_ratio * 2 / 3)
    m.lora_hidden_size = 384       # hidden width of the SwiGLU adaLN-modulation bottleneck
    m.encoder_depth = 8            # REPA projector reads the tokens after this block (1-based)
    m.projector_dim = 2048         # hidden width of the REPA projector MLP
    m.z_dim = 768                  # REPA target feature dim (RADIO-v2.5-B: 768)
    m.num_classes = 1000           # c2i classes; label index num_classes is the null class
    m.class_dropout_prob = 0.1     # official constructor value: > 0 adds the null-class row to
                                   # the label table. Dropping labels in training is done by the
                                   # objective (objective.label_dropout), not by the network.
    m.new_condition = "t-r"        # interval conditioning: 't-r' (official) | 'r' | 't,r' | ...
    m.use_new_embed = True         # decoupled t and (t - r) embedders (De-TE)
    m.distance_aware = True        # interval-aware attention (qkv += Linear(E_delta))
    m.qk_norm = True               # LayerNorm on q and k (per head)
    # JAX-side knobs.
    m.dtype = "float32"            # compute dtype of matmuls: "float32" | "bfloat16" | "auto". Params,
                                   # optimizer state, softmax, norms and the loss stay float32.
    m.scan_blocks = False          # stack the blocks and run them with a scan (shorter compile
                                   # for deep models; params get a leading 'layers' axis)
    m.remat = "none"               # per-block rematerialisation: "none" (fastest on CPU) |
                                   # "full" | "dots_no_batch" (save only weight matmuls)
    m.attention_impl = "xla"       # tim_jax.models.attention impl name ("xla" works everywhere
                                   # and supports jax.jvp; see attention.py for the others)
    m.matmul_precision = "default" # jax.lax.Precision of every matmul: "default" | "high" |
                                   # "highest" (exact fp32 matmuls on TPU/GPU)

    # ------------------------------------------------------------------------------------------
    # transport: official OT_FM values (tim/schedulers/transports.py + the c2i configs).
    # Every field below that the named transport has is passed to it (make_transport); when
    # switching `name`, set P_mean / P_std to that transport's values too.
    tr = config.transport = ml_collections.ConfigDict()
    tr.name = "OT_FM"              # "OT_FM" | "TrigFlow" | "EDM" | "VP_SDE" | "VE_SDE"
    tr.P_mean = -0.4               # logit-normal t sampling: t = sigmoid(N(P_mean, P_std))
    tr.P_std = 1.0                 #   (T2I uses P_mean 0.0, P_std 1.6)
    tr.sigma_d = 1.0               # data std used by the time weighting (sigma_d + tan t - tan r)
    tr.T_max = 1.0                 # noise end of the time interval
    tr.T_min = 0.0                 # data end of the time interval
    tr.enhance_target = False      # guidance-enhanced target from the EMA model (the *_mg runs)
    tr.w_gt = 1.0                  # enhanced v = w_gt v + w_cond F_ema(c) + (1-w_gt-w_cond) F_ema(null)
    tr.w_cond = 0.75
    tr.w_start = 0.3               # enhancement only for rows with w_start <= t <= w_end
    tr.w_end = 0.8

    # ------------------------------------------------------------------------------------------
    # objective: the TiM loss (official transition.py + trainer defaults).
    ob = config.objective = ml_collections.ConfigDict()
    ob.diffusion_ratio = 0.5       # first round(ratio * B) rows get r = t (flow matching)
    ob.consistency_ratio = 0.1     # last round(ratio * B) rows get r = T_min (endpoint)
    ob.derivative = "dde"          # dF/dt: "dde" (central finite difference) | "jvp" (exact)
    ob.dde_delta = 0.005           # DDE half-step in t (official differential_epsilon)
    ob.weight_type = "sqrt"        # interval weight: constant|reciprocal|sqrt|square|Soft-Min-SNR
    ob.weight_warp = "tangent"     # time warp inside the weight: "plain" | "tangent" | "sigmoid"
    ob.weight_base = "t_and_r"     # weight of (t, r) ("t_and_r", official) or of t only ("t_only")
    ob.use_dir_loss = True         # add the per-pixel channel cosine (directional) loss
    ob.adaptive_eps = 1e-5         # adaptive weight 1 / (stop_grad(L_i) + adaptive_eps)
    ob.repa_coeff = 1.0            # REPA cosine-loss coefficient (0 disables the projector loss)
    ob.repa_encoder = ""           # "" (targets from the data, or none) | "dinov2" | "radio": run
                                   # the frozen encoder on batch["image"] inside the train step
    ob.repa_encoder_path = ""      # its folder (config.json + model.safetensors)
    ob.label_dropout = 0.1         # probability that a row's condition is replaced by null_cond

    # ------------------------------------------------------------------------------------------
    # optim: AdamW + schedule (tim_jax.training.optimizer.make_optimizer).
    op = config.optim = ml_collections.ConfigDict()
    op.lr = 1e-4                   # peak lr at base_batch_size; see scale_lr
    op.base_batch_size = 256       # batch size at which lr is quoted
    op.scale_lr = True             # effective lr = lr * data.global_batch_size / base_batch_size
    op.b1 = 0.9
    op.b2 = 0.95
    op.eps = 1e-6
    op.weight_decay = 0.01         # decoupled (AdamW) decay, applied to every param (as official)
    op.schedule = "constant"       # "constant" (official) | "warmup_cosine"
    op.warmup_steps = 0            # linear warm-up from 0 over this many steps (both schedules)
    op.decay_steps = -1            # warmup_cosine: total steps incl. warm-up; -1 -> train.num_steps
    op.end_lr_ratio = 0.0          # warmup_cosine: final lr as a fraction of the peak lr
    op.grad_clip = 1.0             # global-norm clipping threshold; <= 0 disables clipping
    op.grad_accum_steps = 1        # micro-batches per step, accumulated inside the jitted step;
                                   # data.global_batch_size must divide evenly (per device too)

    # ------------------------------------------------------------------------------------------
    # ema: one EMA copy of the params per decay, updated every step from step 0 (official).
    # ema_params["<decay>"] <- decay * ema + (1 - decay) * params. The first decay is the
    # model used by the guidance-enhanced target (transport.enhance_target).
    config.ema = ml_collections.ConfigDict()
    config.ema.decays = (0.9999,)

    # ------------------------------------------------------------------------------------------
    # data.
    d = config.data = ml_collections.ConfigDict()
    d.source = "synthetic"         # "synthetic" (random latents/labels, for tests and smoke runs)
                                   # | "array" (pre-computed latents on disk, see tim_jax.data.pipeline)
                                   # | "arrayrecord" (a directory from `python -m tim_jax.prepare`)
    d.path = ""                    # "array": .npz file or .npy directory; "arrayrecord": the
                                   # prepared directory (manifest.json + ArrayRecord shards)
    d.flip = True                  # "arrayrecord": per record and epoch, the latent of the mirrored
                                   # crop with p = 0.5 (seeded, deterministic), as the official loader
    d.images = False               # "arrayrecord": batches also carry "image" (B, H, W, 3) uint8, the
                                   # crop (mirrored with its latent; needs prepare --keep-images):
                                   # the input of objective.repa_encoder
    d.bucket_index = ""            # "arrayrecord", native resolution: .npy cache of per-record latent
                                   # shapes; "" -> the directory's latent_shapes.npy, else read all
    d.read_threads = 2             # "arrayrecord": host batches assembled concurrently per pipeline
    d.read_buffer = 4              # "arrayrecord": host batches read ahead per pipeline
    d.global_batch_size = 256      # rows per optimizer step, over all devices and hosts; must
                                   # divide by the device count (x grad_accum_steps)
    d.use_repa_target = True       # batches carry "repa_target" (B, tokens, model.z_dim)
    d.repa_tokens = -1             # tokens of the REPA target; -1 -> (input_size / patch_size)^2
    d.shuffle = True               # "array"/"arrayrecord": shuffle each epoch (seeded from config.seed)
    d.num_workers = 0              # grain worker processes (0 = in-process; enough on CPU)
    d.prefetch = 2                 # batches prefetched to device ahead of the step
    d.caption_length = 16          # t2i "synthetic": caption tokens per row
    d.null_caption = ""            # t2i: .npy of the encoded empty prompt, (caption_length,
                                   # model.cap_feat_dim) float; "" -> the synthetic source's own
                                   # empty caption (zeros); required for "array"

    # ------------------------------------------------------------------------------------------
    # mesh: named device mesh ("data", "fsdp"); sizes must multiply to the device count;
    # one size may be -1 (auto-filled). Batch rows are split over data x fsdp; params, EMA and
    # optimizer state are sharded (ZeRO-3 style) over "fsdp" and replicated over "data".
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1

    # ------------------------------------------------------------------------------------------
    # sharding_rules: logical axis name (as annotated on params/activations by the models)
    # -> mesh axis, tuple of mesh axes, or None (replicated). A mesh axis is used at most once
    # per array (the first dim that asks for it gets it); a dim not divisible by its mesh
    # axes is replicated instead. Logical names not listed are replicated.
    sr = config.sharding_rules = ml_collections.ConfigDict()
    sr.rules = (
        ("batch", ("data", "fsdp")),   # activations / batch rows: over every device
        ("embed", "fsdp"),             # the hidden (D) dim of weights: FSDP
        ("mlp", "fsdp"),               # MLP hidden dim (used when no 'embed' dim got fsdp)
        ("heads", "fsdp"),             # fused q/k/v/heads output dim
        ("kv", None),
        ("proj", "fsdp"),              # REPA projector hidden dim
        ("vocab", None),               # label table rows
        ("patch", None),               # patch-embedding input (p*p*C) dim
        ("cond", None),                # caption feature dim (t2i)
        ("layers", None),              # scanned block axis
        ("norm", None),
    )
    sr.min_shard_size = 2 ** 18    # params with fewer elements (1 MiB at fp32) are replicated

    # ------------------------------------------------------------------------------------------
    # train: the loop (tim_jax.training.loop).
    t = config.train = ml_collections.ConfigDict()
    t.num_steps = 750_000          # optimizer steps to run
    t.log_every = 100              # steps between metric writes (host sync only then)
    t.check_finite = True          # stop (naming the step) on a non-finite loss/grad norm;
                                   # the step itself never applies a non-finite update
    t.profile_steps = ()           # optional (start, stop) step range for a jax.profiler trace

    # ------------------------------------------------------------------------------------------
    # ckpt: Orbax CheckpointManager (tim_jax.training.checkpointing).
    c = config.ckpt = ml_collections.ConfigDict()
    c.every_steps = 2000           # save cadence in steps (and at the end of the run)
    c.keep = 2                     # checkpoints kept (official checkpoints_total_limit)
    c.keep_steps = ()              # extra steps kept forever (official checkpoint_list)
    c.async_save = True            # save in a background thread (Orbax async)
    c.resume = True                # auto-resume from the newest checkpoint in the workdir

    # ------------------------------------------------------------------------------------------
    # sample: periodic sampling from the EMA params (first decay) during training.
    s = config.sample = ml_collections.ConfigDict()
    s.every_steps = 10_000         # 0 disables sampling during training
    s.num_steps = (1, 8)           # sampler step counts to run (one grid per count)
    s.num_images = 16              # images per grid
    s.cfg_scale = 1.0              # classifier-free guidance scale (1.0 = off)
    s.cfg_low = 0.0                # guidance only for cfg_low*T_max < t < cfg_high*T_max
    s.cfg_high = 1.0
    s.stochasticity_ratio = 0.0    # SDE noise ratio of the transition sampler
    s.mode = "transition"          # "transition" | "diffusion"
    s.vae = ""                     # autoencoder Hub folder (e.g. stabilityai/sd-vae-ft-ema) to
                                   # decode the grids to pictures; "": show raw latent channels

    # ------------------------------------------------------------------------------------------
    # log: metric writers (tim_jax.training.metrics).
    lg = config.log = ml_collections.ConfigDict()
    lg.tensorboard = True          # write TensorBoard events to <workdir>/tb
    lg.jsonl = True                # append metrics to <workdir>/metrics.jsonl

    return config


PAPER_VARIANTS = ("records", "synthetic")


def paper_config(preset: str, variant: str, *, global_batch_size: int, num_steps: int,
                 keep_steps: tuple) -> ml_collections.ConfigDict:
    """The base recipe with a paper network (``tim_jax.models.presets`` name) and its data.

    ``variant``: ``records`` (prepared records in ``data.path``, REPA targets computed in the step
    by RADIO v2.5-B from the stored crops, folder in ``objective.repa_encoder_path``; both paths
    empty: the CLI names the missing one) or ``synthetic`` (random latents and REPA targets).
    The lr is quoted at batch 256 and scaled linearly to ``global_batch_size``.
    """
    from tim_jax.models import presets

    if variant not in PAPER_VARIANTS:
        raise ValueError(f"config variant (configs/<file>.py:<variant>): one of {PAPER_VARIANTS}, "
                         f"got {variant!r}")
    config = get_config()
    config.model = presets.model_config(preset, **presets.knobs_of(config.model))
    config.model.dtype = "auto"   # bf16 where native (GPU, TPU, CPUs with AVX512-BF16/AMX), else fp32
    config.data.global_batch_size = global_batch_size
    if variant == "records":
        config.data.source = "arrayrecord"
        config.data.path = ""                       # required: `python -m tim_jax.prepare` output
        config.data.images = True                   # the crops, for the online REPA encoder
        config.data.use_repa_target = False
        config.objective.repa_encoder = "radio"
        config.objective.repa_encoder_path = ""     # required: the converted RADIO v2.5-B
    config.train.num_steps = num_steps
    config.ckpt.keep_steps = tuple(keep_steps)
    return config
