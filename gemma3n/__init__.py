"""gemma3n: PyTorch-native inference for Google's Gemma 3n models."""

__version__ = "0.1.0"
