"""Checkpoints: training checkpoints, the frozen "base" format, and loading a workdir for inference.

Workdir layout (everything readable with plain orbax / json, without this project's code):

  WORKDIR/config.json                 the full config of the latest run (JSON)
  WORKDIR/base/params/                orbax checkpoint of the initial parameters (see below)
  WORKDIR/base/model_config.json      the `model` config section
  WORKDIR/checkpoints/<step>/         one orbax CheckpointManager step, with items
      params/      trainable parameters (nested dict of arrays, paths as in the model, e.g. unet/.../kernel)
      ema/         EMA of the trainable parameters (same tree)
      opt_state/   optax state as a nested dict (`flax.serialization.to_state_dict`)
      meta/        {'step': int32, 'rng': uint32 key data}
      data/        data-iterator state, one `process_<i>-of-<n>.json` per process
      config/      the config at save time (JSON)
  WORKDIR/metrics.jsonl, WORKDIR/tensorboard/   metrics

Base format (`save_base` / `load_base`; written by the converter for pretrained weights and by training for its
workdir): `PATH/params` is an orbax (StandardCheckpointer) checkpoint of a dict of parameter trees
`{'unet': ..., 'text_encoder': ..., 'vae': ...}` (no 'vae' for the parameter-free patch autoencoder; a training
workdir's base also holds 'retention' and 'image_conv' in mode 'dreamvideo'), and `PATH/model_config.json` is the
`model` config section as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

from dreamvideo_jax.training import config as tc

log = logging.getLogger(__name__)

BASE_PARAMS = "params"
BASE_MODEL_CONFIG = "model_config.json"
CONFIG_FILE = "config.json"
BASE_DIR = "base"
CHECKPOINT_DIR = "checkpoints"
TEXT_ENCODER, VAE = "text_encoder", "vae"
NON_MODEL_KEYS = (TEXT_ENCODER, VAE)


class CheckpointError(RuntimeError):
    """A checkpoint or base directory that cannot be used (missing, unreadable, incompatible)."""


# ----------------------------------------------------------------------------------------------------------------
# Base format


def _is_primary() -> bool:
    return jax.process_index() == 0


def _config_dict(model_config) -> dict:
    d = model_config.to_dict() if isinstance(model_config, ml_collections.ConfigDict) else dict(model_config)
    return json.loads(json.dumps(d, default=tc._json_default))


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
        if _is_primary():
            params_path.rmtree()
    from dreamvideo_jax.parallel.sharding import unbox

    tree = _drop_empty(unbox(dict(params_dict)))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_path, tree)
        ckptr.wait_until_finished()
    if _is_primary():
        (root / BASE_MODEL_CONFIG).write_text(json.dumps(_config_dict(model_config), indent=2, sort_keys=True))
    _sync("save_base")


def read_model_config(path: str) -> ml_collections.ConfigDict:
    p = epath.Path(path) / BASE_MODEL_CONFIG
    if not p.exists():
        raise CheckpointError(f"{path} is not a base checkpoint: {p} is missing")
    return ml_collections.ConfigDict(json.loads(p.read_text()))


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
        raise CheckpointError(f"base checkpoint {params_path} is unreadable: {_one_line(e)}") from e
    if target is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored,
                                    is_leaf=lambda x: isinstance(x, tuple))
        with ocp.PyTreeCheckpointer() as ckptr:
            params = ckptr.restore(params_path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        return dict(params), model_config
    target = dict(target)
    missing = sorted(set(target) - set(stored))
    if missing:
        raise CheckpointError(f"base checkpoint {path} has no {missing} (it holds {sorted(stored)})")
    want = jax.tree.map(lambda a: tuple(a.shape), target)
    have = {k: stored[k] for k in target}
    diffs = _shape_diffs(have, want)
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
        raise CheckpointError(f"base checkpoint {params_path} is unreadable: {_one_line(e)}") from e
    return {k: params[k] for k in target}, model_config


def _shape_diffs(have: Any, want: Any) -> list[str]:
    from dreamvideo_jax.training.state import flatten

    fh = flatten(jax.tree.map(lambda x: x, have, is_leaf=lambda x: isinstance(x, tuple)))
    fw = flatten(jax.tree.map(lambda x: x, want, is_leaf=lambda x: isinstance(x, tuple)))
    out = [f"{k}: missing in checkpoint" for k in sorted(set(fw) - set(fh))]
    out += [f"{k}: not in the model" for k in sorted(set(fh) - set(fw))]
    out += [f"{k}: {tuple(fh[k])} vs {tuple(fw[k])}" for k in sorted(set(fh) & set(fw)) if tuple(fh[k]) != tuple(fw[k])]
    return out


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 400:
        msg = msg[:400] + "..."
    return f"{type(e).__name__}: {msg}"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------------------------
# Data-iterator state item (one JSON file per process)


class DataStateHandler(ocp.CheckpointHandler):
    """Stores each process's data-iterator state as `process_<i>-of-<n>.json` (grain's convention)."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        i, n = jax.process_index(), jax.process_count()
        state = args.state
        if isinstance(state, bytes):
            payload = {"format": "bytes", "state": state.decode("utf-8")}
        else:
            payload = {"format": "json", "state": state}
        (epath.Path(directory) / f"process_{i}-of-{n}.json").write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        i, n = jax.process_index(), jax.process_count()
        path = epath.Path(directory) / f"process_{i}-of-{n}.json"
        if not path.exists():
            found = sorted(p.name for p in epath.Path(directory).iterdir()) if epath.Path(directory).exists() else []
            return {"missing": True, "found": found}
        payload = json.loads(path.read_text())
        state = payload["state"]
        if payload.get("format") == "bytes":
            state = state.encode("utf-8")
        return {"missing": False, "state": state}

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints


