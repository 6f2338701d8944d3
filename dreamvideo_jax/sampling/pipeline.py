"""The sampling pipeline: images + prompts in, uint8 videos out; multi-stage chains; batch sharding.

    loaded = checkpoints.load("/runs/dreamvideo")      # or a base folder, or WORKDIR/checkpoints/<step>
    sampler = Sampler(loaded.config, loaded.params)
    video = sampler.generate(image, "a dog runs", num_frames=16, text_guidance=9.0, seed=1)   # (1, F, H, W, 3)
    chain = sampler.generate_chain(image, ["a dog runs", "the dog jumps"])   # chain.video: (1, 2F, H, W, 3)

Flow of one clip: tokenise (warn on truncation) -> text encoder on the prompts and on "" ->
reference image in [-1, 1] (or its VAE latent) -> initial noise -> N guided steps, each ONE batched forward over the
three guidance branches (samplers.guided_step) -> VAE decode in frame chunks -> uint8.

Compile once. The device functions (text encoder, `prepare`, `decode` here and the denoising step / scan of
`diffusion.samplers`) are module-level jitted functions whose static arguments are the `System` (equal
architectures share programs across Sampler objects), shapes and options; JAX's compile events are timed, so
compile time is reported apart from sampling time. Guidance scales (per sample), seeds, eta, the stage index,
the first-frame-replacement switch and the timesteps are *inputs*: changing them -- or the number of steps with
the Python loop -- never compiles anything (a test counts XLA compilations). The sampler, the clip size, the
batch size and `loop='scan'`'s step count are shapes or static and do compile once each.

Randomness. Sample ``b`` with seed ``s_b`` uses the key ``fold_in(key(s_b), stage)`` for everything (initial
noise, DDIM noise, replacement noise). A batch's seeds default to ``seed + b``, so a sample of a batch equals the
solo run with its seed, and no result depends on the batch it was in or on how the batch was sharded.

Batches and devices. The batch is split over devices along its leading axis (the three guidance branches of a
sample stay on the sample's device, see samplers.guidance_inputs). Without an explicit ``mesh`` the sampler uses
the fewest local devices that need the same number of rounds -- ``k = ceil(B / ceil(B / n))`` of ``n`` -- and
pads the batch to a multiple of ``k`` with copies of its last sample, dropped afterwards (so 1 prompt on 8 devices
runs on one device instead of computing 7 discarded copies). With a mesh, the batch is split over its
``data``/``fsdp``/``batch`` axes (all axes if it has none of these) and padded to a multiple of their size.
Parameters are replicated.

Chaining (two or more stages). Stage ``k+1``'s reference image is exactly the last frame of stage ``k`` *as
written*: the decoded, uint8-quantised frame the user sees, converted to [-1, 1] like any user image. No latent is
passed along and nothing is re-encoded behind the user's back (except by the image branch itself when the model's
image input is a VAE latent -- the same as for a user image). The joined video is the stages' frames in order;
``drop_repeated_frame`` removes each later stage's first frame, which re-shows the previous last frame.
Drift over the chain (SSIM, colour shift and contrast of each stage's first frame against the input image) and
the seams (the frame step across each stage boundary, and from the last frame back to the first, against the
steps inside the clips) are measured (`sampling.drift`).

Text-to-video models (``mode='t2v'``, the ModelScope base). The image branch is absent, so the "image only" branch
equals the unconditional one: the model runs the unconditional and text rows only (2B rows, not 3B) and guidance
reduces to classic CFG with the text scale. With ``first_frame_replacement`` the reference image still steers the
clip: before every step frame 0 of the latents is replaced by the reference latent noised to the current level
(fixed noise per sample), and after the last step by the clean reference latent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dreamvideo_jax import lora as lora_lib
from dreamvideo_jax.data import tokenizer as tokenizer_lib
from dreamvideo_jax.diffusion import samplers
from dreamvideo_jax.parallel import mesh as mesh_lib
from dreamvideo_jax.sampling import config as sample_config
from dreamvideo_jax.sampling import inputs
from dreamvideo_jax.sampling import drift
from dreamvideo_jax.system import System

log = logging.getLogger(__name__)

_REPLACEMENT_NOISE_SALT = 0x7FFFFFFE  # != the initial-noise salt and != any step index
_LAST_REPLACEMENT_NOISE_SALT = 0x7FFFFFFD  # the same for the last frame


@dataclasses.dataclass
class Timings:
    """Wall-clock seconds of the last ``generate`` / ``generate_chain`` call."""

    compile_s: float = 0.0  # ahead-of-time compilation (0 when every executable was cached)
    compiles: int = 0  # executables compiled
    text_s: float = 0.0  # tokenising + text encoder
    prepare_s: float = 0.0  # noise, reference image / latent
    sample_s: float = 0.0  # the denoising loop
    decode_s: float = 0.0  # VAE decode + copy to host
    steps: int = 0  # denoising steps run (over all stages)

    @property
    def total_s(self) -> float:
        return self.compile_s + self.text_s + self.prepare_s + self.sample_s + self.decode_s

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_s"] = self.total_s
        d["ms_per_step"] = 1e3 * self.sample_s / self.steps if self.steps else 0.0
        return d

    def summary(self) -> str:
        ms = 1e3 * self.sample_s / self.steps if self.steps else 0.0
        return (f"compile {self.compile_s:.1f} s ({self.compiles} executables) | sampling {self.sample_s:.2f} s "
                f"({self.steps} steps, {ms:.0f} ms/step) | text {self.text_s:.2f} s | decode {self.decode_s:.2f} s")


@dataclasses.dataclass
class ChainResult:
    """A batch of multi-stage videos.

    Attributes:
        video: uint8 ``(B, F_total, H, W, 3)``, the stages joined.
        stages: ``S`` uint8 videos ``(B, F, H, W, 3)``.
        references: uint8 ``(B, S, H, W, 3)``, the reference image of each stage (``[:, 0]`` = the input image,
            ``[:, k]`` = ``stages[k - 1][:, -1]``).
        latents: ``S`` float32 ``(B, F, h, w, C)``, each stage's latents before decoding.
        drift: see :func:`sampling.drift.chain_drift`.
        prompts: ``[stage][sample]``.
        seeds: per sample.
    """

    video: np.ndarray
    stages: list[np.ndarray]
    references: np.ndarray
    latents: list[np.ndarray]
    drift: dict
    prompts: list[list[str]]
    seeds: list[int]


@dataclasses.dataclass
class _Request:
    """One validated clip request (all per-sample lists padded to the device multiple)."""

    batch: int  # real samples
    padded: int
    images: np.ndarray  # uint8 (P, H, W, 3)
    prompts: list[str]
    seeds: list[int]
    image_scale: np.ndarray  # float32 (P,)
    text_scale: np.ndarray
    num_frames: int
    height: int
    width: int
    steps: int
    sampler: str
    eta: float
    replace: bool
    negative_prompt: str
    motion_strength: float = 1.0
    last_images: np.ndarray | None = None  # uint8 (P, H, W, 3): the last frames (zeros where not given)
    last_given: np.ndarray | None = None  # bool (P,)


def _batch_size(images: Any, prompts: list, *per_sample: Any) -> int:
    """The batch size implied by the longest per-sample argument (single values broadcast)."""
    sizes = [len(prompts)]
    if isinstance(images, (list, tuple)):
        sizes.append(len(images))
    elif images is not None and np.ndim(images) == 4:
        sizes.append(np.shape(images)[0])
    sizes += [len(v) for v in per_sample if isinstance(v, (list, tuple, np.ndarray))]
    return max(sizes)


def _pad(seq: list, n: int) -> list:
    return list(seq) + [seq[-1]] * (n - len(seq))


def _to_uint8(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Compilation time: JAX reports every trace, lowering and XLA compile; those during a Sampler call are its
# compile time (so it is reported apart from sampling), and XLA compiles are counted.

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_ACTIVE: list[Timings] = []


def _on_compile_event(name: str, secs: float, **kwargs) -> None:
    if _ACTIVE and name in _COMPILE_EVENTS:
        _ACTIVE[-1].compile_s += secs
        if name == _COMPILE_EVENTS[-1]:
            _ACTIVE[-1].compiles += 1


jax.monitoring.register_event_duration_secs_listener(_on_compile_event)


# ----------------------------------------------------------------------------------------------------------------
# Device functions. Module-level jitted functions whose static arguments are the System (equal architectures
# share programs), shapes and output shardings: parameters, seeds, guidance scales and timesteps are inputs.


@dataclasses.dataclass(frozen=True)
class GuidedModel:
    """``model_fn`` of `samplers.guided_step` for a System: rows ``3b+k`` are sample b's (uncond, image, full)
    branch. A text-to-video system has no image branch: its image-only row equals the unconditional one, so only
    rows ``3b`` and ``3b+2`` are run."""

    system: System

    def __call__(self, params, x3, t3, text3, image3):
        if self.system.mode == "dreamvideo":
            return self.system.predict(params, x3, t3, text3, image3)
        n = x3.shape[0] // 3
        pick = lambda a: a.reshape((n, 3) + a.shape[1:])[:, ::2].reshape((2 * n,) + a.shape[1:])  # noqa: E731
        out = self.system.predict(params, pick(x3), pick(t3), pick(text3))
        out = out.reshape((n, 2) + out.shape[1:])
        return jnp.stack([out[:, 0], out[:, 0], out[:, 1]], axis=1).reshape(x3.shape)


@dataclasses.dataclass(frozen=True)
class AdaptedModel:
    """A model function whose first argument is ``(model params, [(adapter tree, factor), ...])``: the adapters'
    updates are added to the weights inside every call (unmerged LoRA; the factors are inputs)."""

    model: Any

    def __call__(self, bundle, *args):
        params, adapters = bundle
        return self.model(lora_lib.apply(params, [(tree, factor) for tree, factor in adapters]), *args)


@functools.partial(jax.jit, static_argnames=("system", "out_sharding"))
def encode_text(system: System, text_params, ids, *, out_sharding=None):
    """Token ids ``(B, L)`` -> float32 text embeddings ``(B, L, D)``."""
    out = system.encode_text({"text_encoder": text_params}, ids).astype(jnp.float32)
    return out if out_sharding is None else jax.lax.with_sharding_constraint(out, out_sharding)


@functools.partial(jax.jit, static_argnames=("system", "shape", "need_latent", "from_still", "out_sharding"))
def prepare(system: System, vae_params, seeds, stage, images_u8, start_scales=None, last_u8=None, last_given=None,
            *, shape, need_latent, from_still=False, out_sharding=None):
    """Initial noise, per-sample keys, the model's image input, the reference latent and the replacement noise
    of a batch, and the last frame's latent and replacement noise: sample b uses ``fold_in(key(seeds[b]), stage)``
    for everything. ``last_u8`` / ``last_given`` ``(B,)``: the last frames of the samples that have one
    (first+last-frame videos and loops; ``None``: no sample has one).

    With ``from_still`` the start is the still video (the reference latent in every frame) noised to the first
    step's level, ``start_scales = (sqrt(abar), sqrt(1 - abar))``, with the same noise (``sample.motion_strength``).
    """
    b, f, h, w, c = shape
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stage))(seeds)
    x_t = samplers.initial_noise(keys, shape)
    images = images_u8.astype(jnp.float32) / 127.5 - 1.0
    if need_latent:
        latent = system.image_latent({"vae": vae_params}, images).astype(jnp.float32)
    else:
        latent = jnp.zeros((b, h, w, c), jnp.float32)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _REPLACEMENT_NOISE_SALT), (h, w, c),
                                                 jnp.float32))(keys)
    last_images = None if last_u8 is None else last_u8.astype(jnp.float32) / 127.5 - 1.0
    if last_images is not None and need_latent:
        last_latent = system.image_latent({"vae": vae_params}, last_images).astype(jnp.float32)
    else:
        last_latent = jnp.zeros((b, h, w, c), jnp.float32)
    last_noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _LAST_REPLACEMENT_NOISE_SALT), (h, w, c),
                                                      jnp.float32))(keys)
    if from_still:
        alpha, sigma = start_scales[0], start_scales[1]
        x_t = alpha * jnp.broadcast_to(latent[:, None], shape) + sigma * x_t
    if system.mode == "t2v":
        model_image = jnp.zeros((b, 1), jnp.float32)
    else:
        latent_input = system.image_input == "latent"
        last_input = None  # a model without a last-frame input only pins it (replacement)
        if last_images is not None and system.last_frame:
            last_input = last_latent if latent_input else last_images
        model_image = system.model_image(latent if latent_input else images, last_input,
                                         None if last_input is None else last_given)
    out = (x_t, model_image, latent, noise, last_latent, last_noise)
    if out_sharding is not None:
        out = tuple(jax.lax.with_sharding_constraint(a, out_sharding) for a in out)
    return out + (keys,)


@functools.partial(jax.jit, static_argnames=("system", "chunk", "out_sharding"))
def decode(system: System, vae_params, latents, *, chunk: int, out_sharding=None):
    """Latents ``(B, F, h, w, C)`` -> uint8 frames ``(B, F, H, W, 3)``, ``chunk`` frames of every sample at a
    time (samples stay on their devices)."""
    b, f = latents.shape[:2]
    n = -(-f // chunk)
    variables = system.vae_variables({"vae": vae_params})
    zp = jnp.pad(latents, ((0, 0), (0, n * chunk - f)) + ((0, 0),) * (latents.ndim - 2))
    zc = jnp.moveaxis(zp.reshape((b, n, chunk) + latents.shape[2:]), 1, 0)  # (n, B, chunk, h, w, C)

    def one(zz):
        frames = system.autoencoder.apply(variables, zz.reshape((b * chunk,) + latents.shape[2:]), method="decode")
        return _to_uint8(frames).reshape((b, chunk) + frames.shape[1:])

    out = jax.lax.map(one, zc)  # (n, B, chunk, H, W, 3)
    out = jnp.moveaxis(out, 0, 1).reshape((b, n * chunk) + out.shape[3:])[:, :f]
    return out if out_sharding is None else jax.lax.with_sharding_constraint(out, out_sharding)


class Sampler:
    """Samples videos from a DreamVideo (or text-to-video) model.

    Args:
        config: the model's config (``model``, ``diffusion``, ``train.prediction_type``, optional ``sample`` and
            ``data.pad_id``; e.g. ``checkpoints.load(path).config``).
        params: weights in the system's layout (`dreamvideo_jax.system`), numpy or jax arrays, e.g.
            `checkpoints.load(path).params` or `System(config).random_params()`.
        mesh: devices to split batches over (see the module docstring); ``None`` = local devices, automatically.
        mode: ``'dreamvideo'`` | ``'t2v'`` | ``None`` (from the weights). ``'t2v'`` on DreamVideo weights runs
            their primary U-Net alone.
        tokenizer: a CLIP tokenizer object; default: ``config.sample.tokenizer`` / ``tokenizer_dir`` / CLIP built
            offline from open_clip's vocabulary.
        tokenizer_dir: a tokenizer folder shipped with the weights (used when ``config.sample.tokenizer`` is '').
        lora: LoRA adapters to stack on the weights, ``[(lora.Adapter, scale), ...]`` (`lora.load_all`).
        lora_merge: add the adapters' updates to the weights once, here (True: no cost per step), or inside every
            denoising step (False: the weights stay as given, the scales are inputs of the step).

    Raises:
        CheckpointError: weights (or adapters) that do not fit the model, naming the first mismatch.
    """

    def __init__(self, config, params: dict, *, mesh: Mesh | None = None, mode: str | None = None,
                 tokenizer: Any = None, tokenizer_dir: str | None = None,
                 lora: Sequence[tuple[Any, float]] = (), lora_merge: bool = True):
        self.config = config
        self.options = sample_config.resolve(config)
        self.system = System(config, mode)
        self.mode = self.system.mode
        self.prediction_type = self.system.prediction_type
        self.schedule = self.system.schedule
        self.factor = self.system.factor
        # Nothing is trained here: every weight is stored in model.frozen_dtype ('bfloat16' halves them).
        params = self.system.conform(params, "the weights")
        model_abstract = self.system.model_params(self.system.abstract)
        for adapter, _ in lora:
            lora_lib.check_fits(adapter, model_abstract)
        self._lora: list[tuple[dict, np.ndarray]] = []
        if lora and lora_merge:
            params = lora_lib.apply(jax.tree.map(np.asarray, params), lora_lib.stack(lora))
        elif lora:
            self._lora = [(tree, np.float32(f)) for tree, f in lora_lib.stack(lora)]
        self._params = self.system.store_frozen(params)
        self._tokenizer = tokenizer
        self._tokenizer_dir = tokenizer_dir
        self._mesh = mesh
        self._placed: tuple[Any, Any] | None = None  # (mesh key, params on that mesh): one copy at a time
        self._null: dict[Any, jax.Array] = {}
        self.timings = Timings()

    # ----------------------------------------------------------------------------------------------------------
    # Public API

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def default_size(self) -> tuple[int, int, int]:
        """``(num_frames, height, width)`` when not given: ``sample.*`` if set, else the config's clip size."""
        o, c = self.options, self.config
        return (int(o.num_frames or c.get("num_frames", 16)), int(o.height or c.get("height", 256)),
                int(o.width or c.get("width", 256)))

    def generate(self, images: Any, prompts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Videos for a batch of (image, prompt) pairs: uint8 ``(B, F, H, W, 3)``.

        Args:
            images: uint8 pixels or floats in [-1, 1]; one image ``(H, W, 3)`` for every prompt, a batch
                ``(B, H, W, 3)`` or a list of images of any sizes (each resized and centre-cropped). Floats are
                quantised to uint8 first, so a float image and its uint8 rendering give the same video (and a
                chain's later stages are conditioned exactly like its first). May be ``None`` for a
                text-to-video model without first-frame replacement.
            prompts: one prompt or ``B`` prompts; ``""`` = text-unconditional.
            **kwargs: ``num_frames, height, width, image_guidance, text_guidance, steps, sampler, seed, eta,
                first_frame_replacement, negative_prompt, motion_strength, last_images, seamless_loop,
                progress`` -- see :meth:`sample_latents`.
        """
        latents = self.sample_latents(images, prompts, **kwargs)
        return self.decode(latents)

    def sample_latents(self, images: Any, prompts: str | Sequence[str], *, num_frames: int | None = None,
                       height: int | None = None, width: int | None = None,
                       image_guidance: float | Sequence[float] | None = None,
                       text_guidance: float | Sequence[float] | None = None, steps: int | None = None,
                       sampler: str | None = None, seed: int | Sequence[int] | None = None,
                       eta: float | None = None, first_frame_replacement: bool | None = None,
                       negative_prompt: str | None = None, motion_strength: float | None = None,
                       last_images: Any = None, seamless_loop: bool | None = None,
                       progress: bool = False, stage: int = 0) -> np.ndarray:
        """Denoised latents ``(B, F, h, w, C)`` float32, before decoding (save them: decoding is the memory peak).

        ``None`` arguments take ``config.sample``'s defaults. Guidance scales and seeds may be per sample.
        ``negative_prompt`` replaces ``""`` as the text of the unconditional and image-only branches (one for
        the whole batch), so guidance pushes away from it.
        ``motion_strength`` in [0, 1] (default 1, full motion) starts from the noised still video and runs only
        the last part of the steps (see `sampling.config`).
        ``last_images``: the video's last frame(s), as ``images`` (a list may hold ``None`` for samples without
        one); ``seamless_loop``: the last frame is the reference image itself (a loop). Both need a model with
        ``model.retention.last_frame`` or ``first_frame_replacement`` (which then pins the last frame too).
        ``stage`` selects the random stream of a chain's stage (0 for single clips).
        """
        self.timings = Timings()
        req = self._request(images, prompts, num_frames, height, width, image_guidance, text_guidance, steps,
                            sampler, seed, eta, first_frame_replacement, negative_prompt,
                            motion_strength=motion_strength, last_images=last_images, seamless_loop=seamless_loop)
        latents = self._sample(req, stage, progress)
        return np.asarray(jax.device_get(latents))[: req.batch]

    def decode(self, latents: Any) -> np.ndarray:
        """Latents ``(B, F, h, w, C)`` -> uint8 videos ``(B, F, H, W, 3)`` (``sample.decode_chunk_size`` frames of
        each sample at a time)."""
        latents = np.asarray(latents, np.float32)
        b = latents.shape[0]
        mesh, padded = self._mesh_for(b)
        latents = np.concatenate([latents, np.repeat(latents[-1:], padded - b, 0)]) if padded > b else latents
        with self._timed("decode_s"):
            video = self._decode(mesh, jax.device_put(latents, self._batch_sharding(mesh)))
            out = np.asarray(jax.device_get(video))[:b]
        return out

    def generate_chain(self, images: Any, prompts: Sequence[str] | Sequence[Sequence[str]], *,
                       drop_repeated_frame: bool = False,
                       on_stage: Callable[[int, np.ndarray, np.ndarray | None], None] | None = None,
                       **kwargs) -> ChainResult:
        """Multi-stage videos: stage ``k+1`` starts from the last frame of stage ``k`` (see the module docstring).

        Args:
            images: the input image(s), as for :meth:`generate`.
            prompts: one entry per stage; each a prompt for every sample or a list of ``B`` prompts.
            drop_repeated_frame: leave out each later stage's first frame when joining.
            last_images / seamless_loop (in kwargs): the last frame of the whole video, given to the last stage
                (``seamless_loop``: the first stage's reference, so the chain closes into a loop).
            on_stage: ``on_stage(stage, latents, video)`` is called with a stage's latents as soon as they are
                sampled (``video=None``, before the decode), then again with its decoded video.
            **kwargs: as for :meth:`sample_latents` (``seed`` / guidance may be per sample).
        """
        if isinstance(prompts, str) or not prompts:
            raise inputs.InputError("prompt", prompts, "generate_chain takes a list of prompts, one per stage")
        stage_prompts = [[p] if isinstance(p, str) else list(p) for p in prompts]
        batch = max([len(p) for p in stage_prompts] + [_batch_size(images, stage_prompts[0], kwargs.get("seed"),
                                                                   kwargs.get("image_guidance"),
                                                                   kwargs.get("text_guidance"))])
        stage_prompts = [p * batch if len(p) == 1 else p for p in stage_prompts]
        if any(len(p) != batch for p in stage_prompts):
            raise inputs.InputError("prompt", prompts, f"every stage needs 1 or {batch} prompts")
        timings = Timings()
        refs, stages, latents = [], [], []
        current = images
        last_images, loop = kwargs.get("last_images"), kwargs.get("seamless_loop")
        seeds = None
        for k, stage_p in enumerate(stage_prompts):
            self.timings = Timings()
            req = self._request(current, stage_p, **{n: kwargs.get(n) for n in (
                "num_frames", "height", "width", "image_guidance", "text_guidance", "steps", "sampler", "seed",
                "eta", "first_frame_replacement", "negative_prompt", "motion_strength")}, quiet=k > 0,
                last_images=last_images if k == len(stage_prompts) - 1 else None,
                seamless_loop=loop if k == len(stage_prompts) - 1 else False,
                loop_images=refs[0] if refs else None)
            if k == 0:
                seeds = req.seeds[: req.batch]
            refs.append(req.images[: req.batch])
            lat = np.asarray(jax.device_get(self._sample(req, k, kwargs.get("progress", False))))[: req.batch]
            if on_stage is not None:
                on_stage(k, lat, None)
            video = self.decode(lat)
            if on_stage is not None:
                on_stage(k, lat, video)
            latents.append(lat)
            stages.append(video)
            current = video[:, -1]  # exactly the frame the user sees
            for f in dataclasses.fields(Timings):
                setattr(timings, f.name, getattr(timings, f.name) + getattr(self.timings, f.name))
        self.timings = timings
        references = np.stack(refs, axis=1)
        parts = [stages[0]] + [s[:, 1:] if drop_repeated_frame else s for s in stages[1:]]
        video = np.concatenate(parts, axis=1)
        starts = np.cumsum([p.shape[1] for p in parts])[:-1]
        chain_drift = drift.chain_drift(references[:, 0], references, stages, video, starts)
        return ChainResult(video, stages, references, latents, chain_drift, stage_prompts, list(seeds))

    # ----------------------------------------------------------------------------------------------------------
    # Requests

    def _request(self, images, prompts, num_frames, height, width, image_guidance, text_guidance, steps, sampler,
                 seed, eta, first_frame_replacement, negative_prompt=None, quiet: bool = False,
                 motion_strength=None, last_images=None, seamless_loop=None, loop_images=None) -> _Request:
        o = self.options
        f0, h0, w0 = self.default_size()
        num_frames = inputs.check_positive_int("num_frames", f0 if num_frames is None else num_frames, "num_frames")
        height = inputs.check_size("height", h0 if height is None else height, self.factor)
        width = inputs.check_size("width", w0 if width is None else width, self.factor)
        sampler = inputs.check_sampler(o.sampler if sampler is None else sampler)
        steps = inputs.check_steps(o.steps if steps is None else steps, sampler, self.num_train_timesteps,
                              o.timestep_spacing, int(o.steps_offset))
        eta = inputs.check_eta(o.eta if eta is None else eta, sampler)
        strength = inputs.check_motion_strength(o.motion_strength if motion_strength is None else motion_strength)
        replace = bool(o.first_frame_replacement if first_frame_replacement is None else first_frame_replacement)
        negative = o.negative_prompt if negative_prompt is None else negative_prompt
        if not isinstance(negative, str):
            raise inputs.InputError("negative_prompt", negative, "must be a string")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise inputs.InputError("prompt", prompts, "no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise inputs.InputError("prompt", p, f"prompt {i} is not a string")
        b = _batch_size(images, prompts, seed, image_guidance, text_guidance)
        if len(prompts) == 1:
            prompts = prompts * b
        elif len(prompts) != b:
            raise inputs.InputError("prompt", prompts, f"expected one prompt or {b} (one per sample)")
        if images is None:
            if self.mode == "dreamvideo" or replace:
                raise inputs.InputError("image", None, "a reference image is required"
                                   + (" for first-frame replacement" if replace else " by a DreamVideo model"))
            images_u8 = np.zeros((b, height, width, 3), np.uint8)
        else:
            if isinstance(images, (list, tuple)) and len(images) == 1 and b > 1:
                images = images[0]
            images_u8 = inputs.as_uint8_images(images, height, width, batch=b)
            if self.mode == "t2v" and not replace and not quiet:
                log.warning("the text-to-video model ignores the reference image; pass first_frame_replacement "
                            "(--first_frame_replacement) to start the video from it")
        image_scale = [inputs.check_guidance("image_guidance", float(v)) for v in
                       inputs.per_sample(o.image_guidance if image_guidance is None else image_guidance, b,
                                    "image_guidance")]
        text_scale = [inputs.check_guidance("text_guidance", float(v)) for v in
                      inputs.per_sample(o.text_guidance if text_guidance is None else text_guidance, b, "text_guidance")]
        if self.mode == "t2v" and any(s != 1.0 for s in image_scale) and not quiet:
            log.info("image_guidance has no effect on a text-to-video model (no image branch)")
        seeds = inputs.seeds_for(int(o.seed) if seed is None else seed, b)
        _, padded = self._mesh_for(b)
        last_u8, last_given = self._last_frames(
            last_images, bool(o.seamless_loop if seamless_loop is None else seamless_loop),
            images_u8 if loop_images is None else loop_images, replace, b, padded, height, width)
        return _Request(
            batch=b, padded=padded,
            images=np.concatenate([images_u8, np.repeat(images_u8[-1:], padded - b, 0)]),
            prompts=_pad(prompts, padded), seeds=_pad(seeds, padded),
            image_scale=np.asarray(_pad(image_scale, padded), np.float32),
            text_scale=np.asarray(_pad(text_scale, padded), np.float32),
            num_frames=num_frames, height=height, width=width, steps=steps, sampler=sampler, eta=eta,
            replace=replace, negative_prompt=negative, motion_strength=strength,
            last_images=last_u8, last_given=last_given,
        )  # fmt: skip

    def _last_frames(self, last_images, loop: bool, loop_images, replace: bool, b: int, padded: int, height: int,
                     width: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The last frames of a request, uint8 ``(P, H, W, 3)`` (zeros where not given) and which are given
        ``(P,)``; ``(None, None)`` when none is."""
        if loop and last_images is not None:
            raise inputs.InputError("seamless_loop", True, "a loop ends on the reference image itself; give either "
                                    "a last image or the seamless loop, not both")
        if last_images is None and not loop:
            return None, None
        if not (self.system.last_frame or replace):
            what = "seamless_loop" if loop else "last_image"
            raise inputs.InputError(what, True if loop else "(given)", "this model was not trained with a last "
                                    "frame (model.retention.last_frame is False); sample with "
                                    "--config.sample.first_frame_replacement=true to pin the last frame instead")
        if loop:
            u8, given = np.asarray(loop_images)[:b], np.ones((b,), bool)
        elif not isinstance(last_images, (list, tuple)):  # one image for every sample, or a batch array
            u8, given = inputs.as_uint8_images(last_images, height, width, batch=b), np.ones((b,), bool)
        else:  # a list: 1 or b images, None where a sample has no last frame (its channels stay zero)
            items = list(last_images) * b if len(last_images) == 1 else list(last_images)
            if len(items) != b:
                raise inputs.InputError("last_image", f"{len(items)} images", f"expected 1 or {b} (one per sample)")
            given = np.asarray([im is not None for im in items])
            blank = np.zeros((height, width, 3), np.uint8)
            u8 = inputs.as_uint8_images([blank if im is None else im for im in items], height, width, batch=b)
        return (np.concatenate([u8, np.repeat(u8[-1:], padded - b, 0)]),
                np.concatenate([given, np.repeat(given[-1:], padded - b, 0)]))

    # ----------------------------------------------------------------------------------------------------------
    # Devices

    def _mesh_for(self, batch: int) -> tuple[Mesh, int]:
        if self._mesh is not None:
            k = mesh_lib.batch_divisor(self._mesh)
            return self._mesh, -(-batch // k) * k
        return mesh_lib.fewest_devices_mesh(batch, jax.local_devices())

    @staticmethod
    def _batch_sharding(mesh: Mesh) -> NamedSharding:
        return NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))

    @staticmethod
    def _mesh_key(mesh: Mesh) -> tuple:
        return (tuple(d.id for d in mesh.devices.flat), tuple(mesh.axis_names), tuple(mesh.devices.shape))

    def _placed_params(self, mesh: Mesh) -> dict:
        key = self._mesh_key(mesh)
        if self._placed is None or self._placed[0] != key:
            self._placed = None  # free the previous copy first
            rep = NamedSharding(mesh, P())
            self._placed = (key, jax.device_put({"params": self._params, "schedule": self.schedule,
                                                 "lora": self._lora}, rep))
        return self._placed[1]

    @contextlib.contextmanager
    def _timed(self, field: str):
        """Adds the wall time of the block, less the compile time inside it, to ``self.timings.<field>``."""
        compile_before = self.timings.compile_s
        _ACTIVE.append(self.timings)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _ACTIVE.pop()
            spent = time.perf_counter() - t0 - (self.timings.compile_s - compile_before)
            setattr(self.timings, field, getattr(self.timings, field) + spent)

    # ----------------------------------------------------------------------------------------------------------
    # Device work

    def _tokenizer_obj(self):
        if self._tokenizer is None:
            path = self.options.tokenizer or self._tokenizer_dir
            self._tokenizer = tokenizer_lib.load_tokenizer(path) if path else tokenizer_lib.clip_tokenizer()
        return self._tokenizer

    def tokens(self, prompts: list[str]) -> np.ndarray:
        """Token ids `(B, L)` of `prompts` with the system's padding (a warning names prompts that are cut)."""
        tokenizer = self._tokenizer_obj()
        length = self.system.context_length
        for p in dict.fromkeys(prompts):
            n = tokenizer_lib.num_tokens(tokenizer, p)
            if n > length:
                log.warning("prompt %r is %d tokens long; truncated to the text encoder's %d", p[:80] +
                            ("..." if len(p) > 80 else ""), n, length)
        return tokenizer_lib.tokenize(tokenizer, prompts, length, self.system.pad_id)

    def _encode_text(self, mesh: Mesh, params: dict, prompts: list[str],
                     negative: str = "") -> tuple[jax.Array, jax.Array]:
        bs = self._batch_sharding(mesh)
        text_params = params["params"]["text_encoder"]
        ids = jax.device_put(self.tokens(prompts), bs)
        with jax.set_mesh(mesh):  # the context mesh: attention kernels shard themselves over it (models/attention.py)
            context = encode_text(self.system, text_params, ids, out_sharding=bs)
        key = (self._mesh_key(mesh), len(prompts), negative)
        if key not in self._null:
            if len(self._null) > 16:
                self._null.clear()
            null_ids = jax.device_put(self.tokens([negative] * len(prompts)), bs)
            with jax.set_mesh(mesh):
                null = encode_text(self.system, text_params, null_ids, out_sharding=bs)
            self._null[key] = jax.device_put(null[0], NamedSharding(mesh, P()))
        return context, self._null[key]

    def _step_inputs(self, req: _Request, mesh: Mesh, params: dict, place: Callable, context, null, prepared):
        """The denoising loop's arguments: ``(model, schedule, state, rows, cond, knobs, ref, static)``, where
        ``rows`` is the ``(N, 5)`` plan. ``place(numpy, sharding)`` puts host values on the mesh (`jax.device_put`,
        or abstract values for :meth:`lower`); the other arguments are device values or abstract ones alike."""
        bs = self._batch_sharding(mesh)
        rep = NamedSharding(mesh, P())
        x_t, model_image, latent, noise, last_latent, last_noise, keys = prepared
        cond = samplers.Conditioning(context, null, model_image)
        knobs = samplers.Knobs(place(req.image_scale, bs), place(req.text_scale, bs), place(np.float32(req.eta), rep),
                               keys)
        # Replacement pins the given last frames too (always passed, so requests with and without a last frame
        # run the same compiled step).
        given = np.zeros((req.padded,), bool) if req.last_given is None else np.asarray(req.last_given)
        ref = samplers.Reference(latent, noise, place(np.full((req.padded,), req.replace), bs), last_latent,
                                 last_noise, place(given & req.replace, bs))
        state = samplers.SamplerState(x_t, place(np.zeros(x_t.shape, np.float32), bs))
        o = self.options
        rows = samplers.sampling_plan(self._timesteps(req), bool(o.set_alpha_to_one)).rows()
        model_params = self.system.model_params(params["params"])
        if params.get("lora"):  # unmerged adapters: added to the weights inside the step
            model = jax.tree_util.Partial(AdaptedModel(GuidedModel(self.system)), (model_params, params["lora"]))
        else:
            model = jax.tree_util.Partial(GuidedModel(self.system), model_params)
        static = dict(sampler=req.sampler, prediction_type=self.prediction_type,
                      set_alpha_to_one=bool(o.set_alpha_to_one))
        return model, params["schedule"], state, rows, cond, knobs, ref, static

    def _timesteps(self, req: _Request) -> np.ndarray:
        """The timesteps a request runs: the sampler's ``steps`` of them, less the first ones that
        ``motion_strength < 1`` skips."""
        o = self.options
        make_ts = samplers.ddim_timesteps if req.sampler == "ddim" else samplers.dpmsolver_timesteps
        timesteps = make_ts(req.steps, self.num_train_timesteps, o.timestep_spacing, int(o.steps_offset))
        return timesteps[inputs.start_step(len(timesteps), req.motion_strength):]

    def _prepare_args(self, req: _Request, mesh: Mesh, params: dict, place: Callable, stage: int):
        """Arguments of `prepare` for a request (positional, keyword)."""
        bs = self._batch_sharding(mesh)
        system = self.system
        h, w = req.height // self.factor, req.width // self.factor
        shape = (req.padded, req.num_frames, h, w, system.latent_channels)
        from_still = req.motion_strength < 1.0
        need_latent = req.replace or from_still or (self.mode == "dreamvideo" and system.image_input == "latent")
        args = (system, params["params"]["vae"], place(np.asarray(req.seeds, np.uint32), bs),
                place(np.int32(stage), NamedSharding(mesh, P())), place(req.images, bs))
        if from_still:
            t0 = int(self._timesteps(req)[0])
            sch = self.schedule  # the forward process's own scales (as training noises)
            scales = np.asarray([np.asarray(sch.sqrt_alphas_cumprod)[t0],
                                 np.asarray(sch.sqrt_one_minus_alphas_cumprod)[t0]], np.float32)
            args += (place(scales, NamedSharding(mesh, P())),)
        if req.last_images is not None:
            args = args if from_still else args + (None,)
            args += (place(req.last_images, bs), place(np.asarray(req.last_given), bs))
        return args, dict(shape=shape, need_latent=need_latent, from_still=from_still, out_sharding=bs)

    def _sample(self, req: _Request, stage: int, progress: bool) -> jax.Array:
        """The padded latents of one request, on device."""
        mesh, _ = self._mesh_for(req.batch)
        params = self._placed_params(mesh)
        rep = NamedSharding(mesh, P())

        with self._timed("text_s"):
            context, null = self._encode_text(mesh, params, req.prompts, req.negative_prompt)
            jax.block_until_ready(context)

        with self._timed("prepare_s"):
            args, kwargs = self._prepare_args(req, mesh, params, jax.device_put, stage)
            with jax.set_mesh(mesh):
                prepared = prepare(*args, **kwargs)
            jax.block_until_ready(prepared[0])

        model, schedule, state, rows, cond, knobs, ref, static = self._step_inputs(
            req, mesh, params, jax.device_put, context, null, prepared)
        o = self.options
        row_list = [jax.device_put(rows, rep)] if o.loop == "scan" else [jax.device_put(r, rep) for r in rows]
        with self._timed("sample_s"):
            if o.loop == "scan":
                with jax.set_mesh(mesh):
                    state = samplers.guided_scan(model, schedule, state, row_list[0], cond, knobs, ref, **static)
                jax.block_until_ready(state.x)
            else:
                bar = None
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=len(rows), desc=f"stage {stage + 1}" if stage else "sampling", unit="step",
                               leave=False, dynamic_ncols=True)
                prev = None
                for row in row_list:
                    with jax.set_mesh(mesh):
                        state = samplers.guided_step(model, schedule, state, row, cond, knobs, ref, **static)
                    if prev is not None:  # keep one step queued; the bar tracks finished steps
                        jax.block_until_ready(prev)
                        if bar is not None:
                            bar.update(1)
                    prev = state.x
                jax.block_until_ready(state.x)
                if bar is not None:
                    bar.update(1)
                    bar.close()
        self.timings.steps += len(rows)
        return state.x

    # ----------------------------------------------------------------------------------------------------------
    # Ahead-of-time lowering

    def lower(self, batch: int = 1, *, mesh: Mesh | None = None, **kwargs) -> dict[str, jax.stages.Lowered]:
        """The programs one clip request runs, lowered for abstract inputs (nothing is computed or allocated):
        ``{'encode_text', 'prepare', 'step', 'decode'}`` (``'step'`` is the whole loop when
        ``sample.loop='scan'``). The arguments are assembled by the same code as :meth:`generate`'s, so these
        are the programs a real call compiles; ``lowered.compile()`` runs the target's compiler (the devices of
        ``mesh`` may come from a TPU topology description; see ``dreamvideo_jax.aot``).

        Args:
            batch: samples per call.
            mesh: devices to lay the batch over (default: the sampler's mesh, else its automatic choice).
            **kwargs: ``num_frames, height, width, steps, sampler, first_frame_replacement, motion_strength,
                seamless_loop`` as for :meth:`sample_latents`.
        """
        known = {"num_frames", "height", "width", "steps", "sampler", "first_frame_replacement", "motion_strength",
                 "seamless_loop"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"Sampler.lower: unknown arguments {unknown}; known: {sorted(known)}")
        saved = self._mesh
        self._mesh = mesh if mesh is not None else self._mesh
        try:
            _, h0, w0 = self.default_size()
            images = np.zeros((kwargs.get("height") or h0, kwargs.get("width") or w0, 3), np.uint8)
            req = self._request(images, [""] * batch, kwargs.get("num_frames"), kwargs.get("height"),
                                kwargs.get("width"), None, None, kwargs.get("steps"), kwargs.get("sampler"), None,
                                None, kwargs.get("first_frame_replacement"), quiet=True,
                                motion_strength=kwargs.get("motion_strength"),
                                seamless_loop=kwargs.get("seamless_loop"))
            mesh, _ = self._mesh_for(req.batch)
        finally:
            self._mesh = saved
        rep = NamedSharding(mesh, P())
        bs = self._batch_sharding(mesh)

        def place(x, sharding):
            return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding)

        def abstract(tree, sharding):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)

        def shaped(structs, sharding):  # eval_shape's outputs with the shardings the programs constrain them to
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), structs)

        with jax.set_mesh(mesh):  # as the real calls: attention kernels shard themselves over the context mesh
            params = abstract({"params": self._params, "schedule": self.schedule, "lora": self._lora}, rep)
            out: dict[str, jax.stages.Lowered] = {}
            ids = place(np.zeros((req.padded, self.system.context_length), np.int32), bs)
            text_fn = functools.partial(encode_text, self.system, out_sharding=bs)
            out["encode_text"] = encode_text.lower(self.system, params["params"]["text_encoder"], ids, out_sharding=bs)
            context = shaped(jax.eval_shape(text_fn, params["params"]["text_encoder"], ids), bs)
            null = jax.ShapeDtypeStruct(context.shape[1:], context.dtype, sharding=rep)
            args, pkw = self._prepare_args(req, mesh, params, place, 0)
            out["prepare"] = prepare.lower(*args, **pkw)
            prepared = jax.eval_shape(lambda *a: prepare(args[0], *a, **pkw), *args[1:])
            prepared = tuple(shaped(a, bs) for a in prepared)
            model, schedule, state, rows, cond, knobs, ref, static = self._step_inputs(
                req, mesh, params, place, context, null, prepared)
            if self.options.loop == "scan":
                out["step"] = samplers.guided_scan.lower(model, schedule, state, place(rows, rep), cond, knobs, ref,
                                                         **static)
            else:
                out["step"] = samplers.guided_step.lower(model, schedule, state, place(rows[0], rep), cond, knobs, ref,
                                                         **static)
            f = req.num_frames
            chunk = min(int(self.options.decode_chunk_size) or f, f)
            out["decode"] = decode.lower(self.system, params["params"]["vae"], state.x, chunk=chunk, out_sharding=bs)
        return out

    def _decode(self, mesh: Mesh, latents: jax.Array) -> jax.Array:
        f = latents.shape[1]
        chunk = min(int(self.options.decode_chunk_size) or f, f)
        params = self._placed_params(mesh)
        with jax.set_mesh(mesh):
            return decode(self.system, params["params"]["vae"], latents, chunk=chunk,
                          out_sharding=self._batch_sharding(mesh))
