"""megatron-sft: packed multi-turn chat SFT on Megatron-Core.

megatron-core 0.19 declares Python >= 3.12 but its cp311 wheel works; on Python 3.11 install it
first with ``pip install --no-deps --ignore-requires-python megatron-core==0.19.2`` (the README
and .ci/run do this), after which this package's requirement is already satisfied.
"""

from setuptools import find_packages, setup

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
        "formats": ["pyarrow>=15", "datasets>=3.0"],
        "tensorboard": ["tensorboard>=2.15"],
        "test": ["pytest>=8", "pyarrow>=15", "datasets>=3.0", "tensorboard>=2.15"],
    },
)
