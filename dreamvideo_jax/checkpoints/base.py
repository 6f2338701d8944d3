"""The base format: a frozen set of parameters in the system's layout plus the `model` config section.

Written by the converter for pretrained weights and by training for the initial weights of its workdir:

  PATH/params/             orbax (StandardCheckpointer) checkpoint of the layout dict {'unet', 'text_encoder',
                           'vae', ...} (no 'vae' for the parameter-free patch autoencoder; a DreamVideo workdir's
                           base also holds 'retention', 'image_conv' and, when used, 'reference_skip')
  PATH/model_config.json   the `model` config section as JSON

Readable with plain orbax and json, without this project's code.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dreamvideo_jax import config_io
from dreamvideo_jax.errors import CheckpointError, one_line
from dreamvideo_jax.parallel import sharding
from dreamvideo_jax.system import shape_diffs

BASE_PARAMS = "params"
BASE_MODEL_CONFIG = "model_config.json"


def is_base(path: str) -> bool:
    return (epath.Path(path) / BASE_MODEL_CONFIG).exists()


def is_primary() -> bool:
    return jax.process_index() == 0


def _config_dict(model_config) -> dict:
    d = model_config.to_dict() if isinstance(model_config, ml_collections.ConfigDict) else dict(model_config)
    return json.loads(json.dumps(d, default=config_io.json_default))


def _drop_empty(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if not (isinstance(v, dict) and not jax.tree.leaves(v))}


def save_base(path: str, params_dict: dict, model_config: Any, *, overwrite: bool = False) -> None:
    """Writes `params_dict` ({'unet', 'text_encoder', 'vae', ...} of arrays) and the model config in base format.

    Arrays may be numpy or (sharded, multi-process) jax arrays; every process must call this when they are
    global jax arrays. Empty sub-trees (the patch autoencoder's 'vae') are left out.

    Raises:
      CheckpointError: if `path` already holds a base and `overwrite` is False.
    """
    root = epath.Path(path)
    params_path = root / BASE_PARAMS
    if params_path.exists():
        if not overwrite:
            raise CheckpointError(f"base checkpoint {params_path} already exists")
        if is_primary():
            params_path.rmtree()
    tree = _drop_empty(sharding.unbox(dict(params_dict)))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_path, tree)
        ckptr.wait_until_finished()
    if is_primary():
        (root / BASE_MODEL_CONFIG).write_text(json.dumps(_config_dict(model_config), indent=2, sort_keys=True))
    sync_processes("save_base")


def read_model_config(path: str) -> ml_collections.ConfigDict:
    p = epath.Path(path) / BASE_MODEL_CONFIG
    if not p.exists():
        raise CheckpointError(f"{path} is not a base checkpoint: {p} is missing")
    try:
        return ml_collections.ConfigDict(json.loads(p.read_text()))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({one_line(e)})") from None


def base_shapes(path: str) -> dict:
    """{name: shape tree} of a base checkpoint, from its metadata (no array is read)."""
    meta = ocp.StandardCheckpointer().metadata(epath.Path(path) / BASE_PARAMS)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: tuple(m.shape), dict(tree), is_leaf=lambda x: hasattr(x, "shape"))


def load_base(path: str, *, target: Any = None) -> tuple[dict, ml_collections.ConfigDict]:
    """Reads a base checkpoint: `(params_dict, model_config)`.

    Args:
      path: the base directory (holding `params/` and `model_config.json`).
      target: optional abstract tree (`jax.ShapeDtypeStruct`s with shardings) for some or all of the stored
        keys; those are restored sharded onto the target's devices. Without it every array is a numpy array.

    Raises:
      CheckpointError: missing files, or stored shapes that differ from `target`.
    """
    model_config = read_model_config(path)
    params_path = epath.Path(path) / BASE_PARAMS
    if not params_path.exists():
        raise CheckpointError(f"{path} is not a base checkpoint: {params_path} is missing")
    try:
        stored = base_shapes(path)
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise CheckpointError(f"base checkpoint {params_path} is unreadable: {one_line(e)}") from e
    if target is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored,
                                    is_leaf=lambda x: isinstance(x, tuple))
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                params = ckptr.restore(params_path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        except Exception as e:  # noqa: BLE001 - reported with the path
            raise CheckpointError(f"base checkpoint {params_path} is unreadable: {one_line(e)}") from e
        return dict(params), model_config
    target = dict(target)
    missing = sorted(set(target) - set(stored))
    if missing:
        raise CheckpointError(f"base checkpoint {path} has no {missing} (it holds {sorted(stored)})")
    want = jax.tree.map(lambda a: tuple(a.shape), target)
    have = {k: stored[k] for k in target}
    diffs = shape_diffs(have, want)
    if diffs:
        raise CheckpointError(f"base checkpoint {path} does not match the model: " + "; ".join(diffs[:8])
                              + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""))
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                               dtype=a.dtype), target)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            params = ckptr.restore(params_path, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # noqa: BLE001 - reported with the path
        raise CheckpointError(f"base checkpoint {params_path} is unreadable: {one_line(e)}") from e
    return {k: params[k] for k in target}, model_config


def sync_processes(name: str) -> None:
    """A barrier over all processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
