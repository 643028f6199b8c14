"""crystal_vae: a continuous latent space of 3-D crystal structures (JAX/Flax)."""
