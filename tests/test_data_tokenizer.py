"""CLIP tokenizer built from open_clip's BPE file: ids equal OpenAI/OpenCLIP's reference tokenizer."""

import importlib.util
import os
import sys
import types

import numpy as np
import pytest

from dreamvideo_jax.data import tokenizer as T

SENTENCES = [
    "a red circle moves left",
    "A man playing the GUITAR, 2x faster; e-mail: foo@bar.com",
    "Hello World!! it's  <b>ok</b> café 123",
    "Ice-skating at 3:45pm — wow",
    "don't   stop\tthe\nmusic",
    "日本語 テキスト 🎉",
    "",
    "x " * 100,  # longer than 77 tokens: truncated
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return T.clip_tokenizer(str(tmp_path_factory.mktemp("cache") / "clip_tokenizer"))


def _reference_tokenizer():
    """open_clip's SimpleTokenizer (OpenAI's code), loaded from its file.

    Importing the ``open_clip`` package needs torchvision, and its ``basic_clean`` calls ``ftfy.fix_text`` (ftfy is
    not installed); ``fix_text`` leaves the well-formed strings used here unchanged, so a pass-through stands in.
    """
    pytest.importorskip("torch")
    pytest.importorskip("regex")
    loc = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    stub = types.ModuleType("ftfy")
    stub.fix_text = lambda s: s
    saved = sys.modules.get("ftfy")
    sys.modules.setdefault("ftfy", stub)
    try:
        spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", os.path.join(loc, "tokenizer.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None and sys.modules.get("ftfy") is stub:
            del sys.modules["ftfy"]
    return mod.SimpleTokenizer()


def test_vocab_layout(tok):
    assert len(tok) == T.VOCAB_SIZE == 49408
    assert tok.convert_tokens_to_ids("<|startoftext|>") == T.BOS_ID == 49406
    assert tok.convert_tokens_to_ids("<|endoftext|>") == T.EOS_ID == 49407
    assert tok.pad_token_id == T.PAD_ID == 49407
    assert tok.model_max_length == 77
    vocab, merges = T.build_vocab_and_merges()
    assert len(merges) == 48894 and vocab["!"] == 0 and vocab["!</w>"] == 256


def test_ids_match_openclip_reference(tok):
    ref = _reference_tokenizer()(SENTENCES, context_length=77).numpy()  # pads with 0
    ours0 = T.tokenize(tok, SENTENCES, pad_id=T.OPENCLIP_PAD_ID)
    np.testing.assert_array_equal(ours0, ref)
    ours = T.tokenize(tok, SENTENCES)  # default pad: <|endoftext|>
    assert ours.dtype == np.int32 and ours.shape == (len(SENTENCES), 77)
    expected = ref.copy()
    for row in expected:
        eos = int(np.argmax(row == T.EOS_ID))
        row[eos + 1 :] = T.EOS_ID
    np.testing.assert_array_equal(ours, expected)
    # Truncation keeps BOS ... EOS in 77 slots, and num_tokens reveals it.
    assert ours[-1, 0] == T.BOS_ID and ours[-1, -1] == T.EOS_ID
    assert T.num_tokens(tok, SENTENCES[-1]) > 77 >= T.num_tokens(tok, SENTENCES[0])


def test_tokenize_accepts_str_and_bytes(tok):
    a = T.tokenize(tok, "a blue square moves up")
    b = T.tokenize(tok, [b"a blue square moves up"])
    assert a.shape == (1, 77)
    np.testing.assert_array_equal(a, b)
    assert T.tokenize(tok, []).shape == (0, 77)


def test_cache_reused_and_load_tokenizer(tok, tmp_path):
    d = str(tmp_path / "tk")
    T.clip_tokenizer(d)
    mtime = os.path.getmtime(os.path.join(d, "vocab.json"))
    T.clip_tokenizer(d)
    assert os.path.getmtime(os.path.join(d, "vocab.json")) == mtime
    loaded = T.load_tokenizer(d)
    np.testing.assert_array_equal(T.tokenize(loaded, SENTENCES[:3]), T.tokenize(tok, SENTENCES[:3]))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        T.load_tokenizer(str(tmp_path / "partial"))
