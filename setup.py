"""Installs the `mixer` library (the configs and entry scripts run from the checkout)."""
from setuptools import find_packages, setup

setup(
    name="mixer",
    version="0.1.0",
    description="MLP-Mixer research code in JAX/Flax: train, fine-tune, evaluate, sweep.",
    packages=find_packages(include=["mixer", "mixer.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",  # CPU by default; see extras and the README for CUDA/TPU.
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml_collections>=1.0",
        "dm-pix>=0.4",  # image ops for RandAugment (mixer/randaugment.py).
        "clu==0.0.12",
        "tensorflow-datasets>=4.9,<4.10",
        "tensorflow-cpu>=2.21,<2.22",  # tf.data/TFDS only; never on the accelerator.
        "tensorboard>=2.21,<2.22",  # clu's metric writers import it.
        "importlib_resources",  # TFDS needs it to build datasets.
        "numpy",
        "safetensors>=0.4",  # export.py --format=timm, init_from=*.safetensors (numpy API, no torch)
        "matplotlib",
        "pillow",
        "absl-py",
        "submitit>=1.5,<2",  # sweep.py --launcher=slurm|submitit_local (mixer/sweep_submitit.py)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],  # 2 workers: 11 min, not 14.5, on 2 cores
        # The Makefile picks one by the machine's accelerator (scripts/detect_accelerator.sh).
        "cuda12": ["jax[cuda12]>=0.10,<0.11"],
        "cuda13": ["jax[cuda13]>=0.10,<0.11"],
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        # PyTorch peer for benchmarks/throughput.py --compare (on CPU-only machines
        # torch==2.13.0 resolves to a CPU build here; elsewhere install the CPU wheel first).
        "benchmark": ["torch==2.13.0", "timm"],
    },
)
