"""veclip-jax: CLIP-style image-text training in JAX/Flax."""
