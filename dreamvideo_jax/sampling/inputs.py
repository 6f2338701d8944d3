"""Sampling inputs: reference images, prompt files and argument checks with errors that name the argument.

Every problem a user can cause raises :class:`InputError`, whose message is one line naming the argument (the
command-line flag of the same name) and the offending value, e.g.
``--height=20: must be a multiple of 8 (the autoencoder's down-sampling factor)``.

Images. Anything Pillow opens is accepted: RGB; RGBA / LA / transparent palette images are composited over white
(the RGB values under transparent pixels are arbitrary, often black); grayscale, palette, CMYK, YCbCr, 16-bit and
float images are converted to 8-bit RGB; EXIF orientation is applied (phone photos stand upright); of an animated
image the first frame is used. Any size is scaled to cover the target size (aspect ratio kept, Lanczos) and
centre-cropped, with a log line saying what happened -- the same "resize short side, centre crop" training
applies to its frames.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreamvideo_jax.errors import InputError

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".mp4", ".gif", ".npz")




# ------------------------------------------------------------------------------------------------------------
# Images


def read_image(path: str, name: str = "image") -> np.ndarray:
    """Reads an image file as uint8 RGB ``(H, W, 3)`` at its own size (see the module docstring).

    Raises:
        InputError: missing file, a directory, an unsupported format or a corrupt file.
    """
    if not path:
        raise InputError(name, path, "no image given")
    if not os.path.exists(path):
        raise InputError(name, path, "no such file")
    if os.path.isdir(path):
        raise InputError(name, path, "is a directory, not an image file")
    try:
        with Image.open(path) as img:
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                log.info("%s has %d frames; using the first", path, n_frames)
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img, path)
    except UnidentifiedImageError:
        raise InputError(name, path, "not an image format Pillow can read (unsupported format or not an "
                                     "image)") from None
    except Image.DecompressionBombError as e:
        raise InputError(name, path, f"too large to open safely ({' '.join(str(e).split())}); downscale it "
                                     "first") from None
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(name, path, f"unreadable image ({type(e).__name__}: {' '.join(str(e).split())})") from None


def to_rgb(img: Image.Image, what: str = "image") -> np.ndarray:
    """Any Pillow image -> uint8 RGB ``(H, W, 3)``; transparency is composited over white."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode == "F":
            scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if np.nanmax(a, initial=0.0) > 255 else 1.0
        a = np.clip(np.round(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
        log.info("%s: %s image converted to 8-bit RGB", what, mode)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=-1))
    if img.mode == "RGBA":
        if img.getextrema()[3][0] < 255:
            log.info("%s: transparent pixels composited over white", what)
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode != "RGB":
        if mode not in ("P", "RGBA"):
            log.info("%s: %s image converted to RGB", what, mode)
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def fit_image(rgb: np.ndarray, height: int, width: int, what: str = "image") -> np.ndarray:
    """Scales a uint8 RGB image to cover ``(height, width)`` and centre-crops it; logs what was done.

    The crop box is computed in source pixels and resampled once (Lanczos), so no second rounding step blurs it.
    """
    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    scale = max(height / h, width / w)
    crop_h, crop_w = height / scale, width / scale  # source region with the target's aspect ratio
    top, left = (h - crop_h) / 2.0, (w - crop_w) / 2.0
    img = Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS,
                                      box=(left, top, left + crop_w, top + crop_h))
    cover_h, cover_w = round(h * scale), round(w * scale)
    crop = "" if (cover_h, cover_w) == (height, width) else f" and centre-cropped to {width}x{height}"
    log.info("%s: %dx%d resized to %dx%d%s", what, w, h, cover_w, cover_h, crop)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str, height: int, width: int, name: str = "image") -> np.ndarray:
    """:func:`read_image` then :func:`fit_image`: uint8 ``(height, width, 3)``."""
    return fit_image(read_image(path, name), height, width, what=path)


