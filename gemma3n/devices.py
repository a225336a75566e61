"""``device=`` and ``dtype=`` arguments as torch objects, with one-line errors naming the argument."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto",):
        return None
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


def resolve_device(device: torch.device | str, argument: str = "device") -> torch.device:
    """``device`` as a torch.device; a string torch cannot parse, or CUDA where there is none, is a ValueError
    naming ``argument``."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{argument}={device!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:1', 'mps', ..."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{argument}={device!r}, but torch finds no CUDA device here; use 'cpu'")
    return resolved
