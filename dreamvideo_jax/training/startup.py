"""Where a training run starts: the workdir (checked, locked by the loop), the resume order and the initial
parameters.

Start-up order (`start_state`): this workdir's latest checkpoint -> `config.resume` (another workdir or one of its
checkpoints) -> `config.init_from` (a base checkpoint of converted weights, or a training workdir) -> random
init. A checkpoint that cannot be read is an error naming it (or, with `train.corrupt_checkpoint='fallback'`,
a logged fall-back to the previous one); it never silently becomes a fresh start. Resuming needs the same
architecture and objective (`check_compatible`); initialising from other weights the same parameter trees.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
from etils import epath

from dreamvideo_jax import checkpoints, config_io
from dreamvideo_jax import lora as lora_lib
from dreamvideo_jax import system as system_lib
from dreamvideo_jax.checkpoints.base import sync_processes
from dreamvideo_jax.diffusion import schedules
from dreamvideo_jax.errors import CheckpointError, IncompatibleConfigError, InputError, WorkdirError, one_line
from dreamvideo_jax.training.trainer import Trainer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Workdir


def prepare_workdir(workdir: str) -> epath.Path:
    if not workdir:
        raise WorkdirError("no workdir given")
    path = epath.Path(workdir)
    try:
        if jax.process_index() == 0:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write_test_{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
    except Exception as e:  # noqa: BLE001 - turned into one readable error
        raise WorkdirError(f"workdir {workdir} is not writable: {one_line(e)}") from e
    sync_processes("prepare_workdir")
    return path


def _objective(config) -> dict:
    """What a checkpoint's weights mean besides their shapes: the prediction target and the noise schedule."""
    train = config_io.to_dict(config).get("train", {})
    return {"train": {"prediction_type": train.get("prediction_type", "eps")},
            "diffusion": schedules.section(config.get("diffusion"))}


def check_compatible(stored: Any, config, what: str, objective: bool = True) -> None:
    """Resuming needs the same parameter trees AND the same objective (an eps model continued as v-prediction, or
    on another schedule, would silently learn something else); initialising from other weights (`objective=False`)
    needs the same trees only."""
    stored = ml_collections.ConfigDict(config_io.to_dict(stored))
    diffs = system_lib.architecture_diff(stored.to_dict(), config)
    if objective:
        diffs += config_io.diff(_objective(stored), _objective(config))
    if diffs:
        raise IncompatibleConfigError(
            f"{what} was written with a different architecture or objective; differing keys: " + "; ".join(diffs[:12])
            + (f" (+{len(diffs) - 12} more)" if len(diffs) > 12 else ""))


def log_config_changes(stored, config) -> None:
    changes = config_io.diff(config_io.to_dict(stored), config_io.to_dict(config))
    if changes:
        log.info("config changes since the last run: %s", "; ".join(changes[:20]))


# ----------------------------------------------------------------------------------------------------------------
# Initial parameters


def _base_target(tr: Trainer, keys=None) -> dict:
    """Abstract (sharded) targets of the layout's non-empty groups, or of `keys` among them."""
    a = tr.abstract_all()
    return {k: v for k, v in a.items() if jax.tree.leaves(v) and (keys is None or k in keys)}


def _params_from_base(tr: Trainer, base: dict, fallback: dict | None = None) -> dict:
    """All params from a base dict; groups the model lacks (e.g. the retention branch when the base came from a
    t2v run) are ignored, groups the base lacks come from `fallback`."""
    out = {}
    for k in tr.system.groups:
        if k in base and (jax.tree.leaves(base[k]) or fallback is None):
            out[k] = base[k]
        else:
            out[k] = fallback[k] if fallback is not None else {}
    return out


