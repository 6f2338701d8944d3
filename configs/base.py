"""Every config key, with its default and what it does: full-size DreamVideo on the ModelScope-T2V base.

The other config files start from this one and set only what differs (`configs/modelscope_t2v.py`,
`configs/tiny.py`, `configs/demo_shapes.py`). Any key can also be set on the command line, e.g.
`--config.train.learning_rate=1e-4`. `tests/test_configs.py` checks these values against the library's own
defaults (which the converter, evaluation and sampling use where a config lacks a section), key for key.

Config files are loaded by path (`--config=/path/to/configs/X.py`), from any working directory: a file that
builds on this one reads it with `runpy.run_path` beside its own `__file__`, not with an import.
"""

import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0  # PRNG seed of parameter init, noise, timesteps and condition dropout
    config.num_frames = 16  # frames per training clip (the model's clip size)
    config.height = 256  # frame height in pixels
    config.width = 256  # frame width in pixels

    # ---- model: the networks (models/build.py builds them from this section).
    config.model = m = ml_collections.ConfigDict()
    m.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'
    m.param_dtype = "float32"  # parameter dtype (trainable weights and their optimizer state: the master copy)
    m.frozen_dtype = ""  # storage of weights that are not trained ('bfloat16' halves them); '' = param_dtype
    m.remat = False  # recompute each ResNet / temporal conv / attention / feed-forward in the backward (less memory)
    m.remat_policy = "nothing_saveable"  # 'nothing_saveable' (works on XLA:CPU too) | a jax.checkpoint_policies name
    m.attention = "auto"  # 'auto' (by platform) | 'closed_form' | 'xla' | 'splash' (TPU) | 'cudnn' (GPU); attention.py

    # 3D U-Net (diffusers UNet3DConditionModel field names; text-to-video-ms-1.7b's values).
    m.unet = u = ml_collections.ConfigDict()
    u.in_channels = 4  # input channels: the autoencoder's latent channels
    u.out_channels = 4  # output channels: the autoencoder's latent channels
    u.block_out_channels = (320, 640, 1280, 1280)  # channels per level; each level after the first halves H and W
    # Per level: 'CrossAttnDownBlock3D' (ResNets + spatial and temporal transformers) or 'DownBlock3D' (ResNets).
    u.down_block_types = ("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D")
    u.up_block_types = ("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")  # deepest first
    u.layers_per_block = 2  # ResNet (+ transformer) layers per down level; up levels have one more
    u.norm_num_groups = 32  # GroupNorm groups (must divide every block's channels)
    u.norm_eps = 1e-5  # GroupNorm epsilon of the ResNet blocks and conv_norm_out
    u.cross_attention_dim = 1024  # width of the text embeddings cross-attention reads (= model.text.width)
    u.attention_head_dim = 64  # size of one attention head; heads = channels // attention_head_dim
    u.transformer_in_heads = 8  # heads of transformer_in, the temporal transformer after conv_in
    u.temporal_dropout = 0.1  # dropout inside the temporal convolutions (training only)
    u.resnet_dropout = 0.0  # dropout inside the ResNet blocks (training only)
    u.addition_embed_type = None  # 'text': the pooled caption joins the time embedding; None = off (ModelScope)
    u.addition_embed_type_num_heads = 64  # heads of that caption pooling

    # Image Retention branch (a copy of the U-Net's encoder fed the reference image) and image_conv.
    m.retention = r = ml_collections.ConfigDict()
    r.image_input = "pixels"  # reference image as 'pixels' (image_conv downsamples) or as its 'latent' (one conv)
    r.image_conv_channels = (16, 32, 96, 256)  # image_conv channels ('pixels'); len - 1 = log2 of its downsampling
    r.image_channels = 3  # channels of the reference image
    r.conditioning_scale = 1.0  # scale of the branch's residuals into the U-Net (sampling-time knob)
    r.reference_skip = False  # x0 prediction += learnt zero-init gate * reference latent (needs 'latent' and x0)
    r.last_frame = False  # also take the video's last frame (first+last frame, loops); adds zero-init last_image_conv

    # Text encoder: CLIP text tower (OpenCLIP ViT-H/14's for ModelScope), frozen.
    m.text = t = ml_collections.ConfigDict()
    t.vocab_size = 49408  # CLIP BPE vocabulary size
    t.width = 1024  # embedding width
    t.num_layers = 24  # transformer layers in the tower
    t.num_heads = 16  # attention heads per layer
    t.context_length = 77  # token positions
    t.mlp_ratio = 4  # feed-forward width / embedding width
    t.output_layer = 23  # run this many layers, then the final LayerNorm (ModelScope: penultimate); None = all
    t.act = "gelu"  # feed-forward activation: 'gelu' (exact, OpenCLIP) | 'quick_gelu' (OpenAI CLIP)
    t.eps = 1e-5  # LayerNorm epsilon

    m.vae_kind = "kl"  # autoencoder: 'kl' (SD KL-f8, section vae) | 'patch' (lossless space-to-depth, section patch)

    # KL autoencoder (diffusers AutoencoderKL field names; SD KL-f8 as used by ModelScope-T2V), frozen.
    m.vae = v = ml_collections.ConfigDict()
    v.in_channels = 3  # image channels in
    v.out_channels = 3  # image channels out
    v.block_out_channels = (128, 256, 512, 512)  # channels per level; downsampling 2 ** (levels - 1)
    v.layers_per_block = 2  # ResNet layers per encoder level (decoder: one more)
    v.latent_channels = 4  # latent channels
    v.norm_num_groups = 32  # GroupNorm groups
    v.scaling_factor = 0.18215  # latents are multiplied by this after encoding (unit variance for diffusion)
    v.shift_factor = None  # subtracted before scaling; None = 0
    v.use_quant_conv = True  # 1x1 conv after the encoder
    v.use_post_quant_conv = True  # 1x1 conv before the decoder
    v.mid_block_add_attention = True  # self-attention in the encoder's and decoder's mid blocks

    # Patch "autoencoder" (vae_kind='patch'): parameter-free space-to-depth, for pixel-space diffusion on CPU.
    m.patch = p = ml_collections.ConfigDict()
    p.patch_size = 4  # p: (H, W, C) <-> (H/p, W/p, C*p*p)
    p.channels = 3  # image channels
    p.scaling_factor = 1.0  # latents are multiplied by this (aim for unit variance)

    config.init_from = ""  # base checkpoint dir (converted ModelScope weights) or a training workdir
    config.resume = ""  # a workdir or WORKDIR/checkpoints/<step> to resume when this workdir has no checkpoint

    # ---- train: what is trained and how (training/loop.py).
    config.train = tr = ml_collections.ConfigDict()
    tr.mode = "dreamvideo"  # 'dreamvideo' (retention branch + image) or 't2v' (primary U-Net, text only)
    tr.trainable = ()  # regexes over parameter paths (e.g. 'unet/down_blocks_0/.../kernel'); () = the mode's default
    # Low-rank adapters (dreamvideo_jax/lora) instead of `trainable` when lora.rank > 0: the whole model is frozen,
    # only the adapters' A and B train and have optimizer state; the run writes WORKDIR/adapter/ when it ends.
    tr.lora = ml_collections.ConfigDict()
    tr.lora.rank = 0  # 0 = off; e.g. 16
    tr.lora.alpha = 0.0  # the update is scaled by alpha / rank; 0 = rank (scale 1)
    tr.lora.targets = ()  # regexes over parameter paths or presets 'attention' | 'temporal' | 'branch'; () = attention
    tr.num_steps = 100_000  # training steps
    tr.batch_size = 8  # global batch, over all processes
    tr.per_device_batch_size = 0  # > 0: global batch = this x the mesh's data x fsdp devices (replaces batch_size)
    tr.learning_rate = 5e-5  # AdamW peak learning rate, reached after warmup_steps
    tr.lr_schedule = "cosine"  # after warmup: 'cosine' | 'linear' | 'constant'
    tr.warmup_steps = 500  # linear warmup steps from 0
    tr.min_lr_ratio = 0.0  # final lr = learning_rate * min_lr_ratio ('cosine' / 'linear')
    tr.adam_b1 = 0.9  # AdamW beta1
    tr.adam_b2 = 0.999  # AdamW beta2
    tr.adam_eps = 1e-8  # AdamW epsilon
    tr.weight_decay = 0.01  # decoupled, on kernels / embeddings only (not biases or norms)
    tr.grad_clip_norm = 1.0  # global-norm gradient clipping; 0 = none
    tr.ema_decay = 0.9999  # EMA of the trainable params; 0 = EMA equals the params
    tr.ema_warmup = False  # decay min(ema_decay, (1 + step) / (10 + step)) early on (diffusers' use_ema_warmup)
    tr.prediction_type = "eps"  # the network's target: 'eps' | 'v' | 'x0'
    tr.loss_weighting = "none"  # 'none' | 'min_snr_gamma'
    tr.snr_gamma = 5.0  # gamma of min_snr_gamma weighting
    tr.timestep_high_fraction = 0.0  # share of samples drawing t from [timestep_high_start, T); 0 = uniform (the paper)
    tr.timestep_high_start = 900  # lower end of that range
    tr.condition_dropout = 0.05  # p of each case: text only / both / image only dropped (t2v: text dropped w.p. 2p)
    # Keyframes each training clip is conditioned on, as relative weights (needs model.retention.last_frame for
    # first_last > 0): 'first' = the reference image alone, 'first_last' = also the clip's last frame. One model
    # then serves both (and loops, with the reference as the last frame); 'none' is condition_dropout's.
    tr.condition_modes = ml_collections.ConfigDict()
    tr.condition_modes.first = 1.0
    tr.condition_modes.first_last = 0.0
    tr.vae_sample = True  # encode frames by sampling the VAE posterior (False: its mean)
    tr.timestep_buckets = 10  # the loss is also logged per timestep bucket
    tr.nonfinite = "stop"  # non-finite loss or gradients: 'stop' (error naming the step) | 'skip' (drop the update)
    tr.checkpoint_every = 1000  # steps between checkpoints
    tr.keep_checkpoints = 3  # newest N checkpoints kept
    tr.keep_every = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
    tr.async_checkpointing = True  # write checkpoints in the background while training continues
    tr.corrupt_checkpoint = "error"  # unreadable latest checkpoint: 'error' | 'fallback' (to the previous one)
    tr.init_from_ema = True  # init_from a training workdir: take its EMA params (else its raw params)
    # Evaluation: the training loss (unweighted MSE, EMA weights, the same noise each time) on the first
    # eval_batches batches of data.eval_split, every eval_every steps and at the last step, logged as eval_loss.
    tr.eval_every = 0  # 0 = no evaluation
    tr.eval_batches = 8  # batches of train.batch_size clips per evaluation
    tr.log_every = 50  # metrics (JSONL + TensorBoard) every N steps; the loss is checked every step
    tr.progress_bar = True  # show a training progress bar

    # ---- diffusion: the training noise schedule (ModelScope-T2V's).
    config.diffusion = df = ml_collections.ConfigDict()
    df.beta_schedule = "scaled_linear"  # 'scaled_linear' | 'linear' | 'squaredcos_cap_v2' (cosine, no beta_start/end)
    df.beta_start = 0.00085  # first beta
    df.beta_end = 0.012  # last beta
    df.num_train_timesteps = 1000  # T
    df.rescale_zero_terminal_snr = False  # rescale the schedule so t = T-1 is pure noise (Lin et al. 2023)

    # ---- mesh: device mesh axis sizes; -1 = the devices left over (at most one axis).
    config.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1  # data parallelism: each slice sees distinct examples, parameters replicated
    ms.fsdp = 1  # fully sharded data parallelism: distinct examples, parameters and optimizer state sharded
    ms.tensor = 1  # tensor parallelism: attention heads, MLP and conv output channels split

    # ---- sharding: how logical parameter / activation axes map onto the mesh axes.
    config.sharding = sh = ml_collections.ConfigDict()
    # (logical axis, mesh axis | tuple of mesh axes | None), first match wins; a mesh axis that does not divide a
    # dimension is dropped for that dimension (replicated). Logical axis names: dreamvideo_jax/parallel/axes.py.
    sh.rules = (
        ("embed", "fsdp"),
        ("conv_in", "fsdp"),
        ("vocab", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("conv_out", "tensor"),
        ("kernel_space", None),
        ("norm", None),
        ("position", None),
        ("activation_batch", ("data", "fsdp")),
        ("activation_length", None),
        ("activation_embed", "tensor"),
        ("activation_height", None),
        ("activation_width", None),
    )
    sh.fsdp_min_size = 2**14  # params of >= this many elements the rules leave unsharded get sharded over 'fsdp'

    # ---- data: the input pipeline (data/pipeline.py).
    config.data = d = ml_collections.ConfigDict()
    d.dataset = "moving_shapes"  # 'moving_shapes' | 'video_folder' (a name under data_dir)
    d.data_dir = ""  # tfds data dir, local or gs://; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    d.config_name = ""  # build name; '' = derived from `build` (moving_shapes) or the only build present
    d.split = "train"  # training split
    d.eval_split = "validation"  # moving_shapes: 'validation' (seen combinations) or 'test' (held-out ones)
    d.num_frames = config.get_ref("num_frames")  # frames per clip: the model's (top-level num_frames)
    d.frame_stride = 1  # source frames between clip frames; clips start at random (train) or at the start (eval)
    d.height = config.get_ref("height")  # frames are resized (short side) and cropped to height x width
    d.width = config.get_ref("width")
    d.random_crop = False  # crop position when resizing: random (train only) or centre
    d.as_uint8 = False  # yield uint8 frames in [0, 255] (normalise on device: 4x less host memory / transfer)
    d.random_caption = True  # records with several captions (MSR-VTT): pick one at random when training
    d.max_length = 77  # token positions per caption (CLIP context length)
    d.pad_id = 49407  # id after <|endoftext|>: 49407 (EOT, CLIP/SD1 folders) or 0 (open_clip.tokenize, ModelScope)
    d.shuffle = True  # global index permutation (no buffer), reshuffled every epoch
    d.seed = 0  # shuffling seed
    d.num_epochs = -1  # -1 = repeat forever
    d.worker_count = 0  # grain worker processes (0 = threads in this process)
    d.read_threads = 2  # threads reading and transforming records
    d.prefetch = 2  # batches prefetched (per worker when worker_count > 0)
    d.max_bad_records = 1000  # stop with an error after this many unusable records in a row; 0 = skip them forever
    d.auto_build = True  # synthetic data: built into data_dir on first use when missing (race-safe)
    d.build = b = ml_collections.ConfigDict()  # moving_shapes dataset build parameters
    b.size = 32  # frame size in pixels
    b.frames = 8  # frames per stored clip
    b.num_train = 5000  # clips in the train split
    b.num_validation = 500  # clips in the validation split (shape/colour/motion combinations seen in train)
    b.num_test = 500  # clips in the test split (held-out combinations)
    b.seed = 0  # build seed
    b.min_object = 0  # smallest object in pixels; 0 = scale with size (6 px at 32)
    b.max_object = 0  # largest object in pixels; 0 = scale with size (10 px at 32)
    b.min_speed = 0  # slowest motion in px/frame; 0 = scale with size (1 at 32)
    b.max_speed = 0  # fastest motion in px/frame; 0 = scale with size (2 at 32; 1 with centred_start at 32x32x8)
    b.centred_start = 1  # frame 0's object drawn from the box every motion fits from (the image hides the motion)

    # ---- sample: sampling defaults (sampling/pipeline.py); each can be overridden per call or by a CLI flag.
    config.sample = s = ml_collections.ConfigDict()
    s.image_guidance = 1.5  # s_I in eps = u + s_I (img - u) + s_T (img,txt - img); 0 ignores the image's pull
    s.text_guidance = 7.5  # s_T; both 1.0 = the plain conditional prediction (no guidance)
    s.steps = 50  # model evaluations (each one batched forward over the 3 guidance branches)
    s.sampler = "ddim"  # 'ddim' | 'dpmpp_2m' (DPM-Solver++(2M); ~20-25 steps match 50 DDIM steps)
    s.eta = 0.0  # DDIM noise (0 = deterministic); DPM-Solver++(2M) is always deterministic
    s.motion_strength = 1.0  # [0, 1]: below 1, start from the noised still video and run the last part of the steps
    s.seed = 0  # sample b of a batch uses seed + b, so any sample can be reproduced alone
    s.num_frames = 0  # frames to generate; 0 = the top-level num_frames
    s.height = 0  # 0 = the top-level height
    s.width = 0  # 0 = the top-level width
    s.timestep_spacing = "leading"  # 'leading' (ModelScope's DDIM) | 'trailing' | 'linspace'
    s.steps_offset = 1  # added to every sampling timestep (ModelScope: 1)
    s.set_alpha_to_one = False  # last step to abar = 1 (True) or to abar_0 (False, ModelScope)
    s.loop = "python"  # 'python' (a loop over one compiled step, progress bar) | 'scan' (one lax.scan)
    s.first_frame_replacement = False  # pin frame 0 (and a given last frame) to the noised keyframe latent per step
    s.seamless_loop = False  # a loop: the last frame is the reference image (needs retention.last_frame or replacement)
    s.negative_prompt = ""  # text of the unconditional / image-only branches ('' = unconditional)
    s.decode_chunk_size = 8  # frames per sample decoded at once by the VAE (0 = all); lower to save memory
    s.fps = 8.0  # frame rate of written videos (ModelScope-T2V: 8)
    s.tokenizer = ""  # CLIP tokenizer folder; '' = the checkpoint's tokenizer/ folder, else CLIP built offline
    s.stages = 0  # chained stages of the sample command; 0 = one per prompt given (more repeat the last prompt)
    s.drop_repeated_frame = False  # leave out each later stage's first frame (= the previous last) when joining
    return config
