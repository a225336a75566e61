"""Turn conversations, text, images and audio into Gemma 3n model inputs (tokenizer, chat template, image
processor, audio feature extractor), matching transformers' Gemma3nProcessor."""

from .audio import AudioFeatureExtractor, AudioSettings
from .chat import ChatTemplate, ChatTemplateError
from .files import ConfigError
from .image import ImageProcessor, ImageSettings
from .processor import BatchInputs, Processor
from .tiny_files import write_tiny_processor_files
from .tokenizer import Tokenizer

__all__ = [
    "AudioFeatureExtractor",
    "AudioSettings",
    "BatchInputs",
    "ChatTemplate",
    "ChatTemplateError",
    "ConfigError",
    "ImageProcessor",
    "ImageSettings",
    "Processor",
    "Tokenizer",
    "write_tiny_processor_files",
]
