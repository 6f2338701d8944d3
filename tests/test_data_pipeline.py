"""grain pipeline: determinism, exact resume from iterator state, disjoint complete shards, bad records, auto-build."""

import threading

import numpy as np
import pytest

from dreamvideo_jax.data import build, config, pipeline
from dreamvideo_jax.data import tokenizer as T

N_TRAIN = 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return T.clip_tokenizer(str(tmp_path_factory.mktemp("tok") / "clip"))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = config.defaults()
    c.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.build.num_train, c.build.num_validation, c.build.num_test = N_TRAIN, 10, 9
    c.num_frames = 6  # 8 stored frames: the clip window has 3 possible starts
    c.read_threads = 2
    return c


def _batches(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_shapes_and_ranges(cfg, tok):
    b = _batches(pipeline.make_train_iterator(cfg, batch_size=8, seed=0, tokenizer=tok, with_captions=True), 1)[0]
    assert b["video"].shape == (8, 6, 32, 32, 3) and b["video"].dtype == np.float32
    assert b["image"].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(b["image"], b["video"][:, 0])
    assert -1.0 <= b["video"].min() < -0.5 and 0.5 < b["video"].max() <= 1.0
    assert b["tokens"].shape == (8, 77) and b["tokens"].dtype == np.int32
    np.testing.assert_array_equal(b["tokens"], T.tokenize(tok, list(b["caption"]), pad_id=cfg.pad_id))
    assert (b["tokens"][:, 0] == T.BOS_ID).all()


def test_same_seed_same_batches_and_exact_resume(cfg, tok):
    a = _batches(pipeline.make_train_iterator(cfg, batch_size=8, seed=1, tokenizer=tok), 7)  # crosses an epoch
    b = _batches(pipeline.make_train_iterator(cfg, batch_size=8, seed=1, tokenizer=tok), 7)
    assert all(_equal(x, y) for x, y in zip(a, b))
    c = _batches(pipeline.make_train_iterator(cfg, batch_size=8, seed=2, tokenizer=tok), 1)
    assert not _equal(a[0], c[0])
    # Epochs are reshuffled, and the clip window differs between visits of the same record.
    assert not np.array_equal(a[0]["index"], a[5]["index"])
    # Save after 3 batches, restore into a fresh iterator: the next batches are identical.
    it = pipeline.make_train_iterator(cfg, batch_size=8, seed=1, tokenizer=tok)
    for _ in range(3):
        next(it)
    state = it.get_state()
    it.close()
    fresh = pipeline.make_train_iterator(cfg, batch_size=8, seed=1, tokenizer=tok)
    fresh.set_state(state)
    assert all(_equal(x, y) for x, y in zip(_batches(fresh, 4), a[3:7]))


def test_thread_count_does_not_change_batches(cfg, tok):
    one = cfg.copy_and_resolve_references()
    one.read_threads, one.prefetch = 1, 1
    a = _batches(pipeline.make_train_iterator(cfg, batch_size=4, seed=3, tokenizer=tok), 3)
    b = _batches(pipeline.make_train_iterator(one, batch_size=4, seed=3, tokenizer=tok), 3)
    assert all(_equal(x, y) for x, y in zip(a, b))


def test_process_shards_disjoint_and_complete(cfg, tok):
    one_epoch = cfg.copy_and_resolve_references()
    one_epoch.num_epochs = 1
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(one_epoch, batch_size=4, seed=0, process_index=p, process_count=2, tokenizer=tok)
        idx = np.concatenate([b["index"] for b in it])
        it.close()
        assert len(idx) == N_TRAIN // 2 and len(set(idx)) == len(idx)  # each 2-example local batch, no repeats
        seen.append(set(idx.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N_TRAIN))
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_train_iterator(cfg, batch_size=3, process_count=2, tokenizer=tok)


def test_eval_iterator_padded_and_masked(cfg, tok):
    per_process = []
    for p in range(2):
        it = pipeline.make_eval_iterator(cfg, batch_size=4, process_index=p, process_count=2, tokenizer=tok, split="test")
        bs = list(it)
        it.close()
        per_process.append(bs)
        assert bs[0]["centroids"].shape == (2, 6, 2) and bs[0]["motion"].dtype.kind == "S"
    assert len(per_process[0]) == len(per_process[1]) == 3  # 9 records: 5 + 4, padded to 3 batches of 2 each
    idx = [b["index"][b["mask"]] for bs in per_process for b in bs]
    assert sorted(np.concatenate(idx).tolist()) == list(range(9))
    # Deterministic: the clip starts at frame 0, so frame 0 of the clip is the stored first frame.
    again = list(pipeline.make_eval_iterator(cfg, batch_size=4, process_index=0, process_count=2, tokenizer=tok, split="test"))
    assert all(_equal(x, y) for x, y in zip(per_process[0], again))
    assert (per_process[0][0]["frame_indices"][0] == np.arange(6)).all()


class _FlakySource:
    """A source whose records include every kind of damage the pipeline must survive."""

    def __init__(self, n=13):  # 10 usable records: whole batches of 2, none dropped
        rng = np.random.default_rng(0)
        self.recs = [{"video": rng.integers(0, 255, (8, 20, 28, 3), dtype=np.uint8), "caption": b"ok"} for _ in range(n)]
        self.recs[1] = {"video": np.zeros((0, 20, 28, 3), np.uint8), "caption": b"no frames"}
        self.recs[2] = {"video": rng.integers(0, 255, (3, 20, 28), dtype=np.uint8), "caption": b"gray \xff bytes"}
        self.recs[3] = {"video": rng.integers(0, 255, (2, 20, 28, 4), dtype=np.uint8), "caption": b"rgba, short"}
        self.recs[4] = {"caption": b"no video at all"}
        self.recs[5] = {"video": rng.integers(0, 255, (8, 20, 28, 3), dtype=np.uint8)}  # no caption
        self.recs[6] = {"video": rng.integers(0, 255, (8, 20, 28, 3), dtype=np.uint8), "caption": b"x " * 200}

    def __len__(self):
        return len(self.recs)

    def __getitem__(self, i):
        if i == 7:
            raise OSError("corrupt record")
        return self.recs[i]


def test_bad_records_are_skipped_not_fatal(cfg, tok):
    c = cfg.copy_and_resolve_references()
    c.num_frames, c.frame_stride, c.height, c.width, c.num_epochs = 4, 2, 16, 16, 1
    it = pipeline.make_train_iterator(c, batch_size=2, seed=0, tokenizer=tok, source=_FlakySource(), with_captions=True)
    batches = list(it)
    it.close()
    idx = sorted(np.concatenate([b["index"] for b in batches]).tolist())
    assert 1 not in idx and 4 not in idx and 7 not in idx  # no frames, no video, unreadable
    assert {2, 3, 5, 6} <= set(idx)  # grayscale, RGBA + short, empty caption, overlong caption: converted
    for b in batches:
        assert b["video"].shape == (2, 4, 16, 16, 3) and np.isfinite(b["video"]).all()
    stats = pipeline.pipeline_stats()
    assert stats["unreadable_record"] >= 1 and stats["bad_record"] >= 2 and stats["caption_truncated"] >= 1


def test_frame_indices():
    np.testing.assert_array_equal(pipeline.frame_indices(20, 4, 3, 5), [5, 8, 11, 14])
    np.testing.assert_array_equal(pipeline.frame_indices(6, 4, 3, 0), [0, 1, 2, 3])  # stride shrinks to fit
    np.testing.assert_array_equal(pipeline.frame_indices(2, 4, 1, 0), [0, 1, 1, 1])  # too short: repeat last


def test_auto_build_is_idempotent_and_race_safe(tmp_path):
    opts = dict(num_train=6, num_validation=2, num_test=0, size=16, frames=4)
    results, errors = [], []

    def worker():
        try:
            results.append(build.ensure_moving_shapes(str(tmp_path), **opts))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({r.path for r in results}) == 1
    assert sum(not r.existed for r in results) == 1  # built once, reused twice
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".building")]
    assert not leftovers
    c = config.defaults()
    c.data_dir = str(tmp_path)
    for k, v in opts.items():
        c.build[k] = v
    assert pipeline.dataset_path(c) == results[0].path


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(cfg, tok):
    """grain worker processes (spawned; the transform and tokenizer are pickled) match the threaded pipeline."""
    a = _batches(pipeline.make_train_iterator(cfg, batch_size=4, seed=5, tokenizer=tok), 3)
    mp = cfg.copy_and_resolve_references()
    mp.worker_count = 1
    it = pipeline.make_train_iterator(mp, batch_size=4, seed=5, tokenizer=tok)
    b = [next(it) for _ in range(2)]
    state = it.get_state()
    b.append(next(it))
    it.set_state(state)
    again = next(it)
    it.close()
    assert all(_equal(x, y) for x, y in zip(a, b))
    assert _equal(again, a[2])


