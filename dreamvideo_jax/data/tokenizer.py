"""CLIP BPE tokenizer (the one OpenCLIP ViT-H/14 and ModelScope-T2V use), built offline.

The real CLIP byte-pair vocabulary ships as ``bpe_simple_vocab_16e6.txt.gz`` inside the ``open-clip-torch``
wheel. :func:`clip_tokenizer` turns that file into the ``vocab.json`` + ``merges.txt`` pair a
``transformers.CLIPTokenizer`` reads, caches them, and loads them with ``CLIPTokenizer.from_pretrained``. (In
transformers v5, ``CLIPTokenizer(vocab_file=..., merges_file=...)`` is accepted but silently builds a 3-token
vocabulary, so the files are always loaded through ``from_pretrained``.)

The vocabulary has 49408 tokens: 256 byte characters, the same 256 with ``</w>``, 48894 merges, then
``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.

Padding. The text encoder cross-attends to all 77 positions, so the pad id changes the conditioning:
- ``<|endoftext|>`` (49407) is what OpenAI CLIP / Stable Diffusion 1.x tokenizer folders use, and the
  ``pad_token`` of the tokenizer built here (:data:`PAD_ID`, the default of :func:`tokenize`).
- OpenCLIP's own ``tokenize`` (which the original ModelScope-T2V code calls for its ViT-H/14 text tower) pads with
  0 (:data:`OPENCLIP_PAD_ID`); the diffusers folders of OpenCLIP-based models express that as ``pad_token "!"``.
:func:`tokenize` therefore pads by hand with an explicit ``pad_id``. Making ``"!"`` the tokenizer's pad *token*
instead would be wrong: transformers then treats every ``!`` in a caption as a special token ("world!!" becomes
``world ! !`` instead of ``world !!``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

VOCAB_SIZE = 49408
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
PAD_ID = EOS_ID  # pad_token of the built tokenizer
OPENCLIP_PAD_ID = 0  # what open_clip.tokenize pads with
MAX_LENGTH = 77
NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48894
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
_FILES = ("vocab.json", "merges.txt")


def default_cache_dir() -> str:
    """Where the built tokenizer files go unless told otherwise (``$DREAMVIDEO_JAX_CACHE`` overrides the root)."""
    root = os.environ.get("DREAMVIDEO_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dreamvideo_jax")
    return os.path.join(root, "clip_tokenizer")


def bpe_vocab_path() -> str:
    """Path of the CLIP BPE merges file inside the installed ``open_clip`` package.

    The package is located without importing it (importing ``open_clip`` needs torchvision, which is not a
    dependency of this project).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The CLIP BPE vocabulary comes from the 'open-clip-torch' package, which is not installed. "
            "Install it with `pip install --no-deps open-clip-torch` (only its vocabulary file is used), or pass "
            "a diffusers-style tokenizer folder to load_tokenizer()."
        )
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, BPE_FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{BPE_FILENAME} not found in the installed open_clip package ({list(spec.submodule_search_locations)}).")


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    """Returns (vocab, merges) exactly as OpenAI's CLIP ``SimpleTokenizer`` builds them from the BPE file."""
    bpe_path = bpe_path or bpe_vocab_path()
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like the CLIP BPE file (expected {NUM_MERGES} merge pairs).")
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built a vocabulary of {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "errors": "replace",
    }


def write_tokenizer_files(out_dir: str, bpe_path: str | None = None) -> str:
    """Writes ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``out_dir`` atomically.

    Files are written to a temporary folder beside ``out_dir`` and renamed into place, so concurrent processes
    never see a half-written tokenizer.
    """
    vocab, merges = build_vocab_and_merges(bpe_path)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".clip_tokenizer.", dir=parent)
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merges) + "\n")
    with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(), f, indent=2)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process won the race (or out_dir exists but was incomplete)
        if not _has_files(out_dir):
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        _rmtree(tmp)
    return out_dir


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _has_files(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in _FILES)


def _check(tok, where: str):
    if len(tok) != VOCAB_SIZE:
        raise ValueError(f"tokenizer in {where} has {len(tok)} tokens, expected {VOCAB_SIZE} (CLIP BPE).")
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer in {where} has no pad token.")
    return tok


def clip_tokenizer(cache_dir: str | None = None):
    """The real CLIP tokenizer, built from open_clip's BPE file on first use and cached in ``cache_dir``.

    Returns a ``transformers.CLIPTokenizer`` with 49408 tokens, ``model_max_length`` 77 and pad id 49407.
    """
    cache_dir = cache_dir or default_cache_dir()
    if not _has_files(cache_dir):
        write_tokenizer_files(cache_dir)
    return _check(_from_pretrained(cache_dir), cache_dir)


def _from_pretrained(path: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def load_tokenizer(path: str):
    """Loads a CLIP tokenizer folder, e.g. the ``tokenizer/`` folder of a diffusers text-to-video checkpoint.

    Raises:
      FileNotFoundError: if the folder or its ``vocab.json`` / ``merges.txt`` is missing.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer folder {path!r} does not exist; expected a folder with vocab.json and merges.txt "
            "(e.g. <diffusers checkpoint>/tokenizer), or use clip_tokenizer() to build the CLIP one offline."
        )
    missing = [f for f in _FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {path!r} lacks {', '.join(missing)} (needs vocab.json and merges.txt).")
    tok = _from_pretrained(path)
    if tok.pad_token_id is None:  # some exported folders omit it; CLIP pads with <|endoftext|>
        tok.pad_token = tok.eos_token
    return tok


def tokenize(
    tokenizer, captions: str | bytes | Sequence[str | bytes], max_length: int = MAX_LENGTH, pad_id: int | None = None
) -> np.ndarray:
    """Token ids ``int32 [N, max_length]``: BOS, tokens, EOS, then ``pad_id``.

    Args:
      tokenizer: a CLIP tokenizer from :func:`clip_tokenizer` or :func:`load_tokenizer`.
      captions: one caption or a sequence; ``bytes`` are decoded as UTF-8 with replacement.
      max_length: sequence length (77 for CLIP).
      pad_id: id written after EOS; ``None`` uses the tokenizer's pad id (49407 for :func:`clip_tokenizer`,
        0 for OpenCLIP's own convention -- see the module docstring).

    Captions longer than ``max_length`` are truncated, keeping EOS as the last id; callers that care compare
    :func:`num_tokens` against ``max_length`` and warn.
    """
    if isinstance(captions, (str, bytes)):
        captions = [captions]
    captions = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in captions]
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.full((len(captions), max_length), pad_id, dtype=np.int32)
    if not captions:
        return out
    ids = tokenizer(captions, padding=False, truncation=True, max_length=max_length)["input_ids"]
    for row, seq in zip(out, ids):
        row[: len(seq)] = seq
    return out


def num_tokens(tokenizer, caption: str) -> int:
    """Number of ids a caption needs including BOS and EOS (to detect truncation)."""
    return len(tokenizer(caption, truncation=False, verbose=False)["input_ids"])
