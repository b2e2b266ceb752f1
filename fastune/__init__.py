"""fastune: performance-first fine-tuning of Llama-family LLMs on native PyTorch."""

__version__ = "0.1.0"