def checkpoint_dir(workdir: str) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


def _meta_tree(state) -> dict:
    return {"step": state.step, "rng": state.rng}


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # TrainState
    data_state: Any  # iterator state, or None when this checkpoint has none for this process
    config: dict | None
    path: str


class Checkpointer:
    """orbax CheckpointManager over WORKDIR/checkpoints with this trainer's items.

    Saving decisions (interval, final step, preemption) belong to the loop; every save here is forced.
    """

    def __init__(self, directory: str | epath.Path, *, keep: int = 3, keep_every: int = 0, use_async: bool = True,
                 read_only: bool = False):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep else None,
            keep_period=int(keep_every) or None,
            enable_async_checkpointing=bool(use_async),
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_path(self, step: int) -> str:
        return os.fspath(self.directory / str(step))

    def save(self, state, data_state: Any, config: Any) -> None:
        """Starts saving `state` at its step (async); returns once device buffers are copied out."""
        from dreamvideo_jax.parallel.sharding import to_host

        step = int(to_host(state.step))
        items = dict(
            params=ocp.args.StandardSave(state.params),
            ema=ocp.args.StandardSave(state.ema),
            opt_state=ocp.args.StandardSave(serialization.to_state_dict(state.opt_state)),
            meta=ocp.args.StandardSave(_meta_tree(state)),
            config=ocp.args.JsonSave(json.loads(tc.to_json(config))),
        )
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def read_config(self, step: int) -> dict | None:
        p = self.directory / str(step) / "config"
        if not p.exists():
            return None
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001 - the config item is informational
            return None

    def restore(self, step: int, abstract_state, *, with_data: bool = True, items=("params", "ema", "opt_state",
                                                                                       "meta")) -> Restored:
        """Restores `step` onto the shardings of `abstract_state` (a TrainState of ShapeDtypeStructs)."""
        args = {}
        if "params" in items:
            args["params"] = ocp.args.StandardRestore(abstract_state.params)
        if "ema" in items:
            args["ema"] = ocp.args.StandardRestore(abstract_state.ema)
        if "opt_state" in items:
            args["opt_state"] = ocp.args.StandardRestore(serialization.to_state_dict(abstract_state.opt_state))
        if "meta" in items:
            args["meta"] = ocp.args.StandardRestore(_meta_tree(abstract_state))
        has_data = (self.directory / str(step) / "data").exists()
        if with_data and has_data:
            args["data"] = DataStateRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        state = abstract_state
        if "opt_state" in items:
            state = state.replace(opt_state=serialization.from_state_dict(abstract_state.opt_state, out["opt_state"]))
        for k in ("params", "ema"):
            if k in items:
                state = state.replace(**{k: out[k]})
        if "meta" in items:
            state = state.replace(step=out["meta"]["step"], rng=out["meta"]["rng"])
            from dreamvideo_jax.parallel.sharding import to_host

            if int(to_host(state.step)) != step:
                raise CheckpointError(f"checkpoint {self.step_path(step)} holds step {int(state.step)}")
        data_state = None
        if with_data and has_data:
            d = out["data"]
            if d.get("missing"):
                log.warning("checkpoint %s has no data-iterator state for process %d of %d (found %s): the data "
                            "order restarts", self.step_path(step), jax.process_index(), jax.process_count(),
                            d.get("found"))
            else:
                data_state = d["state"]
        return Restored(step=step, state=state, data_state=data_state, config=None, path=self.step_path(step))

    def restore_latest(self, abstract_state, *, on_corrupt: str = "error", with_data: bool = True) -> Restored | None:
        """The newest restorable checkpoint, or None when there is none.

        An unreadable checkpoint raises CheckpointError naming it (`on_corrupt='error'`), or is logged, moved to
        WORKDIR/checkpoints_corrupt/ and the previous one is tried (`on_corrupt='fallback'`).
        """
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state, with_data=with_data)
            except Exception as e:  # noqa: BLE001 - re-raised with the checkpoint's path, never swallowed silently
                path = self.step_path(step)
                if on_corrupt != "fallback":
                    raise CheckpointError(
                        f"checkpoint {path} cannot be restored ({_one_line(e)}); delete it to resume from the "
                        f"previous checkpoint, or set --config.train.corrupt_checkpoint=fallback") from e
                log.error("checkpoint %s cannot be restored (%s); moving it aside and falling back to the "
                          "previous checkpoint", path, _one_line(e))
                self._move_aside(step)
        return None

    def _move_aside(self, step: int) -> None:
        src = self.directory / str(step)
        dst_root = self.directory.parent / (self.directory.name + "_corrupt")
        if _is_primary():
            dst_root.mkdir(parents=True, exist_ok=True)
            dst = dst_root / str(step)
            if dst.exists():
                dst.rmtree()
            src.rename(dst)
        _sync(f"move_aside_{step}")
        self.manager.reload()