class _AllBadSource:
    """Every record fails: unreadable (read raises) or unusable (no decodable video)."""

    def __init__(self, n, unreadable):
        self.n, self.unreadable, self.reads = n, unreadable, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        if self.unreadable:
            raise OSError(f"corrupt record {i}")
        return {"video": np.zeros((0, 4, 4, 3), np.uint8), "caption": b"no frames"}


@pytest.mark.parametrize("unreadable", [True, False])
def test_all_records_bad_stops_with_an_error(cfg, tok, unreadable):
    """A split with no usable record raises DataError out of next() (after a bounded number of reads)
    instead of skipping forever."""
    from dreamvideo_jax.errors import DataError, UserError

    c = cfg.copy_and_resolve_references()
    c.num_frames, c.height, c.width = 4, 8, 8
    src = _AllBadSource(5, unreadable)
    it = pipeline.make_train_iterator(c, batch_size=2, seed=0, tokenizer=tok, source=src)
    with pytest.raises(DataError) as e:
        next(it)
    it.close()
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert msg.startswith("split 'train' of the given _AllBadSource: ") and "records in a row could not be read" in msg
    assert ("OSError: corrupt record" if unreadable else "not a video") in msg
    assert src.reads < 100  # 2 * 5 records + the reads in flight, not the default 1000
    # A large split stops at data.max_bad_records.
    c.max_bad_records = 30
    big = _AllBadSource(10_000, unreadable)
    it = pipeline.make_train_iterator(c, batch_size=2, seed=0, tokenizer=tok, source=big)
    with pytest.raises(DataError, match="30 records in a row"):
        next(it)
    it.close()
    assert big.reads < 100


