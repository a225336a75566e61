"""``torch.compile`` with inductor's freezing actually on, for the towers' compiled paths.

Freezing turns the weights into constants of the compiled graph: inductor then packs each convolution and linear
weight once for oneDNN and folds what depends only on weights. ``torch.compile(fn, options={"freezing": True})``
does not switch it on (torch 2.14: the graph still takes the weights as inputs, and every call reorders every
convolution weight); the inductor setting has to be in effect while a call compiles, so :func:`compile_frozen`
sets it around each call (a new input shape compiles inside a call).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def compile_frozen(fn: Callable[..., Any], freezing: bool = True) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)``; with ``freezing`` its compilations freeze the weights ``fn`` reads.

    Frozen weights are a snapshot taken at compile time: later changes to them do not reach the compiled code.
    """
    compiled = torch.compile(fn, dynamic=False)
    if not freezing:
        return compiled
    from torch._inductor import config as inductor_config

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return run
