"""Builds a dataset into a data dir (local or GCS) and prints a summary of written / skipped records.

  python -m dreamvideo_jax.data.build --dataset=video_folder --source_dir=DIR --data_dir=OUT
  python -m dreamvideo_jax.data.build --dataset=video_folder --source_dir=UCF-101 --caption_from=class \\
      --class_names=ucf101 --height=128 --width=128 --data_dir=OUT
  python -m dreamvideo_jax.data.build --dataset=moving_shapes --data_dir=OUT [--num_train=5000 --size=32]

The result lands in ``OUT/<dataset>/<config_name>/<version>/`` (tfds layout) with a ``build_report.json`` that
lists the counts per skip reason and the first skipped files. The last line printed starts with ``SUMMARY``.
Exit status: 0 when at least one record was written, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import uuid

from dreamvideo_jax.data import moving_shapes as ms_lib
from dreamvideo_jax.data import video_folder as vf_lib
from dreamvideo_jax.data.report import BuildReport

DATASETS = ("video_folder", "moving_shapes")
REPORT_FILE = "build_report.json"


class EmptyDatasetError(RuntimeError):
    """No record could be written (every input was skipped)."""


@dataclasses.dataclass
class BuildResult:
    path: str  # the dataset version folder
    config_name: str
    report: BuildReport
    existed: bool  # True when an existing build was reused


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (tensorflow-datasets' own default)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _is_local(path: str) -> bool:
    return "://" not in path


def _builder_cls(dataset: str):
    if dataset == "moving_shapes":
        return ms_lib.MovingShapes
    if dataset == "video_folder":
        return vf_lib.VideoFolder
    raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")


def make_builder_config(dataset: str, config_name: str = "", **options):
    if dataset == "moving_shapes":
        cfg = ms_lib.make_config(**options)
        return dataclasses.replace(cfg, name=config_name) if config_name and config_name != cfg.name else cfg
    if dataset == "video_folder":
        return vf_lib.make_config(config_name, **options)
    raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")


def dataset_dir(data_dir: str, dataset: str, config_name: str) -> str:
    return os.path.join(data_dir, dataset, config_name, str(_builder_cls(dataset).VERSION))


@contextlib.contextmanager
def _quiet_tfds():
    """tfds warns about custom configs on every build; those are expected here."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _prepare(dataset: str, cfg, data_dir: str, report: BuildReport, force: bool) -> None:
    """Runs tfds' download_and_prepare, retrying without splits whose records were all skipped."""
    import tensorflow_datasets as tfds

    cls = _builder_cls(dataset)
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if force else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    exclude: set[str] = set()
    while True:
        attempt = BuildReport()
        kwargs = {"exclude_splits": exclude} if dataset == "video_folder" else {}
        try:
            with _quiet_tfds():
                builder = cls(data_dir=data_dir, config=cfg, file_format="array_record", report=attempt, **kwargs)
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
        except AssertionError as e:  # tfds refuses to finalise a split that yielded nothing
            empty = getattr(builder, "empty_splits", set()) - exclude
            if "No examples were yielded" not in str(e) or not empty:
                raise
            exclude |= empty
            if not (getattr(builder, "planned_splits", set()) - exclude):
                _merge(report, attempt)
                raise EmptyDatasetError("every record was skipped") from None
            # Keep the counts of the dropped splits; the other splits are generated again.
            for (split, reason), n in attempt.skipped_by_split.items():
                if split in empty:
                    report.skip(reason, n=n, split=split)
            report.examples.extend(x for x in attempt.examples if len(report.examples) < report.max_examples)
            mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
            continue
        _merge(report, attempt)
        return


def _merge(report: BuildReport, attempt: BuildReport) -> None:
    for k in ("written", "skipped", "converted", "skipped_by_split"):
        getattr(report, k).update(getattr(attempt, k))
    report.examples.extend(x for x in attempt.examples if len(report.examples) < report.max_examples)


