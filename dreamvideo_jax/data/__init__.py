"""Video data: tfds builders (array_record, no TensorFlow), a grain input pipeline, the CLIP tokenizer.

Modules:
  config         ``defaults()``: the ``config.data`` section.
  pipeline       ``make_train_iterator`` / ``make_eval_iterator``: batches of numpy arrays, checkpointable state.
  build          ``build_dataset``, ``ensure_moving_shapes``; ``python -m dreamvideo_jax.data.build``.
  video_folder   builder for a folder of videos + captions (WebVid / MSR-VTT / UCF101 style).
  moving_shapes  synthetic moving-shapes builder, its vocabulary and motion helpers.
  tokenizer      ``clip_tokenizer``, ``load_tokenizer``, ``tokenize``.
  video_io       robust decoding, resize / crop, ``load_image``, ``write_video``.

Submodules are imported on use (``from dreamvideo_jax.data import pipeline``), so importing this package is cheap.
"""
