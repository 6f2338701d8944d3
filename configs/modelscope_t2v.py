"""Full-size DreamVideo on the ModelScope-T2V base: 256x256, 16 frames, SD KL-f8 VAE, OpenCLIP ViT-H text tower.

Architecture only matches `text-to-video-ms-1.7b` (diffusers layout), so converted weights load into it.
Parameters of this size are never allocated in tests (they use `jax.eval_shape`).

  python -m dreamvideo_jax.train --config=configs/modelscope_t2v.py --workdir=gs://BUCKET/runs/dreamvideo
"""

import ml_collections

from dreamvideo_jax.models.build import model_defaults


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_frames = 16
    config.height = 256
    config.width = 256
    config.model = model_defaults()
    return config
