"""Benchmarks of dreamvideo_jax (`python -m benchmarks --help`). The library never imports this package.

Modules: `cli` (flags, the suite runner, the tables), `common` (timing, FLOPs, memory, the library's train step
driven for timing, machine info, JSON), `model` (train / sample / memory / scaling / fullsize, side by side with
PyTorch), `train_config` (one config's train step), `data` (input pipeline), `sampling` (sampling loop vs scan).
"""
