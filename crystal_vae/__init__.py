"""crystal_vae: a continuous latent space of 3-D crystal structures (JAX/Flax).

Importing it changes nothing in the process; the entry points apply the CPU speed settings
explicitly (`crystal_vae.process_settings`).
"""
