"""The benchmarks' shared-machine etiquette: hold a file's flock around one run, so timing jobs never overlap."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def maybe_locked(path: str | None) -> Iterator[None]:
    """Hold the exclusive flock of ``path`` (when given) for the duration of the block."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