def as_uint8_images(images: Any, height: int, width: int, batch: int | None = None) -> np.ndarray:
    """Reference images as uint8 ``(B, height, width, 3)``.

    Accepts one image ``(H, W, 3)`` (repeated ``batch`` times), a batch ``(B, H, W, 3)`` or a list of images of
    any sizes; uint8 values are pixels, floats are in [-1, 1] (the model's range). Images of another size are
    resized and centre-cropped (:func:`fit_image`).
    """
    if isinstance(images, (list, tuple)):
        items = [np.asarray(im) for im in images]
    else:
        arr = np.asarray(images)
        if arr.ndim == 3:  # one image for the whole batch: converted once
            one = as_uint8_images([arr], height, width)
            return np.repeat(one, batch or 1, axis=0)
        elif arr.ndim == 4:
            items = list(arr)
        else:
            raise InputError("image", f"array of shape {arr.shape}", "expected (H, W, 3) or (B, H, W, 3)")
    out = []
    for i, im in enumerate(items):
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=-1)
        if im.ndim != 3 or im.shape[-1] not in (1, 3, 4):
            raise InputError("image", f"array of shape {im.shape}", "expected (H, W, 3) images")
        if im.shape[-1] == 1:
            im = np.repeat(im, 3, axis=-1)
        if im.shape[-1] == 4:
            im = to_rgb(Image.fromarray(_float_to_uint8(im)), f"image {i}")
        im = _float_to_uint8(im)
        out.append(fit_image(im, height, width, what="image" if len(items) == 1 else f"image {i}"))
    if batch is not None and len(out) != batch:
        raise InputError("image", f"{len(out)} images", f"expected {batch} (one per prompt) or a single image")
    return np.stack(out)


