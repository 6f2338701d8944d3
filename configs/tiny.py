"""Tiny DreamVideo for CPU tests: every network tiny, 4 frames at 16x16 pixels, real code paths (KL VAE, CLIP).

  python -m dreamvideo_jax.train --config=configs/tiny.py --workdir=/tmp/dreamvideo_tiny
"""

import os
import runpy

# Config files are loaded by path from any working directory: read base.py beside this file, not by import.
_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(arg=None):
    config = _base["get_config"](arg)
    config.num_frames = 4
    config.height = 16
    config.width = 16
    m = config.model
    m.unet.block_out_channels = (16, 32)
    m.unet.down_block_types = ("CrossAttnDownBlock3D", "DownBlock3D")
    m.unet.up_block_types = ("UpBlock3D", "CrossAttnUpBlock3D")
    m.unet.layers_per_block = 1
    m.unet.norm_num_groups = 8
    m.unet.attention_head_dim = 8
    m.unet.cross_attention_dim = 32
    m.unet.transformer_in_heads = 2
    m.retention.image_conv_channels = (8, 16)
    m.text.width = 32
    m.text.num_layers = 2
    m.text.num_heads = 4
    m.text.output_layer = 1
    m.vae.block_out_channels = (16, 32)
    m.vae.layers_per_block = 1
    m.vae.norm_num_groups = 8

    t = config.train
    t.num_steps = 100
    t.learning_rate = 1e-3
    t.warmup_steps = 10
    t.ema_decay = 0.99
    t.checkpoint_every = 50
    t.log_every = 10

    d = config.data  # moving_shapes, built into data_dir on first use (about a second)
    d.pad_id = 0  # as ModelScope (open_clip.tokenize)
    d.build.size = 16
    d.build.centred_start = 0  # 16 px is too small for an object to move 7 px either way from frame 0
    d.build.num_train, d.build.num_validation, d.build.num_test = 512, 64, 64
    return config
