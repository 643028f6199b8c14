"""crystal_vae: a β-VAE latent space of 3-D crystal structures in JAX/Flax."""

import setuptools

setuptools.setup(
    name="crystal_vae",
    version="0.1.0",
    description="Encode, decode, sample and interpolate 3-D crystal structures with a voxel β-VAE.",
    # configs/ (every default, the recipes) is installed as crystal_vae.configs: the package reads
    # its defaults at run time (an older saved config takes the fields added since from them).
    packages=[*setuptools.find_packages(include=["crystal_vae", "crystal_vae.*"]),
              "crystal_vae.configs"],
    package_dir={"crystal_vae.configs": "configs"},
    # The native CPU kernels' source, compiled on first use (crystal_vae/native/kernels.py).
    package_data={"crystal_vae.native": ["kernels.cc"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.6",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "grain>=0.2.12",
        "importlib_resources>=6",
        "pymatgen>=2025.1",
        "numpy>=2.0",
        "scipy>=1.13",
        "spglib>=2.5",
        "threadpoolctl>=3.1",
        "matplotlib>=3.9",
        "imageio>=2.34",
        "smact>=4.0",
        "matminer>=0.10",  # CDVAE's fingerprints for the generation metrics
        "scikit-learn>=1.3",  # the mixture prior over the latent space (latent_prior.py)
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    },
)
