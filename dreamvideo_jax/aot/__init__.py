"""Ahead-of-time compilation for Cloud TPU slices on any machine: `python -m dreamvideo_jax.aot` (see its help).

`chips`: chip figures and slice names; `programs`: the real train and sampling programs compiled for a topology
description, and their per-chip memory, cost and roofline reports.
"""