def check_source_model(stored: ml_collections.ConfigDict, config, what: str, source_has_branch: bool = True) -> None:
    fake = {"model": stored.to_dict(), "train": config_io.to_dict(config.train)}
    if not source_has_branch and "retention" in config.model:
        # A source without retention parameters (t2v run, converted base): its branch settings cannot conflict.
        fake["model"]["retention"] = config_io.to_dict(config.model.retention)
    elif "retention" in config.model and "retention" in fake["model"] and config.model.retention.get("last_frame"):
        # A first-frame-only source: the new last-frame encoder starts at zero (it adds nothing yet).
        fake["model"]["retention"] = {**fake["model"]["retention"], "last_frame": True}
    check_compatible(fake, config, what, objective=False)


def load_init_from(tr: Trainer, path: str, key: jax.Array) -> dict:
    """All params for a fresh run from `config.init_from` (base checkpoint or training workdir)."""
    config = tr.config
    try:
        loc = checkpoints.locate(path, "config.init_from")
    except InputError:
        raise CheckpointError(f"init_from {path} is neither a base checkpoint ({checkpoints.base.BASE_MODEL_CONFIG}) "
                              f"nor a training workdir ({checkpoints.CONFIG_FILE} and {checkpoints.BASE_DIR}/)") from None
    if loc.kind == "workdir":
        root = loc.root
        base_path = os.fspath(epath.Path(root) / checkpoints.BASE_DIR)
        stored = set(checkpoints.base_shapes(base_path))
        check_source_model(checkpoints.read_workdir_config(root).model, config, f"init_from workdir {root}",
                            source_has_branch="retention" in stored)
        want = set(_base_target(tr)) & stored
        base, _ = checkpoints.load_base(base_path, target=_base_target(tr, want))
        try:
            trainable, step = checkpoints.load_trainable(root, loc.step, bool(config.train.init_from_ema))
            spec = lora_lib.spec_from_config(checkpoints.read_workdir_config(root))
            if spec is not None:  # a LoRA run: its adapters merged into its base's kernels
                shardings = jax.tree.map(lambda x: x.sharding, base)
                base = jax.jit(lambda b, t: lora_lib.apply(b, [(t, spec.factor)]), out_shardings=shardings)(
                    base, trainable)
                trainable = {}
            flat = system_lib.flatten(base)
            shardings = system_lib.flatten(tr.param_shardings)
            for k, v in system_lib.flatten(trainable).items():
                if k.split(system_lib.SEP)[0] in base and k in shardings:
                    flat[k] = tr.put(v, shardings[k])
            base = {**base, **system_lib.unflatten(flat)}
            log.info("init_from %s: checkpoint step %d (%s) over its base", root, step,
                     "EMA" if config.train.init_from_ema else "params")
        except CheckpointError as e:
            log.warning("init_from %s: %s; using its initial weights (base)", root, e)
    else:
        stored = set(checkpoints.base_shapes(path))
        check_source_model(checkpoints.read_model_config(path), config, f"init_from base {path}",
                            source_has_branch="retention" in stored)
        want = set(_base_target(tr)) & stored
        base, _ = checkpoints.load_base(path, target=_base_target(tr, want))
        log.info("init_from base %s: loaded %s", path, sorted(base))
    src_has_branch = "retention" in base
    if "unet" not in base:
        raise CheckpointError(f"init_from {path} holds no 'unet' parameters")
    # Random init only for the groups the source lacks (e.g. the retention branch of a text-to-video base).
    lacking = [k for k in tr.system.groups if jax.tree.leaves(tr.abstract_params[k])
               and not (k in base and jax.tree.leaves(base[k]))]
    params = _params_from_base(tr, base, tr.init_params(key) if lacking else None)
    if tr.mode == "dreamvideo" and not src_has_branch:
        params = tr.copy_retention_from_unet(params)
        log.info("retention branch initialised from the loaded primary U-Net")
    return params


# ----------------------------------------------------------------------------------------------------------------
# Start state


