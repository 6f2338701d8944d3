"""Full-size DreamVideo on the ModelScope-T2V base: 256x256, 16 frames, SD KL-f8 VAE, OpenCLIP ViT-H text tower.

Architecture only matches `text-to-video-ms-1.7b` (diffusers layout), so converted weights load into it.
Parameters of this size are never allocated in tests (they use `jax.eval_shape`).

  python -m dreamvideo_jax.train --config=configs/modelscope_t2v.py --workdir=gs://BUCKET/runs/dreamvideo
"""

import ml_collections

from dreamvideo_jax.data import config as data_config
from dreamvideo_jax.diffusion import schedules
from dreamvideo_jax.models.build import model_defaults
from dreamvideo_jax.parallel import mesh as mesh_lib
from dreamvideo_jax.sampling import config as sampling_config
from dreamvideo_jax.training import config as train_config


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_frames = 16
    config.height = 256
    config.width = 256
    config.model = model_defaults()

    # Training (dreamvideo_jax.training.config documents every key).
    config.init_from = ""  # base checkpoint dir (converted ModelScope weights) or a training workdir
    config.resume = ""  # a workdir or WORKDIR/checkpoints/<step> to resume when this workdir has no checkpoint
    config.train = train_config.train_defaults()
    config.diffusion = ml_collections.ConfigDict(dict(schedules.DEFAULTS))
    config.mesh = mesh_lib.mesh_defaults()
    config.mesh.data, config.mesh.fsdp = 1, -1  # FSDP over every chip: the frozen base alone is ~8 GB in fp32
    config.sharding = mesh_lib.sharding_defaults()

    config.data = data_config.defaults()
    config.data.dataset = "video_folder"  # e.g. WebVid built with `python -m dreamvideo_jax.data.build`
    config.data.num_frames = config.get_ref("num_frames")
    config.data.height = config.get_ref("height")
    config.data.width = config.get_ref("width")
    config.data.frame_stride = 4
    config.data.worker_count = 8
    config.data.pad_id = 0  # ModelScope tokenised with open_clip.tokenize, which pads with 0

    config.sample = sampling_config.defaults()  # DDIM 50 steps, ModelScope's timesteps
    return config
