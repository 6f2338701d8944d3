"""Shared base of this package's tensorflow-datasets builders (array_record output, no TensorFlow needed)."""

from __future__ import annotations

import inspect

import tensorflow_datasets as tfds
from etils import epath


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GeneratorBasedBuilder with a plain ``code_path``.

    tfds 4.9's default ``code_path`` probes ``importlib_resources`` (a separate backport package) for builders
    that live in an ordinary package; the class's own source file is all tfds needs (it looks for an optional
    ``checksums.tsv`` beside it).
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None
