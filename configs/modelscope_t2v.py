"""Full-size DreamVideo on the ModelScope-T2V base: 256x256, 16 frames, SD KL-f8 VAE, OpenCLIP ViT-H text tower.

Architecture only matches `text-to-video-ms-1.7b` (diffusers layout), so converted weights load into it.
Parameters of this size are never allocated in tests (they use `jax.eval_shape`). `configs/base.py` lists every
key; this file sets the data and mesh for a real run.

  python -m dreamvideo_jax.train --config=configs/modelscope_t2v.py --workdir=gs://BUCKET/runs/dreamvideo
"""

import os
import runpy

# Config files are loaded by path from any working directory: read base.py beside this file, not by import.
_base = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "base.py"))


def get_config(arg=None):
    del arg
    config = _base["get_config"]()
    config.mesh.data, config.mesh.fsdp = 1, -1  # FSDP over every chip: the frozen base alone is ~8 GB in fp32
    config.train.per_device_batch_size = 1  # one 16-frame 256² clip per chip: the global batch scales with the slice

    d = config.data
    d.dataset = "video_folder"  # e.g. WebVid built with `python -m dreamvideo_jax.data.build`
    d.frame_stride = 4
    d.worker_count = 8
    d.pad_id = 0  # ModelScope tokenised with open_clip.tokenize, which pads with 0
    return config
