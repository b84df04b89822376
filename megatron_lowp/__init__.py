"""megatron-lowp: LLM pretraining in low precision (BF16 baseline, FP8, FP4, nGPT-FP4)."""

__version__ = "0.1.0"