# ----------------------------------------------------------------------------------------------------------------
# Workdir config and inference loading


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict | None:
    p = epath.Path(workdir) / CONFIG_FILE
    if not p.exists():
        return None
    return ml_collections.ConfigDict(json.loads(p.read_text()))


def is_workdir(path: str) -> bool:
    p = epath.Path(path)
    return (p / CONFIG_FILE).exists() and (p / BASE_DIR).exists()


def is_base(path: str) -> bool:
    return (epath.Path(path) / BASE_MODEL_CONFIG).exists()


def split_base(params: dict) -> tuple[dict, dict]:
    """A base dict -> (model params, {'text_encoder', 'vae'})."""
    model = {k: v for k, v in params.items() if k not in NON_MODEL_KEYS}
    rest = {k: params.get(k, {}) for k in NON_MODEL_KEYS}
    return model, rest


def load_trainable(workdir: str, step: int | None = None, use_ema: bool = True) -> tuple[dict, int]:
    """The trainable params (numpy) of a workdir's checkpoint `step` (default latest): `(tree, step)`."""
    ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True, use_async=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"{workdir} has no checkpoint")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise CheckpointError(f"{workdir} has no checkpoint at step {step} (steps: {steps})")
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
            raise CheckpointError(f"checkpoint {path} is unreadable: {_one_line(e)}") from e
        return dict(params), step
    finally:
        ckpt.close()


def _has_checkpoints(workdir: str) -> bool:
    if not checkpoint_dir(workdir).exists():
        return False
    ckpt = Checkpointer(checkpoint_dir(workdir), read_only=True, use_async=False)
    try:
        return bool(ckpt.all_steps())
    finally:
        ckpt.close()


def load_for_inference(workdir: str, step: int | None = None, use_ema: bool = True):
    """Loads a training workdir for sampling / evaluation: `(config, variables)`.

    Args:
      workdir: a training workdir (local or gs://).
      step: checkpoint step; None = the latest. A workdir without any checkpoint yields its initial weights.
      use_ema: the EMA of the trainable params (True) or the raw params.

    Returns:
      `config`: the ConfigDict stored in the workdir (`WORKDIR/config.json`); `config.train.mode` tells the layout.
      `variables`: unboxed numpy arrays,
        mode 'dreamvideo': `{'dreamvideo': {'unet', 'retention', 'image_conv'}, 'text_encoder': ..., 'vae': ...}`
          -> `build_dreamvideo(config.model).apply({'params': variables['dreamvideo']}, ...)`;
        mode 't2v': `{'unet': ..., 'text_encoder': ..., 'vae': ...}`
          -> `build_dreamvideo(config.model).apply({'params': {'unet': variables['unet']}}, ..., method='unet_only')`
          (or `build_unet(config.model).apply({'params': variables['unet']}, ...)`).
        'text_encoder' -> `build_text_encoder(config.model).apply({'params': ...}, ids)`;
        'vae' -> `build_autoencoder(config.model).apply({'params': ...}, x, method=...)` ({} for a patch
        autoencoder, which has no parameters).
      Put them on devices with `jax.device_put(tree, shardings)`.

    Raises:
      CheckpointError: not a workdir, or unreadable files (named in the message).
    """
    from dreamvideo_jax.training.state import merge_model

    config = read_workdir_config(workdir)
    if config is None:
        raise CheckpointError(f"{workdir} is not a training workdir ({CONFIG_FILE} is missing)")
    base_path = os.fspath(epath.Path(workdir) / BASE_DIR)
    base, _ = load_base(base_path)
    model, rest = split_base(base)
    if _has_checkpoints(workdir):
        trainable, _ = load_trainable(workdir, step, use_ema)
        model = merge_model(trainable, model)
    elif step is not None:
        raise CheckpointError(f"{workdir} has no checkpoint at step {step}")
    if config.train.mode == "t2v":
        variables = {"unet": model["unet"]}
    else:
        variables = {"dreamvideo": model}
    variables.update(rest)
    return config, variables
