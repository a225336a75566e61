"""gemma3n: PyTorch-native inference for Google's Gemma 3n models.

import gemma3n
model = gemma3n.load("path/to/gemma-3n-E2B-it", device="cuda", dtype="bfloat16")
pipe = gemma3n.pipeline("image-text-to-text", model=model)
"""

from typing import Any

from .config import Gemma3nConfig
from .generation import GenerationConfig
from .model import Gemma3n, load

__version__ = "0.1.0"

__all__ = ["Gemma3n", "Gemma3nConfig", "GenerationConfig", "Processor", "load", "pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    # Processor and pipeline pull in image/audio/tokenizer dependencies: import them on first use.
    if name == "Processor":
        from .processors import Processor

        return Processor
    if name == "pipeline":
        from .pipelines import pipeline

        return pipeline
    raise AttributeError(f"module 'gemma3n' has no attribute {name!r}")