def test_bad_record_limit_names_the_dataset(cfg, tok, monkeypatch):
    """On a built dataset the error names its folder and split."""
    from dreamvideo_jax.errors import DataError

    c = cfg.copy_and_resolve_references()
    c.num_frames, c.height, c.width = 4, 8, 8
    path = pipeline.dataset_path(c)
    real = pipeline._open_source

    def broken(data_cfg, split=None):
        src, p = real(data_cfg, split)
        return _AllBadSource(len(src), True), p

    monkeypatch.setattr(pipeline, "_open_source", broken)
    it = pipeline.make_train_iterator(c, batch_size=2, seed=0, tokenizer=tok)
    with pytest.raises(DataError, match=f"^{path} split 'train': "):
        next(it)
    it.close()


def test_eval_frame_info_reports_padding_and_stride(cfg, tok):
    """with_frame_info: how many frames each record held, how many copies of its last frame were appended, and
    the stride actually used."""
    c = cfg.copy_and_resolve_references()
    c.num_frames, c.frame_stride, c.height, c.width = 4, 2, 8, 8
    rng = np.random.default_rng(0)
    recs = [{"video": rng.integers(0, 255, (t, 8, 8, 3), dtype=np.uint8), "caption": b"x"} for t in (9, 5, 2)]
    it = pipeline.make_eval_iterator(c, batch_size=3, tokenizer=tok, source=recs, with_metadata=False,
                                     with_frame_info=True)  # fmt: skip
    b = next(it)
    it.close()
    assert b["source_frames"].tolist() == [9, 5, 2]
    assert b["padded_frames"].tolist() == [0, 0, 2]
    assert b["stride_used"].tolist() == [2, 1, 1]
    np.testing.assert_array_equal(b["video"][2, 1], b["video"][2, 3])  # the last frame repeated
