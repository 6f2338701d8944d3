"""Training: train state, train step, loop, checkpoints, metrics."""
