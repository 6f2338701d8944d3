"""Sampling: images and prompts in, videos out (DDIM / DPM-Solver++ with double guidance, multi-stage chains).

  from dreamvideo_jax.sampling import Sampler, load_weights
  loaded = load_weights(workdir="/runs/dreamvideo")             # or checkpoint=..., or random_variables(config)
  sampler = Sampler(loaded.config, loaded.variables, tokenizer_dir=loaded.tokenizer_dir)
  video = sampler.generate(image_uint8, "a dog runs", text_guidance=7.5, image_guidance=1.5, steps=50)
  chain = sampler.generate_chain(image_uint8, ["a dog runs", "the dog jumps"])

Modules: `pipeline` (Sampler), `weights` (loading), `inputs` (images, prompt files, argument checks),
`outputs` (mp4 / gif / npz / contact sheet), `metrics` (chain drift), `config` (the `sample` config section),
`cli` (what `python -m dreamvideo_jax.sample` runs), `benchmark`.
"""

from dreamvideo_jax.sampling.config import defaults
from dreamvideo_jax.sampling.inputs import InputError
from dreamvideo_jax.sampling.pipeline import ChainResult, Sampler, Timings
from dreamvideo_jax.sampling.weights import Loaded, load as load_weights, random_variables, split_variables

__all__ = [
    "ChainResult",
    "InputError",
    "Loaded",
    "Sampler",
    "Timings",
    "defaults",
    "load_weights",
    "random_variables",
    "split_variables",
]