def build_dataset(
    dataset: str,
    data_dir: str | None = None,
    *,
    config_name: str = "",
    overwrite: bool = False,
    **options,
) -> BuildResult:
    """Builds ``dataset`` into ``data_dir`` (idempotent: an existing build with the same config is reused).

    Args:
      dataset: 'video_folder' or 'moving_shapes'.
      data_dir: tfds data dir, local or remote (gs://...); default :func:`default_data_dir`.
      config_name: name of this build; default derived from the options.
      overwrite: rebuild even if the dataset exists.
      **options: builder options (see ``VideoFolderConfig`` / ``MovingShapesConfig``), e.g. ``source_dir``.

    Raises:
      EmptyDatasetError: when every input was skipped (nothing is left on disk).

    Local builds go to a temporary folder inside ``data_dir`` and are renamed into place, so concurrent builders
    (several processes starting training at once) never see, or leave, a half-written dataset.
    """
    data_dir = data_dir or default_data_dir()
    cfg = make_builder_config(dataset, config_name, **options)
    final = dataset_dir(data_dir, dataset, cfg.name)
    report = BuildReport()
    from etils import epath

    if epath.Path(final, "dataset_info.json").exists() and not overwrite:
        return BuildResult(final, cfg.name, load_report(final) or report, existed=True)
    extra = {"dataset": dataset, "config_name": cfg.name, "options": _options_of(cfg)}
    if not _is_local(data_dir):  # tfds writes into an "incomplete" folder and renames it itself
        try:
            _prepare(dataset, cfg, data_dir, report, force=overwrite)
        except EmptyDatasetError:
            pass
        if report.num_written == 0:
            epath.Path(final).rmtree(missing_ok=True)
            raise EmptyDatasetError(_empty_message(report))
        report.save(os.path.join(final, REPORT_FILE), extra)
        return BuildResult(final, cfg.name, report, existed=False)

    os.makedirs(data_dir, exist_ok=True)
    tmp = os.path.join(data_dir, f".building-{dataset}-{uuid.uuid4().hex[:12]}")
    try:
        try:
            _prepare(dataset, cfg, tmp, report, force=False)
        except EmptyDatasetError:
            pass
        built = dataset_dir(tmp, dataset, cfg.name)
        if report.num_written == 0:
            raise EmptyDatasetError(_empty_message(report))
        report.save(os.path.join(built, REPORT_FILE), extra)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if overwrite and os.path.exists(final):
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(built, final)
        except OSError:
            if not os.path.exists(os.path.join(final, "dataset_info.json")):
                raise
            # Another process finished the same build first; its result is identical for a deterministic builder.
            return BuildResult(final, cfg.name, load_report(final) or report, existed=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(final, cfg.name, report, existed=False)


def _options_of(cfg) -> dict:
    skip = {"name", "version", "release_notes", "supported_versions", "description", "tags"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


def _empty_message(report: BuildReport) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "no input found"
    first = "; ".join(f"{x['path']}: {x['reason']}" for x in report.examples[:5])
    return f"no record was written (skipped: {reasons}){' e.g. ' + first if first else ''}"


def load_report(path: str) -> BuildReport | None:
    """The report saved with a build (counts only), or None."""
    from etils import epath

    p = epath.Path(path, REPORT_FILE)
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    r = BuildReport()
    r.written.update(d.get("written", {}))
    r.skipped.update(d.get("skipped", {}))
    r.converted.update(d.get("converted", {}))
    r.examples = d.get("skipped_examples", [])
    return r


def ensure_moving_shapes(data_dir: str | None = None, **options) -> BuildResult:
    """Builds the synthetic moving-shapes dataset if it is not there yet; safe when processes race.

    On a local data dir a lock file serialises builders on one machine (the others wait, then reuse the result);
    the temporary-folder-and-rename of :func:`build_dataset` covers the rest.
    """
    data_dir = data_dir or default_data_dir()
    if not _is_local(data_dir):
        return build_dataset("moving_shapes", data_dir, **options)
    os.makedirs(data_dir, exist_ok=True)
    lock_path = os.path.join(data_dir, ".moving_shapes.lock")
    with open(lock_path, "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no POSIX locks (e.g. some network filesystems): rename still protects
            pass
        return build_dataset("moving_shapes", data_dir, **options)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _define_flags():
    from absl import flags

    f = flags
    f.DEFINE_enum("dataset", None, list(DATASETS), "Which builder to run.")
    f.DEFINE_string("data_dir", None, "Output tfds data dir (local path or gs://...). Default: $TFDS_DATA_DIR or ~/tensorflow_datasets.")
    f.DEFINE_string("source_dir", None, "video_folder: folder of videos + captions.csv / captions.jsonl.")
    f.DEFINE_string("config_name", "", "Name of this build (default derived from the options).")
    f.DEFINE_bool("overwrite", False, "Rebuild even if the dataset already exists.")
    # video_folder
    f.DEFINE_integer("max_frames", None, "video_folder: frames kept per record (after stride / fps).")
    f.DEFINE_integer("min_frames", None, "video_folder: videos with fewer frames are skipped.")
    f.DEFINE_integer("frame_stride", None, "video_folder: keep every n-th frame.")
    f.DEFINE_float("fps", None, "video_folder: resample to this frame rate (overrides frame_stride).")
    f.DEFINE_integer("height", None, "video_folder: stored frame height.")
    f.DEFINE_integer("width", None, "video_folder: stored frame width.")
    f.DEFINE_bool("center_crop", None, "video_folder: keep the aspect ratio and crop the centre (else stretch).")
    f.DEFINE_integer("clips_per_video", None, "video_folder: consecutive records taken from one long video.")
    f.DEFINE_enum("caption_from", None, list(vf_lib.CAPTION_FROM), "video_folder: caption source.")
    f.DEFINE_enum("class_names", None, ["", "ucf101"], "video_folder: restrict classes to UCF101's 101 names.")
    f.DEFINE_string("class_caption_template", None, "video_folder: caption template for class names, e.g. 'a person doing {}'.")
    f.DEFINE_string("default_split", None, "video_folder: split for videos whose caption row names none.")
    f.DEFINE_bool("zlib", None, "video_folder: zlib-compress the stored frames.")
    f.DEFINE_integer("num_workers", None, "video_folder: parallel decoders.")
    # moving_shapes
    f.DEFINE_integer("size", None, "moving_shapes: frame size in pixels.")
    f.DEFINE_integer("frames", None, "moving_shapes: frames per clip.")
    f.DEFINE_integer("num_train", None, "moving_shapes: train clips.")
    f.DEFINE_integer("num_validation", None, "moving_shapes: validation clips.")
    f.DEFINE_integer("num_test", None, "moving_shapes: test clips (held-out combinations).")
    f.DEFINE_integer("seed", None, "moving_shapes: generation seed.")
    for k in ("min_object", "max_object", "min_speed", "max_speed"):
        f.DEFINE_integer(k, None, f"moving_shapes: {k.replace('_', ' ')} in pixels (0: scale with size).")
    f.DEFINE_bool("centred_start", None, "moving_shapes: frame 0's position independent of the motion (default on).")
    f.mark_flag_as_required("dataset")


_VF_KEYS = ("max_frames", "min_frames", "frame_stride", "fps", "height", "width", "center_crop", "clips_per_video",
            "caption_from", "class_names", "class_caption_template", "default_split", "zlib", "num_workers")  # fmt: skip
_MS_KEYS = ("size", "frames", "num_train", "num_validation", "num_test", "seed", "min_object", "max_object",
            "min_speed", "max_speed", "centred_start")  # fmt: skip


def main(argv) -> int:
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    keys, other = (_VF_KEYS, _MS_KEYS) if FLAGS.dataset == "video_folder" else (_MS_KEYS, _VF_KEYS)
    given_other = [k for k in other + (("source_dir",) if FLAGS.dataset == "moving_shapes" else ()) if FLAGS[k].value is not None]
    if given_other:
        print(f"error: --{', --'.join(given_other)} do not apply to --dataset={FLAGS.dataset}", file=sys.stderr)
        return 2
    options = {k: FLAGS[k].value for k in keys if FLAGS[k].value is not None}
    if FLAGS.dataset == "video_folder":
        if not FLAGS.source_dir:
            print("error: --dataset=video_folder needs --source_dir", file=sys.stderr)
            return 2
        options["source_dir"] = os.path.abspath(FLAGS.source_dir)
    data_dir = FLAGS.data_dir or default_data_dir()
    try:
        res = build_dataset(FLAGS.dataset, data_dir, config_name=FLAGS.config_name, overwrite=FLAGS.overwrite, **options)
    except EmptyDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"SUMMARY dataset={FLAGS.dataset} written=0 | {e}")
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = res.report
    if res.existed:
        print(f"{res.path} already exists (use --overwrite to rebuild); counts are from its build.")
    for x in r.examples[:20]:
        print(f"skipped {x['path']}: {x['reason']} {x['message']}")
    if len(r.examples) > 20 or r.num_skipped > len(r.examples):
        print(f"... full list of the first {len(r.examples)} skipped files in {os.path.join(res.path, REPORT_FILE)}")
    print(r.summary_line(FLAGS.dataset, res.config_name, res.path))
    return 0 if r.num_written > 0 else 1


def run() -> None:
    from dreamvideo_jax import command

    _define_flags()
    command.run(main)


if __name__ == "__main__":
    run()
