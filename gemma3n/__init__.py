"""gemma3n: PyTorch-native inference for Google's Gemma 3n models (and Gemma, Gemma 2 text models).

import gemma3n
model = gemma3n.load("path/to/gemma-3n-E2B-it", device="cuda", dtype="bfloat16")
pipe = gemma3n.pipeline("image-text-to-text", model=model)

The public names are imported on first use, so ``import gemma3n`` (and the ``gemma3n`` command's ``--help``) does
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .huge_pages import prefer_huge_pages

__version__ = "0.1.0"

prefer_huge_pages()  # before torch is imported: torch reads it once

# public name -> the module that defines it
_LAZY = {
    "Gemma3n": ".model",
    "CausalLM": ".heads",
    "SequenceClassifier": ".heads",
    "TokenClassifier": ".heads",
    "GemmaConfig": ".gemma_config",
    "load": ".model",
    "Gemma3nConfig": ".config",
    "GenerationConfig": ".generation",
    "Processor": ".processors",
    "pipeline": ".pipelines",
    "resolve_model_name": ".model_names",
}

__all__ = [
    "CausalLM",
    "Gemma3n",
    "Gemma3nConfig",
    "GemmaConfig",
    "GenerationConfig",
    "Processor",
    "SequenceClassifier",
    "TokenClassifier",
    "load",
    "pipeline",
    "resolve_model_name",
    "__version__",
]

if TYPE_CHECKING:
    from .config import Gemma3nConfig
    from .gemma_config import GemmaConfig
    from .generation import GenerationConfig
    from .heads import CausalLM, SequenceClassifier, TokenClassifier
    from .model import Gemma3n, load
    from .model_names import resolve_model_name
    from .pipelines import pipeline
    from .processors import Processor


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gemma3n' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
