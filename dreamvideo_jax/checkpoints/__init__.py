"""Checkpoints, below training and sampling: the base format, training checkpoints, workdirs, and `load`.

  from dreamvideo_jax import checkpoints
  loaded = checkpoints.load("/runs/dreamvideo")          # or WORKDIR/checkpoints/<step>, or a base folder
  loaded.config, loaded.params                           # params in the system's layout (numpy)

Modules: `base` (the base format), `manager` (orbax CheckpointManager of training checkpoints), `workdir`
(workdir layout, the parser of weights paths, `read_config`, `load`). Errors: `dreamvideo_jax.errors`.
"""

from dreamvideo_jax.checkpoints.base import base_shapes, is_base, load_base, read_model_config, save_base
from dreamvideo_jax.checkpoints.manager import Checkpointer, Restored
from dreamvideo_jax.checkpoints.workdir import (
    BASE_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    Loaded,
    Location,
    checkpoint_dir,
    is_workdir,
    load,
    load_trainable,
    locate,
    read_config,
    read_workdir_config,
    steps,
    write_workdir_config,
)
from dreamvideo_jax.errors import CheckpointError

__all__ = [
    "BASE_DIR", "CHECKPOINT_DIR", "CONFIG_FILE", "CheckpointError", "Checkpointer", "Loaded", "Location", "Restored",
    "base_shapes", "checkpoint_dir", "is_base", "is_workdir", "load", "load_base", "load_trainable", "locate",
    "read_config", "read_model_config", "read_workdir_config", "save_base", "steps", "write_workdir_config",
]
