"""Default ``config.data`` section (``config.data = data.config.defaults()`` in ``configs/*.py``)."""

from __future__ import annotations

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """The data section with every key the input pipeline reads. Defaults: the 32x32 moving-shapes demo."""
    c = ml_collections.ConfigDict()
    c.dataset = "moving_shapes"  # 'moving_shapes' | 'video_folder' (a name under data_dir)
    c.data_dir = ""  # tfds data dir, local or gs://; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.config_name = ""  # build name; '' = derived from `build` (moving_shapes) or the only build present
    c.split = "train"
    c.eval_split = "validation"  # moving_shapes: 'validation' (seen combinations) or 'test' (held-out ones)
    # Clip sampling: `num_frames` frames `frame_stride` apart from a random start (train) / the start (eval).
    c.num_frames = 8
    c.frame_stride = 1
    c.height = 32  # frames are resized (short side) and cropped when the stored size differs
    c.width = 32
    c.random_crop = False  # crop position when resizing: random (train only) or centre
    c.as_uint8 = False  # yield uint8 frames in [0, 255] (normalise on device: 4x less host memory / transfer)
    c.random_caption = True  # records with several captions (MSR-VTT): pick one at random when training
    # Text.
    c.max_length = 77  # CLIP context length
    c.pad_id = 49407  # id after <|endoftext|>: 49407 (EOT, CLIP/SD1 folders) or 0 (open_clip.tokenize, ModelScope)
    # Order and throughput. Shuffling is a global index permutation (no buffer), reshuffled every epoch.
    c.shuffle = True
    c.seed = 0
    c.num_epochs = -1  # -1 = repeat forever
    c.worker_count = 0  # grain worker processes (0 = threads in this process)
    c.read_threads = 2  # threads reading and transforming records
    c.prefetch = 2  # batches prefetched (per worker when worker_count > 0)
    # Training stops with an error after this many unusable records in a row (0 = skip them forever).
    c.max_bad_records = 1000
    # Synthetic data: built into data_dir on first use when missing (idempotent, safe when processes race).
    c.auto_build = True
    c.build = ml_collections.ConfigDict()
    c.build.size = 32
    c.build.frames = 8
    c.build.num_train = 5000
    c.build.num_validation = 500
    c.build.num_test = 500
    c.build.seed = 0
    c.build.min_object = 0  # 0 = scale with size (6 px at 32)
    c.build.max_object = 0  # 0 = scale with size (10 px at 32)
    c.build.min_speed = 0  # 0 = scale with size (1 px/frame at 32)
    c.build.max_speed = 0  # 0 = scale with size (2 px/frame at 32; 1 with centred_start at 32x32x8)
    # Frame 0's object drawn from the box every motion fits from: the reference image says nothing about the motion.
    c.build.centred_start = 1
    return c
