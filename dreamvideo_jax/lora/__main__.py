"""Merge LoRA adapters into weights, or write the adapters of a LoRA training run.

  python -m dreamvideo_jax.lora merge --base=WEIGHTS --lora=ADAPTER[:scale] [--lora=...] --dst=DIR [--overwrite]
      WEIGHTS: a training workdir, WORKDIR/checkpoints/<step> or a base folder; writes DIR as a base checkpoint
      (sample it with --checkpoint=DIR -- plus the training --config when its prediction type or noise schedule
      is not ModelScope's, as for any base checkpoint -- or use it as a training config's init_from).
  python -m dreamvideo_jax.lora export --workdir=WORKDIR [--step=N] [--noema] --dst=DIR
      writes the adapters of a LoRA run's checkpoint (default: the latest, EMA weights) as an adapter folder
      (a run also writes WORKDIR/adapter/ when it ends).

Exit status 0 on success, 2 with a one-line `error:` for bad flags or arguments, 1 for unusable inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Sequence

import jax
import numpy as np
from absl import flags

from dreamvideo_jax import checkpoints
from dreamvideo_jax.errors import InputError, UserError
from dreamvideo_jax.lora import apply, check_fits, load_all, save, spec_from_config, stack
from dreamvideo_jax.system import System, flatten

def merge_command(base: str, values: Sequence[str], dst: str, overwrite: bool = False) -> dict:
    """Loads `base`, stacks the adapters `values` ('PATH[:scale]') on it and writes `dst` as a base checkpoint."""
    if not values:
        raise InputError("lora", "", "give at least one adapter")
    if os.path.exists(os.path.join(dst, checkpoints.base.BASE_PARAMS)) and not overwrite:
        raise InputError("dst", dst, "already holds a checkpoint (use --overwrite to replace it)")
    adapters = load_all(values)
    loaded = checkpoints.load(base, name="base")
    system = System(loaded.config)
    params = system.conform(loaded.params, f"--base={base}")
    for a, _ in adapters:
        check_fits(a, system.model_params(system.abstract))
    merged = apply(jax.tree.map(np.asarray, params), stack(adapters))
    checkpoints.save_base(dst, merged, loaded.config.model, overwrite=overwrite)
    if loaded.tokenizer_dir and not os.path.exists(os.path.join(dst, "tokenizer")):
        shutil.copytree(loaded.tokenizer_dir, os.path.join(dst, "tokenizer"))
    return {"dst": dst, "base": loaded.source, "adapters": [[a.source, s] for a, s in adapters]}


def export_command(workdir: str, dst: str, step: int | None = None, ema: bool = True) -> dict:
    """Writes the adapters of a LoRA run's checkpoint as an adapter folder."""
    loc = checkpoints.locate(workdir, "workdir")
    if loc.kind != "workdir":
        raise InputError("workdir", workdir, "a base checkpoint, not a training workdir")
    config = checkpoints.read_workdir_config(loc.root)
    spec = spec_from_config(config)
    if spec is None:
        raise InputError("workdir", workdir, "was not trained with LoRA (train.lora.rank is 0)")
    tree, got = checkpoints.load_trainable(loc.root, step if step is not None else loc.step, ema)
    system = System(config)
    shapes = {p: tuple(s.shape) for p, s in flatten(system.model_params(system.abstract)).items()}
    save(dst, tree, spec, shapes)
    return {"dst": dst, "workdir": loc.root, "step": got, "ema": ema}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dreamvideo_jax.lora`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    d = dict(flag_values=fv)
    flags.DEFINE_string("base", None, "merge: the weights to merge into.", **d)
    flags.DEFINE_multi_string("lora", [], "merge: an adapter folder, PATH or PATH:scale (repeatable).", **d)
    flags.DEFINE_string("dst", None, "The folder to write.", **d)
    flags.DEFINE_bool("overwrite", False, "merge: replace a checkpoint in --dst.", **d)
    flags.DEFINE_string("workdir", None, "export: the LoRA training workdir.", **d)
    flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest).", **d)
    flags.DEFINE_bool("ema", True, "export: the EMA weights (--noema: the raw ones).", **d)
    if not argv or argv[0] in ("-h", "--help", "help") or any(a in ("--help", "-h") for a in argv):
        print(__doc__ + "\nflags:\n" + fv.get_help())
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd not in ("merge", "export"):
            raise flags.Error(f"unknown command {cmd!r}; use merge or export")
        left = fv(["python -m dreamvideo_jax.lora"] + rest)
        if len(left) > 1:
            raise flags.Error(f"unexpected arguments {left[1:]} (flags are --name=value)")
        need = ("base", "dst") if cmd == "merge" else ("workdir", "dst")
        for name in need:
            if not fv[name].value:
                raise flags.Error(f"--{name} is required")
    except flags.Error as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        if cmd == "merge":
            out = merge_command(fv.base, fv.lora, fv.dst, fv.overwrite)
        else:
            out = export_command(fv.workdir, fv.dst, fv.step, fv.ema)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (UserError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
