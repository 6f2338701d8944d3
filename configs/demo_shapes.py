"""The CPU demo: a tiny DreamVideo on moving shapes (32x32, 8 frames), trained in two stages as in the paper.

Stage 1 (`get_config("t2v")`): a text-to-video base, the primary U-Net alone, all layers trained.
Stage 2 (`get_config()`): DreamVideo initialised from stage 1 (retention branch = copy of its encoder),
spatial layers frozen except the primary's cross-attention; the primary's temporal layers and cross-attention,
the branch, image_conv and the reference skip's gate are trained.

Pixel-space diffusion (a lossless space-to-depth x4 "autoencoder", 8x8x48 latents), a 2-level U-Net and a text
tower without transformer layers keep a step cheap enough for minutes of CPU training. What each setting below
bought, measured: WORKSPACE.md, "Demo config: what each setting bought".

  python -m dreamvideo_jax.demo --workdir=runs/demo          # both stages, then sampling and metrics
  python -m dreamvideo_jax.train --config=configs/demo_shapes.py:t2v --workdir=runs/demo/stage1_t2v
"""

import os
import runpy

# Config files are loaded by path from any working directory: read base.py beside this file, not by import.
_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(arg=None):
    stage = arg or "dreamvideo"
    if stage not in ("t2v", "dreamvideo"):
        raise ValueError(f"demo_shapes: config argument {stage!r}; use 't2v' or 'dreamvideo'")
    config = _base["get_config"]()
    config.num_frames = 8
    config.height = 32
    config.width = 32

    m = config.model
    m.vae_kind = "patch"  # pixel space through a lossless space-to-depth x4: 8x8x48 latents
    m.patch.patch_size = 4
    m.patch.scaling_factor = 4.0  # the pixels' std is ~0.215: scale to ~unit variance, as SD's 0.18215 does
    u = m.unet
    u.in_channels = u.out_channels = 48
    u.block_out_channels = (32, 64)
    # Attention (spatial + temporal transformers) at the 4x4 level and the mid block only: 8x8 costs CPU time.
    u.down_block_types = ("DownBlock3D", "CrossAttnDownBlock3D")
    u.up_block_types = ("CrossAttnUpBlock3D", "UpBlock3D")
    u.layers_per_block = 1
    u.norm_num_groups = 16
    u.attention_head_dim = 16
    u.cross_attention_dim = 64
    u.transformer_in_heads = 4
    u.temporal_dropout = 0.0
    m.retention.image_input = "latent"  # the reference as its (lossless) patch latent through one zero-init conv
    m.retention.image_conv_channels = (16, 32, 64)  # used by image_input="pixels"
    m.retention.reference_skip = True  # predict what changes against the reference (not in the paper)
    t = m.text
    # A frozen random tower without transformer layers (embeddings + final LayerNorm): random layers blur the
    # captions together, the embeddings alone keep each word distinct.
    t.width, t.num_layers, t.num_heads, t.output_layer = 64, 0, 4, None
    t.context_length = 12  # the longest caption ("a magenta triangle moves down-right") is 9 tokens with BOS/EOS
    config.diffusion.rescale_zero_terminal_snr = True  # t = 999 is pure noise, as the first sampling step

    tr = config.train
    tr.mode = stage
    tr.prediction_type = "x0"  # the reference skip adds to an x0 prediction
    tr.num_steps = 600 if stage == "t2v" else 1500  # stage 2's length moves the direction accuracy; fits 15 min
    tr.learning_rate = 1e-3
    tr.warmup_steps = 100
    tr.weight_decay = 0.0
    tr.ema_decay = 0.995
    if stage == "dreamvideo":
        tr.timestep_high_fraction = 0.6  # 60% of the samples from t >= 900, where the caption matters
        # The paper's DreamVideo set (the primary's temporal layers, the branch, image_conv), plus the primary's
        # cross-attention (a minutes-old base does not follow text yet) and the reference skip's gate.
        tr.trainable = (r"^unet/.*(temp_convs|temp_attentions|transformer_in)", r"^retention/", r"^image_conv/",
                        r"^unet/.*attn2", r"^reference_skip/", r"^last_image_conv/")
        # First+last-frame conditioning for 30% of the clips (the rest: first frame only), so the one model also
        # makes videos that end on a given frame, and loops.
        m.retention.last_frame = True
        tr.condition_modes.first, tr.condition_modes.first_last = 0.7, 0.3
    tr.checkpoint_every = 500  # a save costs ~7 s of step time; an interruption loses at most ~4 min
    tr.keep_checkpoints = 1
    tr.log_every = 50

    config.data.max_length = t.context_length

    s = config.sample
    s.steps = 20
    s.text_guidance = 4.0
    s.image_guidance = 1.0  # the guided x0 then contains the reference skip exactly once
    s.timestep_spacing = "trailing"  # with the zero-terminal-SNR schedule: start from t=999, pure noise
    return config
