"""Training workdirs and the one reader of a weights path: `locate` parses it, `read_config` and `load` read it.

Workdir layout (everything readable with plain orbax / json, without this project's code):

  WORKDIR/config.json                 the full config of the latest run (JSON)
  WORKDIR/base/                       the initial parameters in base format (`checkpoints.base`)
  WORKDIR/checkpoints/<step>/         training checkpoints (`checkpoints.manager`)
  WORKDIR/tokenizer/                  optional: the tokenizer the model was trained with
  WORKDIR/metrics.jsonl, WORKDIR/tensorboard/   metrics

A weights path is one of: a training workdir (its latest checkpoint, or a given step), `WORKDIR/checkpoints/<step>`,
or a base checkpoint folder (converted pretrained weights). `load` returns the config and the parameters in the
system's layout (numpy) -- the only place where stored trees become the in-memory layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dreamvideo_jax import config_io, system as system_lib
from dreamvideo_jax.checkpoints.base import BASE_MODEL_CONFIG, base_shapes, is_base, load_base, read_model_config
from dreamvideo_jax.checkpoints.manager import Checkpointer
from dreamvideo_jax.data import tokenizer
from dreamvideo_jax.diffusion import schedules
from dreamvideo_jax.errors import CheckpointError, InputError, one_line

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BASE_DIR = "base"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"


def checkpoint_dir(workdir: str) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


def is_workdir(path: str) -> bool:
    p = epath.Path(path)
    return (p / CONFIG_FILE).exists() and (p / BASE_DIR).exists()


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict | None:
    p = epath.Path(workdir) / CONFIG_FILE
    if not p.exists():
        return None
    try:
        return ml_collections.ConfigDict(json.loads(p.read_text()))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({one_line(e)})") from None


def write_workdir_config(workdir: str, config) -> None:
    if jax.process_index() == 0:
        (epath.Path(workdir) / CONFIG_FILE).write_text(config_io.to_json(config))


def steps(workdir: str) -> list[int]:
    """The checkpoint steps of a workdir, oldest first ([] when it has none)."""
    if not checkpoint_dir(workdir).exists():
        return []
    ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True, use_async=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


@dataclasses.dataclass(frozen=True)
class Location:
    """What a weights path is: kind 'base' (`root` = the base folder) or 'workdir' (`root` = the workdir, `step`
    given by a `WORKDIR/checkpoints/<step>` path, else None)."""

    kind: str
    root: str
    step: int | None = None


def locate(path: str, name: str = "checkpoint") -> Location:
    """Parses a weights path (the only parser of `WORKDIR/checkpoints/<step>`).

    Raises:
        InputError: naming `--{name}` when the path does not exist or is none of the three kinds.
    """
    path = os.fspath(path).rstrip("/")
    if "://" not in path and not os.path.exists(path):
        raise InputError(name, path, "no such file or directory")
    if is_base(path):
        return Location("base", path)
    p = epath.Path(path)
    if p.name.isdigit() and p.parent.name == CHECKPOINT_DIR:
        root = os.fspath(p.parent.parent)
        if not is_workdir(root):
            raise InputError(name, path, f"{root} is not a training workdir ({CONFIG_FILE} and {BASE_DIR}/ are "
                                         "missing)")
        return Location("workdir", root, int(p.name))
    if is_workdir(path):
        return Location("workdir", path)
    raise InputError(name, path, f"not a checkpoint: expected a training workdir, WORKDIR/{CHECKPOINT_DIR}/<step>, "
                                 f"or a base folder with {BASE_MODEL_CONFIG}")


def load_trainable(workdir: str, step: int | None = None, use_ema: bool = True) -> tuple[dict, int]:
    """The trainable params (numpy) of a workdir's checkpoint `step` (default latest): `(tree, step)`."""
    ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True, use_async=False)
    try:
        all_steps = ckpt.all_steps()
        if not all_steps:
            raise CheckpointError(f"{workdir} has no checkpoint")
        step = all_steps[-1] if step is None else int(step)
        if step not in all_steps:
            raise CheckpointError(f"{workdir} has no checkpoint at step {step} (steps: {all_steps})")
        item = "ema" if use_ema else "params"
        path = epath.Path(ckpt.step_path(step)) / item
        try:
            with ocp.PyTreeCheckpointer() as c:
                meta = c.metadata(path)
                tree = getattr(meta, "item_metadata", meta)
                tree = getattr(tree, "tree", tree)
                restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree),
                                            is_leaf=lambda x: hasattr(x, "shape"))
                params = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is unreadable: {one_line(e)}") from e
        return dict(params), step
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------------------------------------------
# Reading a weights path


@dataclasses.dataclass
class Loaded:
    """Weights plus where they came from."""

    config: ml_collections.ConfigDict
    params: dict  # the system's layout, numpy
    source: str  # human-readable description, e.g. "workdir /runs/a, step 2000, EMA weights"
    step: int | None = None
    tokenizer_dir: str | None = None  # a tokenizer folder shipped with the weights, if any


def base_mode(model_keys) -> str:
    """'dreamvideo' when stored parameter groups include the image-retention branch, else 't2v'."""
    return "dreamvideo" if all(k in model_keys for k in system_lib.BRANCH_GROUPS) else "t2v"


