"""The config files: configs/base.py lists exactly the library's defaults, every config file passes the config
checks, and config files load by path from any working directory (as `--config=/path/to/configs/X.py` does)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import ml_collections
import pytest

from dreamvideo_jax.data.config import defaults as data_defaults
from dreamvideo_jax.models.build import check_model_config, model_defaults
from dreamvideo_jax.parallel.mesh import mesh_defaults, sharding_defaults
from dreamvideo_jax.sampling import config as sampling_config
from dreamvideo_jax.sampling.config import defaults as sample_defaults
from dreamvideo_jax.config_io import to_json
from dreamvideo_jax.diffusion import schedules
from dreamvideo_jax.training.config import check_config, train_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# (file, config argument) of every config the project ships.
SHIPPED = [("base", None), ("modelscope_t2v", None), ("tiny", None), ("demo_shapes", None), ("demo_shapes", "t2v")]
LIBRARY_DEFAULTS = {
    "model": model_defaults,
    "train": train_defaults,
    "diffusion": lambda: ml_collections.ConfigDict(schedules.DEFAULTS),
    "mesh": mesh_defaults,
    "sharding": sharding_defaults,
    "data": data_defaults,
    "sample": sample_defaults,
}
TOP_LEVEL = {"seed": 0, "num_frames": 16, "height": 256, "width": 256, "init_from": "", "resume": ""}
# data.<key> follows the top-level clip size (a field reference), not the data section's own default.
LINKED = ("num_frames", "height", "width")


def _config(name: str, arg=None) -> ml_collections.ConfigDict:
    module = runpy.run_path(os.path.join(CONFIGS, f"{name}.py"))
    return module["get_config"](arg) if arg else module["get_config"]()


def _typed(x):
    """Values with their types, so that 1 vs 1.0 or a tuple vs a list count as different."""
    if isinstance(x, dict):
        return {k: _typed(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_typed(v) for v in x])
    return (type(x).__name__, x)


@pytest.mark.parametrize("section", sorted(LIBRARY_DEFAULTS))
def test_base_lists_the_library_defaults(section):
    base = _config("base")[section].to_dict()
    lib = LIBRARY_DEFAULTS[section]().to_dict()
    if section == "data":
        for key in LINKED:
            lib.pop(key)
            assert base.pop(key) == TOP_LEVEL[key]
    assert sorted(base) == sorted(lib), f"config.{section}: keys differ"
    for key in lib:
        assert _typed(base[key]) == _typed(lib[key]), f"config.{section}.{key}: {base[key]!r} != {lib[key]!r}"


def test_base_top_level_keys_and_links():
    base = _config("base")
    assert sorted(base) == sorted(set(TOP_LEVEL) | set(LIBRARY_DEFAULTS))
    assert {k: base[k] for k in TOP_LEVEL} == TOP_LEVEL
    base.num_frames, base.height, base.width = 4, 24, 40
    assert (base.data.num_frames, base.data.height, base.data.width) == (4, 24, 40)


@pytest.mark.parametrize("name,arg", SHIPPED)
def test_config_files_pass_the_checks(name, arg):
    config = _config(name, arg)
    check_config(config)
    check_model_config(config.model)
    sampling_config.resolve(config)
    for section in LIBRARY_DEFAULTS:  # nothing a file sets is a key the library does not know
        extra = set(_flat(config[section].to_dict())) - set(_flat(_config("base")[section].to_dict()))
        assert not extra, f"{name}: unknown keys config.{section}.{sorted(extra)}"


def _flat(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_config_files_load_by_path_from_any_directory(tmp_path):
    """As `python -m dreamvideo_jax.train --config=/abs/configs/X.py` reads them: absl's config_flags, another
    working directory, no PYTHONPATH (the repository root is not importable there)."""
    script = (
        "import json, sys\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "specs = sys.argv[1:]\n"
        "argv = ['prog'] + [f'--c{i}={s}' for i, s in enumerate(specs)] + ['--c0.train.num_steps=7']\n"
        "for i in range(len(specs)):\n"
        "    config_flags.DEFINE_config_file(f'c{i}', sys_argv=argv)\n"
        "flags.FLAGS(argv)\n"
        "assert 'configs' not in sys.modules and 'dreamvideo_jax' not in sys.modules\n"
        "print(json.dumps([flags.FLAGS[f'c{i}'].value.to_json(sort_keys=True) for i in range(len(specs))]))\n"
    )
    specs = [os.path.join(CONFIGS, f"{n}.py") + (f":{a}" if a else "") for n, a in SHIPPED]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, *specs], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = [json.loads(s) for s in json.loads(proc.stdout.strip().splitlines()[-1])]
    for (name, arg), got in zip(SHIPPED, loaded):
        want = _config(name, arg)
        if (name, arg) == SHIPPED[0]:
            want.train.num_steps = 7
        assert got == json.loads(to_json(want)), f"{name}:{arg} loaded from {tmp_path}"
