"""allspark-jax: AllSpark semi-supervised semantic segmentation in JAX/Flax."""
import setuptools

setuptools.setup(
    name="allspark-jax",
    version="0.1.0",
    description="AllSpark (CVPR 2024) semi-supervised segmentation on SegFormer, in JAX/Flax.",
    packages=setuptools.find_packages(include=["allspark_jax", "allspark_jax.*"]),
    package_data={"allspark_jax.data": ["splits/*.txt", "splits/*/*.txt", "splits/*/*/*.txt"]},
    include_package_data=True,
    # The train / eval / predict command, as `python main.py` in a checkout and `python -m allspark_jax`.
    entry_points={"console_scripts": ["allspark-jax=allspark_jax.commands.main:run"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "ml-collections",
        "numpy",
        "clu",
        "tensorboard",  # clu's SummaryWriter writes through tf.summary; the board itself reads them
        "absl-py",
        "pillow",
        "safetensors",  # Hugging Face checkpoints (allspark_jax.weights.huggingface)
        "tqdm",  # console progress bars
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "matplotlib"],
    },
)