def _float_to_uint8(im: np.ndarray) -> np.ndarray:
    if im.dtype == np.uint8:
        return im
    if np.issubdtype(im.dtype, np.floating):
        if not np.all(np.isfinite(im)):
            raise InputError("image", "array with NaN/inf", "image values must be finite")
        lo, hi = float(im.min(initial=0.0)), float(im.max(initial=0.0))
        if lo < -1.001 or hi > 1.001:
            raise InputError("image", f"float array in [{lo:.3g}, {hi:.3g}]",
                             "float images must be in [-1, 1] (or pass uint8 pixels)")
        return np.clip(np.round((im.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if np.issubdtype(im.dtype, np.integer):
        if im.min(initial=0) < 0 or im.max(initial=0) > 255:
            raise InputError("image", f"{im.dtype} array", "integer images must hold pixel values in [0, 255]")
        return im.astype(np.uint8)
    raise InputError("image", f"{im.dtype} array", "expected uint8 pixels or floats in [-1, 1]")


def to_model_range(images_u8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (what the image branch was trained on)."""
    return np.asarray(images_u8, np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------------
# Argument checks


def check_guidance(name: str, value: float) -> float:
    if value is None or not math.isfinite(float(value)):
        raise InputError(name, value, "must be a finite number")
    if float(value) < 0:
        raise InputError(name, value, "guidance scales must be >= 0 (1 = no guidance, 0 = drop the condition)")
    return float(value)


def check_positive_int(name: str, value: int, what: str) -> int:
    if value is None or int(value) != value or int(value) < 1:
        raise InputError(name, value, f"{what} must be a whole number >= 1")
    return int(value)


def check_size(name: str, value: int, factor: int) -> int:
    """Height/width: a positive multiple of the autoencoder's down-sampling factor."""
    check_positive_int(name, value, name)
    if value % factor:
        lo = max(factor, value // factor * factor)
        raise InputError(name, value, f"must be a multiple of {factor}, the autoencoder's down-sampling factor "
                                      f"(e.g. {lo} or {lo + factor})")
    return int(value)


def check_eta(value: float, sampler: str) -> float:
    if value is None or not math.isfinite(float(value)) or float(value) < 0:
        raise InputError("eta", value, "must be a finite number >= 0 (0 = deterministic DDIM)")
    if sampler != "ddim" and float(value) != 0.0:
        raise InputError("eta", value, f"applies to --sampler=ddim only ({sampler} is deterministic)")
    return float(value)


def check_motion_strength(value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise InputError("motion_strength", value, "must be a number in [0, 1] (1 = full motion, 0 = stillest)")
    return v


def start_step(steps: int, motion_strength: float) -> int:
    """The index of the first of ``steps`` sampling steps that a ``motion_strength`` run executes."""
    return steps - max(1, int(round(motion_strength * steps))) if motion_strength < 1.0 else 0


def check_sampler(value: str) -> str:
    from dreamvideo_jax.sampling.config import SAMPLERS

    if value not in SAMPLERS:
        raise InputError("sampler", value, f"unknown sampler; use one of {', '.join(SAMPLERS)}")
    return value


def check_steps(steps: int, sampler: str, num_train_timesteps: int, spacing: str, offset: int) -> int:
    from dreamvideo_jax.diffusion import samplers

    check_positive_int("steps", steps, "the number of steps")
    make = samplers.ddim_timesteps if sampler == "ddim" else samplers.dpmsolver_timesteps
    try:
        make(int(steps), num_train_timesteps, spacing, offset)
    except ValueError:
        raise InputError("steps", steps, f"too many for {num_train_timesteps} training timesteps with "
                                         f"{spacing!r} spacing and steps_offset {offset}") from None
    return int(steps)


def check_text(name: str, text: str, where: str = "") -> str:
    """A prompt must be valid Unicode text (a command line with undecodable bytes gives surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(name, text.encode("utf-8", "backslashreplace").decode("ascii", "replace"),
                         f"{where}not valid UTF-8 text (byte {e.start}); pass the prompt as UTF-8") from None
    return text


def check_not_inputs(outputs: Sequence[tuple[str, str]], inputs: Sequence[tuple[str, str]]) -> None:
    """Refuses an output path that is an input file (e.g. OUTPUT_STEM.png = the reference image): nothing the
    user did not name as output is overwritten. ``outputs`` / ``inputs``: (flag, path) pairs."""
    real = {os.path.realpath(p): flag for flag, p in inputs if p}
    for flag, p in outputs:
        if p and os.path.realpath(p) in real:
            raise InputError(flag, p, f"would overwrite the input --{real[os.path.realpath(p)]}={p}; choose "
                                      "another output name")


def check_output(path: str, name: str = "output") -> str:
    if not path:
        raise InputError(name, path, f"an output file is required ({', '.join(OUTPUT_FORMATS)})")
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUTPUT_FORMATS:
        raise InputError(name, path, f"unsupported output format {ext or '(none)'!r}; use {', '.join(OUTPUT_FORMATS)}")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise InputError(name, path, f"{parent} is not a directory")
    if os.path.isdir(path):
        raise InputError(name, path, "is a directory")
    return path


# ------------------------------------------------------------------------------------------------------------
# Prompt files


def read_prompts_file(path: str) -> list[dict]:
    """Requests from a prompts file: one per non-empty line, ``#`` lines are comments.

    A plain line is a prompt. A line starting with ``{`` is a JSON object with ``prompt`` (or ``prompts``, a
    list: one per chained stage) and optionally ``image`` (a path, relative to the file's folder), ``seed``,
    ``image_guidance``, ``text_guidance``. Returns dicts with ``prompts`` (list) and the optional keys.
    """
    name = "prompts_file"
    if not os.path.isfile(path):
        raise InputError(name, path, "no such file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(name, path, f"unreadable ({type(e).__name__})") from None
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not s.startswith("{"):
            out.append({"prompts": [s]})
            continue
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise InputError(name, path, f"line {n}: invalid JSON ({e.msg})") from None
        allowed = {"prompt", "prompts", "image", "last_image", "seed", "image_guidance", "text_guidance"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise InputError(name, path, f"line {n}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        if ("prompt" in d) == ("prompts" in d):
            raise InputError(name, path, f"line {n}: give exactly one of 'prompt' or 'prompts'")
        prompts = [d["prompt"]] if "prompt" in d else d["prompts"]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(name, path, f"line {n}: prompts must be a non-empty list of strings")
        req = {"prompts": prompts}
        for k in ("image", "last_image"):
            if k in d:
                if not isinstance(d[k], str) or not d[k]:
                    raise InputError(name, path, f"line {n}: {k} must be a file path")
                req[k] = d[k] if os.path.isabs(d[k]) else os.path.join(base, d[k])
        for k in ("seed", "image_guidance", "text_guidance"):
            if k in d:
                req[k] = d[k]
        if "seed" in req and (not isinstance(req["seed"], int) or req["seed"] < 0):
            raise InputError(name, path, f"line {n}: seed must be an integer >= 0")
        out.append(req)
    if not out:
        raise InputError(name, path, "holds no prompts")
    return out


def check_seed(seed: int, name: str = "seed") -> int:
    if seed is None or int(seed) != seed or not 0 <= int(seed) < 2**32:
        raise InputError(name, seed, "must be an integer in [0, 2**32)")
    return int(seed)


def per_sample(value: Any, batch: int, name: str) -> list:
    """A scalar or a sequence of ``batch`` values -> a list of ``batch`` values."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = list(np.asarray(value).reshape(-1))
        if len(values) != batch:
            raise InputError(name, value, f"expected one value or {batch} (one per sample)")
        return values
    return [value] * batch


def seeds_for(seed: int | Sequence[int], batch: int) -> list[int]:
    """Seed of each sample: ``seed + b`` for one seed, or the given per-sample seeds."""
    if isinstance(seed, (list, tuple, np.ndarray)):
        seeds = [check_seed(int(s)) for s in seed]
        if len(seeds) != batch:
            raise InputError("seed", seed, f"expected one seed or {batch} (one per sample)")
        return seeds
    seed = check_seed(seed)
    check_seed(seed + batch - 1)
    return [seed + b for b in range(batch)]