def base_config(model_config, mode: str, config=None) -> ml_collections.ConfigDict:
    """The config of a base checkpoint: `config` (or, without one, ModelScope-T2V's clip size, schedule, eps
    prediction and prompt padding) with the stored `model` section and `train.mode`."""
    if config is None:
        c = ml_collections.ConfigDict()
        c.num_frames, c.height, c.width = 16, 256, 256
        c.diffusion = ml_collections.ConfigDict(dict(schedules.DEFAULTS))
        c.train = ml_collections.ConfigDict(dict(mode=mode, prediction_type="eps"))
        # ModelScope-T2V tokenised its captions with open_clip.tokenize, which pads with 0.
        c.data = ml_collections.ConfigDict(dict(pad_id=tokenizer.OPENCLIP_PAD_ID))
    else:
        c = ml_collections.ConfigDict(config_io.to_dict(config))
        if "model" in c and config_io.diff(c.model.to_dict(), config_io.to_dict(model_config)):
            log.warning("the checkpoint's model architecture differs from the config's; using the checkpoint's")
        if "train" not in c:
            c.train = ml_collections.ConfigDict(dict(mode=mode, prediction_type="eps"))
        else:
            c.train.mode = mode
    c.model = ml_collections.ConfigDict(config_io.to_dict(model_config))
    return c


def read_config(path: str, config=None, name: str = "checkpoint") -> tuple[ml_collections.ConfigDict, Location]:
    """The config stored with a weights path, read cheaply (no weights): a workdir's `config.json`, or a base's
    `model_config.json` over `config` (see :func:`base_config`). `config`'s `sample` section, when given,
    replaces the stored one; a different architecture in `config` is logged and the stored one kept."""
    loc = locate(path, name)
    if loc.kind == "base":
        try:
            mode = base_mode(base_shapes(loc.root))
        except Exception as e:  # noqa: BLE001 - reported with the path
            raise CheckpointError(f"--{name}={path}: base checkpoint is unreadable: {one_line(e)}") from e
        return base_config(read_model_config(loc.root), mode, config), loc
    stored = read_workdir_config(loc.root)
    if config is not None and "model" in config:
        diffs = system_lib.architecture_diff(stored.to_dict(), config)
        if diffs:
            log.warning("the config's architecture differs from the one stored in %s (%s); using the stored one",
                        loc.root, "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else ""))
    if config is not None and "sample" in config:
        stored.sample = ml_collections.ConfigDict(config_io.to_dict(config.sample))
    return stored, loc


def load(path: str, step: int | None = None, use_ema: bool = True, config=None,
         name: str = "checkpoint") -> Loaded:
    """Config and weights (numpy, in the system's layout) of a weights path.

    Args:
        path: a training workdir (latest checkpoint, or `step`), `WORKDIR/checkpoints/<step>`, or a base folder.
        step: checkpoint step of a workdir (None = the latest; a workdir without checkpoints yields its initial
            weights).
        use_ema: the EMA of the trained parameters (True) or the raw ones.
        config: optional config: its `sample` section is kept; for a base it supplies everything but `model`.
        name: the flag named in errors.

    Raises:
        InputError: a path or step that does not exist (naming the flag).
        CheckpointError: unreadable files (naming them).
    """
    cfg, loc = read_config(path, config, name)
    tok = os.path.join(loc.root, TOKENIZER_DIR)
    tok = tok if os.path.isdir(tok) else None
    if loc.kind == "base":
        if step is not None:
            raise InputError("step", step, f"{path} is a base checkpoint, which has no steps")
        params, _ = load_base(loc.root)
        return Loaded(cfg, params, f"base checkpoint {loc.root}", None, tok)
    if loc.step is not None:
        if step is not None and step != loc.step:
            raise InputError("step", step, f"differs from the step of --{name}={path}")
        step = loc.step
    available = steps(loc.root)
    if step is not None and step not in available:
        raise InputError("step", step, f"{loc.root} has no checkpoint at that step (steps: {available or 'none'})")
    params, _ = load_base(os.fspath(epath.Path(loc.root) / BASE_DIR))
    loaded_step = None
    if available:
        trainable, loaded_step = load_trainable(loc.root, step, use_ema)
        params = merge_stored(params, trainable, cfg)
    what = "initial weights (no checkpoint yet)" if loaded_step is None else (
        f"step {loaded_step}, {'EMA' if use_ema else 'raw'} weights")
    return Loaded(cfg, params, f"workdir {loc.root}, {what}", loaded_step, tok)


def merge_stored(base: dict, trainable: dict, config=None) -> dict:
    """A base dict with a checkpoint's trainable tree merged in by path; when `config` (the workdir's) trained LoRA
    adapters, the trainable tree is the adapters and they are merged into the base's kernels."""
    from dreamvideo_jax import lora as lora_lib

    spec = lora_lib.spec_from_config(config) if config is not None else None
    if spec is not None:
        return lora_lib.apply(base, [(trainable, spec.factor)])
    flat = system_lib.flatten(base)
    flat.update(system_lib.flatten(trainable))
    return {**base, **system_lib.unflatten(flat)}