def start_state(tr: Trainer, config, wd: epath.Path, ckpt: checkpoints.Checkpointer):
    """(state, frozen, data_state, source) following the resume order."""
    t = config.train
    base_dir = wd / checkpoints.BASE_DIR
    key = jax.random.key(int(config.seed))
    # 1. This workdir.
    if ckpt.all_steps():
        if not checkpoints.is_base(os.fspath(base_dir)):
            raise CheckpointError(f"workdir {wd} has checkpoints but no {base_dir} (frozen weights)")
        base, _ = checkpoints.load_base(os.fspath(base_dir), target=_base_target(tr))
        restored = ckpt.restore_latest(tr.abstract_state, on_corrupt=t.corrupt_checkpoint)
        if restored is not None:
            params = _params_from_base(tr, base)
            _, frozen = tr.split(params)
            log.info("resuming from %s", restored.path)
            return restored.state, frozen, restored.data_state, "workdir"
        log.error("no restorable checkpoint left in %s; continuing with the next start option", ckpt.directory)
    # 2. config.resume.
    if config.get("resume"):
        try:
            loc = checkpoints.locate(config.resume, "config.resume")
        except InputError as e:
            raise CheckpointError(f"resume {config.resume}: not a training workdir ({e})") from None
        if loc.kind != "workdir":
            raise CheckpointError(f"resume {config.resume}: a base checkpoint, not a training workdir (use "
                                  "config.init_from for a base)")
        src, step = loc.root, loc.step
        check_compatible(checkpoints.read_workdir_config(src), config, f"resume workdir {src}")
        base, _ = checkpoints.load_base(os.fspath(epath.Path(src) / checkpoints.BASE_DIR), target=_base_target(tr))
        src_ckpt = checkpoints.Checkpointer(checkpoints.checkpoint_dir(src), read_only=True, use_async=False)
        try:
            if step is None:
                restored = src_ckpt.restore_latest(tr.abstract_state, on_corrupt=t.corrupt_checkpoint)
                if restored is None:
                    raise CheckpointError(f"resume {config.resume}: no checkpoint in {src_ckpt.directory}")
            else:
                try:
                    restored = src_ckpt.restore(step, tr.abstract_state)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"resume checkpoint {config.resume} cannot be restored: "
                                          f"{one_line(e)}") from e
        finally:
            src_ckpt.close()
        params = _params_from_base(tr, base)
        _write_base(tr, base_dir, params, config)
        _, frozen = tr.split(params)
        log.info("resuming from %s", restored.path)
        return restored.state, frozen, restored.data_state, "resume"
    # 3./4. init_from or scratch.
    if config.get("init_from"):
        params = load_init_from(tr, config.init_from, key)
        source = "init_from"
    else:
        params = tr.init_params(key)
        source = "scratch"
    _write_base(tr, base_dir, params, config)
    trainable, frozen = tr.split(params)
    state = tr.init_state(trainable)
    return state, frozen, None, source


def _write_base(tr: Trainer, base_dir: epath.Path, params: dict, config) -> None:
    tree = {k: v for k, v in params.items() if jax.tree.leaves(v)}
    if checkpoints.is_base(os.fspath(base_dir)) and (base_dir / checkpoints.base.BASE_PARAMS).exists():
        have = checkpoints.base_shapes(os.fspath(base_dir))
        want = jax.tree.map(lambda a: tuple(a.shape), tree)
        diffs = system_lib.shape_diffs(have, want)
        if not diffs:
            log.info("base weights already in %s", base_dir)
            return
        raise CheckpointError(f"{base_dir} holds weights of another model ({'; '.join(diffs[:5])}); "
                              f"use a new workdir")
    if (base_dir / checkpoints.base.BASE_PARAMS).exists() and jax.process_index() == 0:
        (base_dir / checkpoints.base.BASE_PARAMS).rmtree()  # an interrupted earlier write (no model_config.json)
    sync_processes("base_cleanup")
    checkpoints.save_base(os.fspath(base_dir), tree, config.model)
    log.info("wrote base weights to %s", base_dir)
