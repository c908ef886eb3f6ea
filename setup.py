"""megatron-sft: packed multi-turn chat SFT on Megatron-Core.

megatron-core 0.19 declares Python >= 3.12 but its cp311 wheel works; on Python 3.11 install it
first with ``pip install --no-deps --ignore-requires-python megatron-core==0.19.2`` (the README
and .ci/run do this), after which this package's requirement is already satisfied.
"""

from setuptools import find_packages, setup

# Optional groups. install.sh (the README set-up) installs formats, tensorboard and plot, since
# documented commands use them; a bare ``pip install -e .`` leaves them out.
FORMATS = ["pyarrow>=15", "datasets>=3.0"]  # Parquet and datasets.save_to_disk inputs
TENSORBOARD = ["tensorboard>=2.15"]  # logging.tensorboard (on by default)
PLOT = ["matplotlib>=3.7"]  # tools/plot_metrics.py

setup(
    name="megatron-sft",
    version="0.1.0",
    description="Packed multi-turn chat SFT on Megatron-Core with Transformer Engine THD attention",
    packages=find_packages(include=["megatron_sft", "megatron_sft.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19.2,<0.20",
        "transformers>=4.51",
        "tokenizers>=0.21",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "einops>=0.8",
        "packaging",
        "psutil",  # Megatron-Core's checkpoint writer imports it without declaring it
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]>=2.8"],
        "formats": FORMATS,
        "tensorboard": TENSORBOARD,
        "plot": PLOT,
        "wandb": ["wandb>=0.17"],  # logging.wandb_project
        "test": ["pytest>=8", *FORMATS, *TENSORBOARD, *PLOT],
    },
)
