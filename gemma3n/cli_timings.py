"""``--timings``: where a command's wall time goes, as one JSON line on stderr.

    gemma3n caption cat.png --model tiny-random --timings
    ... gemma3n caption: timings (s): {"startup": 0.12, "imports": 2.9, "load": 0.5, ...}

Phases (seconds; the towers are timed with forward hooks, the rest by wrapping the pipeline's steps):
  startup     process start -> the command's first line (interpreter, ``gemma3n.cli`` import; Linux only, else absent)
  imports     torch, the model code and the encoder modules the checkpoint needs (timm for the vision tower)
  load        building the model on the meta device and attaching the memory-mapped weights
  processor   tokenizer, chat template and feature extractors (first use)
  read        decoding the input files (images, audio)
  preprocess  prompts, tokenization, image / audio features
  vision      the vision tower;  audio: the audio tower
  decode      generation minus the towers (prefill and the decode steps of the text decoder)
  other       the rest of the command (finding files, writing rows, the summary)
  total       the command's first line -> the report (so ``startup + total`` is the process's wall time, less exit)

Only the standard library is imported here.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PHASES = ("imports", "load", "processor", "read", "preprocess", "vision", "audio", "decode")


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (from /proc; None where that is not available)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as uptime:
            since_boot = float(uptime.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(0.0, since_boot - started)


class PhaseTimer:
    """Accumulates wall time per named phase; ``enabled=False`` makes every method a cheap no-op."""

    def __init__(self, enabled: bool = True):
        self.enabled = False
        self.startup: float | None = None
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._generate = 0.0  # whole model.generate calls (towers included)
        if enabled:
            self.enable()

    def enable(self) -> PhaseTimer:
        """Start recording (the total still counts from construction); returns self."""
        self.enabled = True
        self.startup = seconds_since_process_start()
        if self.startup is not None:
            self.startup -= time.perf_counter() - self.start  # process start -> construction
        return self

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Time every call of ``owner.attribute`` (a method of this one object) under phase ``name``."""
        if not self.enabled:
            return
        function = getattr(owner, attribute)

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return function(*args, **kwargs)

        setattr(owner, attribute, timed)

    def wrap_callable(self, function: Callable[..., Any], name: str) -> Callable[..., Any]:
        """``function`` timed under phase ``name`` (unchanged when disabled)."""
        if not self.enabled:
            return function

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return function(*args, **kwargs)

        return timed

    def watch_model(self, model: Any) -> None:
        """Time the model's towers (forward hooks) and its ``generate`` calls."""
        if not self.enabled:
            return
        for attribute, name in (("vision_tower", "vision"), ("audio_tower", "audio")):
            tower = getattr(model, attribute, None)
            if tower is None:
                continue
            began: list[float] = []
            tower.register_forward_pre_hook(lambda *_args, began=began: began.append(time.perf_counter()))
            tower.register_forward_hook(
                lambda *_args, began=began, name=name: self.add(name, time.perf_counter() - began.pop())
            )
        generate = model.generate

        @functools.wraps(generate)
        def timed_generate(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self._generate += time.perf_counter() - began

        model.generate = timed_generate

    def report(self) -> dict[str, float]:
        """Seconds per phase (those that ran), ``other`` and ``total``, rounded to the millisecond."""
        total = time.perf_counter() - self.start
        seconds = dict(self.seconds)
        if self._generate:
            towers = seconds.get("vision", 0.0) + seconds.get("audio", 0.0)
            seconds["decode"] = max(0.0, self._generate - towers)
        result: dict[str, float] = {}
        if self.startup is not None:
            result["startup"] = self.startup
        result.update({name: seconds[name] for name in PHASES if name in seconds})
        result["other"] = max(0.0, total - sum(seconds.get(name, 0.0) for name in PHASES))
        result["total"] = total
        return {name: round(value, 3) for name, value in result.items()}

    def report_line(self, command: str) -> str:
        return f"gemma3n {command}: timings (s): {json.dumps(self.report())}"
