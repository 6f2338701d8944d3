"""Sampling: images and prompts in, videos out (DDIM / DPM-Solver++ with double guidance, multi-stage chains).

  from dreamvideo_jax import checkpoints
  from dreamvideo_jax.sampling import Sampler
  loaded = checkpoints.load("/runs/dreamvideo")                 # or a base folder, or WORKDIR/checkpoints/<step>
  sampler = Sampler(loaded.config, loaded.params, tokenizer_dir=loaded.tokenizer_dir)
  video = sampler.generate(image_uint8, "a dog runs", text_guidance=7.5, image_guidance=1.5, steps=50)
  chain = sampler.generate_chain(image_uint8, ["a dog runs", "the dog jumps"])

Modules: `pipeline` (Sampler), `inputs` (images, prompt files, argument checks), `outputs` (mp4 / gif / npz /
contact sheet), `metrics` (chain drift), `config` (the `sample` config section), `cli` (what
`python -m dreamvideo_jax.sample` runs).
"""

from dreamvideo_jax.errors import InputError
from dreamvideo_jax.sampling.config import defaults
from dreamvideo_jax.sampling.pipeline import ChainResult, Sampler, Timings

__all__ = ["ChainResult", "InputError", "Sampler", "Timings", "defaults"]
