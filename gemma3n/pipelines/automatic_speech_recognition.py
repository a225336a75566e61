"""The "automatic-speech-recognition" task: audio -> ``{"text": ...}``.

    pipe("talk.wav")                                   -> {"text": "..."}
    pipe({"raw": samples, "sampling_rate": 44100})     -> {"text": "..."}
    pipe(samples_16k, return_timestamps="chunk")       -> {"text": ..., "chunks": [{"text", "timestamp": (s, e)}]}
    pipe([a, b])                                       -> [{"text": ...}, {"text": ...}]

Gemma 3n hears at most 30 s per clip (the processor would cut the rest off), and a checkpoint with fewer than the
published 188 audio soft tokens per clip holds less (``processor.max_audio_seconds``, from its config), so longer audio
is split into windows of at most ``chunk_length_s`` seconds (default and upper bound: the smaller of the two). Each
cut is placed at the quietest 25 ms frame within the last ``cut_search_s`` seconds of its window, so words are rarely
split. Every window is transcribed (windows of all inputs share batches)
and the window texts are joined with spaces. Nothing is dropped: a window whose transcript hit ``max_new_tokens``
raises a warning that names its time span and, when the input names one (a path, or a dict's "path"), the file.
"""

from __future__ import annotations

import numbers
import warnings
from pathlib import Path
from typing import Any

import torch

from .base import Generated, Pipeline, Prompt, chat_prompt

DEFAULT_INSTRUCTION = "Transcribe this audio."
MAX_WINDOW_S = 30.0  # the feature extractor's limit: 480000 samples at 16 kHz
CUT_SEARCH_S = 5.0
FRAME_S = 0.025
HOP_S = 0.010


def quietest_point(segment: torch.Tensor, rate: int) -> int:
    """Sample offset (within ``segment``) of the centre of its lowest-energy frame; ties go to the latest frame."""
    frame, hop = max(1, round(FRAME_S * rate)), max(1, round(HOP_S * rate))
    if segment.numel() < frame:
        return segment.numel() // 2
    energy = segment.float().unfold(0, frame, hop).pow(2).mean(dim=-1)  # [n_frames]
    last = energy.numel() - 1 - int(torch.argmin(energy.flip(0)))
    return last * hop + frame // 2


def split_into_windows(
    wave: torch.Tensor, rate: int, window_s: float = MAX_WINDOW_S, search_s: float = CUT_SEARCH_S
) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` sample spans covering ``wave`` [samples] end to end, each at most ``window_s`` long."""
    window = round(window_s * rate)  # round, not int: a window of exactly n / rate seconds is n samples
    search = min(int(search_s * rate), window // 2)
    spans = []
    start, total = 0, wave.shape[-1]
    while total - start > window:
        lo = start + window - search
        cut = lo + quietest_point(wave[lo : start + window], rate)
        spans.append((start, cut))
        start = cut
    spans.append((start, total))
    return spans


def _is_batch(inputs: Any) -> bool:
    """A list of clips, as opposed to one clip given as a list of numbers."""
    return isinstance(inputs, (list, tuple)) and not all(isinstance(x, numbers.Number) for x in inputs)


def input_name(audio: Any) -> str | None:
    """The file an input comes from: a path given directly or as a dict's "path" (as datasets' audio dicts have)."""
    path = audio.get("path") if isinstance(audio, dict) else audio
    return str(path) if isinstance(path, (str, Path)) else None


class AutomaticSpeechRecognitionPipeline(Pipeline):
    task = "automatic-speech-recognition"
    task_keys = frozenset({"instruction", "return_timestamps", "chunk_length_s", "cut_search_s", "sampling_rate"})

    def __call__(self, inputs: Any, **kwargs: Any) -> dict | list[dict]:
        settings, gen = self._settings(kwargs)
        timestamps = settings.get("return_timestamps")
        if timestamps not in (None, False, True, "chunk"):
            raise ValueError(f"return_timestamps must be 'chunk' (or True / None), got {timestamps!r}")
        longest = self.max_window_s
        window = settings.get("chunk_length_s", longest)
        if not 0 < window <= longest:
            raise ValueError(
                f"chunk_length_s must lie in (0, {longest:g}] seconds (the longest clip this checkpoint holds), "
                f"got {window!r}"
            )
        if _is_batch(inputs):
            return self.run(list(inputs), settings, gen)
        return self.run([inputs], settings, gen)[0]

    @property
    def max_window_s(self) -> float:
        """The longest window: 30 s, or less when the checkpoint holds less audio per clip."""
        return min(MAX_WINDOW_S, self.processor.max_audio_seconds)

    def preprocess(self, audio: Any, settings: dict[str, Any]) -> list[Prompt]:
        extractor = self.processor.feature_extractor
        rate = extractor.sampling_rate
        (wave,) = extractor.prepare([audio], settings.get("sampling_rate"))  # mono float32 [samples] at `rate`
        spans = split_into_windows(
            wave, rate, settings.get("chunk_length_s", self.max_window_s), settings.get("cut_search_s", CUT_SEARCH_S)
        )
        instruction = settings.get("instruction") or DEFAULT_INSTRUCTION
        prompts = []
        for start, end in spans:
            clip = wave[start:end]
            content = [{"type": "audio", "audio": clip}, {"type": "text", "text": instruction}]
            prompts.append(chat_prompt(self.processor, [{"role": "user", "content": content}], meta=(start, end, rate)))
        return prompts

    def postprocess(self, audio: Any, outputs: list[Generated], settings: dict[str, Any]) -> dict:
        chunks = []
        name = input_name(audio)
        for out in outputs:
            start, end, rate = out.prompt.meta
            text = self.decode(out.new_ids).strip()
            if out.limit_reached:
                span = f"{start / rate:.2f}-{end / rate:.2f} s" + (f" of {name!r}" if name else "")
                warnings.warn(
                    f"the transcript of {span} reached max_new_tokens and may be cut short; pass a larger "
                    "max_new_tokens",
                    stacklevel=2,
                )
            chunks.append({"text": text, "timestamp": (round(start / rate, 3), round(end / rate, 3))})
        result: dict[str, Any] = {"text": " ".join(c["text"] for c in chunks if c["text"])}
        if settings.get("return_timestamps"):
            result["chunks"] = chunks
        return result
