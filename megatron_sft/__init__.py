"""megatron-sft: packed multi-turn chat SFT on Megatron-Core."""

__version__ = "0.1.0"
