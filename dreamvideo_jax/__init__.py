"""dreamvideo_jax: DreamVideo (image retention + text guidance) image-to-video diffusion in JAX/Flax."""

__version__ = "0.1.0"
