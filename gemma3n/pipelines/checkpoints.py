"""Model-name resolution for the pipelines: re-exported from :mod:`gemma3n.model_names`, where it lives."""

from __future__ import annotations

from ..model_names import TINY_RANDOM, ModelNotFoundError, resolve_model_name

resolve_checkpoint = resolve_model_name

__all__ = ["TINY_RANDOM", "ModelNotFoundError", "resolve_checkpoint", "resolve_model_name"]
