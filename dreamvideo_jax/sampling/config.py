"""The `sample` config section: every sampling knob, documented here once.

Every key can be overridden per call (`Sampler.generate(..., text_guidance=9.0)`) or from the command line
(`--config.sample.text_guidance=9` for `python -m dreamvideo_jax.sample` and `.evaluate`). A config without a
`sample` section gets these defaults; unknown keys in a config's `sample` section are an error (a typo must not
be silently ignored). This file is also the default `--config` of those commands (`get_config`).
"""

from __future__ import annotations

import ml_collections

SAMPLERS = ("ddim", "dpmpp_2m")
LOOPS = ("python", "scan")
SPACINGS = ("leading", "trailing", "linspace")


def defaults() -> ml_collections.ConfigDict:
    """The `sample` section with its defaults."""
    return ml_collections.ConfigDict(dict(
        # Double-condition guidance, eps = u + s_I (img - u) + s_T (img,txt - img). InstructPix2Pix's defaults;
        # both 1.0 = the plain conditional prediction (no guidance), s_I = 0 ignores the reference image's pull.
        image_guidance=1.5,
        text_guidance=7.5,
        steps=50,  # model evaluations (each one batched forward over the 3 guidance branches)
        sampler="ddim",  # 'ddim' | 'dpmpp_2m' (DPM-Solver++(2M); ~20-25 steps match 50 DDIM steps)
        eta=0.0,  # DDIM noise (0 = deterministic); DPM-Solver++(2M) is always deterministic
        # How much the video may move away from the reference image, in [0, 1]. 1 = start from pure noise (the
        # model's full motion). Below 1 the sampler starts from the still video (the reference latent in every
        # frame) noised to the level of the step that remains, and runs only the last max(1, round(s * steps))
        # of its steps: the lower, the less there is left to change (0 = one step from an almost clean still).
        motion_strength=1.0,
        seed=0,  # sample b of a batch uses seed + b, so any sample can be reproduced alone
        # Clip size; 0 = the top-level num_frames / height / width of the config (the training size).
        num_frames=0,
        height=0,
        width=0,
        # Timesteps: ModelScope-T2V's DDIM config ("leading" spacing, offset 1, last step to abar_0).
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        loop="python",  # 'python' (a loop over one compiled step, progress bar) | 'scan' (one lax.scan)
        # Image-to-video with a text-to-video model: replace frame 0 of the latents by the (noised) reference
        # latent at every step. Also usable with DreamVideo models (pins frame 0 to the reference exactly).
        first_frame_replacement=False,
        # A loop: the video's last frame is the reference image itself (a model trained with
        # model.retention.last_frame, or first_frame_replacement, which then pins the last frame too). The sample
        # command's --last_image gives another last frame instead (first+last-frame video). In a chain the last
        # stage ends on the first stage's reference. (Not `loop`, which picks the denoising loop's form.)
        seamless_loop=False,
        negative_prompt="",  # text of the unconditional / image-only branches ('' = unconditional)
        decode_chunk_size=8,  # frames per sample decoded at once by the VAE (0 = all); lower to save memory
        fps=8.0,  # frame rate of written videos (ModelScope-T2V: 8)
        tokenizer="",  # CLIP tokenizer folder; '' = the checkpoint's tokenizer/ folder, else CLIP built offline
        # Chains (the sample command): stages beyond the given prompts repeat the last prompt.
        stages=0,  # number of chained stages; 0 = one per prompt given
        drop_repeated_frame=False,  # leave out each later stage's first frame (= the previous last) when joining
    ))


def get_config() -> ml_collections.ConfigDict:
    """The default `--config` of the sample and evaluate commands: the `sample` section alone."""
    return ml_collections.ConfigDict({"sample": defaults()})


def resolve(config) -> ml_collections.ConfigDict:
    """`config.sample` over :func:`defaults` (a missing section or key takes the default).

    Raises:
        ValueError: unknown keys in `config.sample`, or values outside their choices.
    """
    out = defaults()
    section = config.get("sample") if config is not None and hasattr(config, "get") else None
    if section:
        given = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
        unknown = sorted(set(given) - set(out))
        if unknown:
            raise ValueError(f"sample: unknown config keys {unknown}; known keys are {sorted(out)}")
        out.update(given)
    if out.sampler not in SAMPLERS:
        raise ValueError(f"sample.sampler={out.sampler!r}; use one of {SAMPLERS}")
    if out.loop not in LOOPS:
        raise ValueError(f"sample.loop={out.loop!r}; use one of {LOOPS}")
    if out.timestep_spacing not in SPACINGS:
        raise ValueError(f"sample.timestep_spacing={out.timestep_spacing!r}; use one of {SPACINGS}")
    return out
