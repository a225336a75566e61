"""``compile="auto"``, the default: compile the decode steps on the CPU when the planned decoding pays for it.

Compiling a Gemma 3n decode step takes minutes once per process and shape (about 2 minutes for E2B on 2 cores, less
from inductor's disk cache), and then saves a fixed time per step. It pays once a job's decode steps have saved more
than that. The saving per step grows with the weight bytes a step reads, and so does the compile time (both scale
with the layers), so the rule is stated in bytes: compile when

    planned decode steps x weight bytes one step reads >= PAYS_AFTER_BYTES[weight format]

where the planned steps are ``ceil(prompts / batch size) x max_new_tokens`` (an upper bound: rows can stop early).
The thresholds come from E2B decoding on 2 CPU cores (``benchmarks/results/cpu_decode_e2b_epyc_decode_attention.md``
for eager steps, ``cpu_decode_e2b_epyc_compiled_attention.md`` for compiled ones and the compile time): break-even
steps = compile seconds / (eager step - compiled step), times the bytes per step. With an empty inductor cache a job
that compiles about breaks even at the threshold and wins beyond it; with a warm cache it wins from the start.
float32 models never compile under ``"auto"`` (they are the parity reference; ``compile=True`` still compiles
them), nor does anything off the CPU (CUDA replays CUDA graphs instead).

The decision depends only on the job (its size, the model's weights), never on timings, so the same job always
takes the same path and gives the same tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch

AUTO = "auto"
DECODE = "decode"  # the decode steps (and prefill) only, not the encoder towers: what "auto" turns on when it pays

# Weight bytes streamed by a job's decode steps before compiling them pays, by weight format. E2B on 2 cores of an
# AMD EPYC: about 120 s of compile per shape with an empty inductor cache (15 s with a warm one), against a saving per
# step of 158 ms (bf16: eager 3.08 tok/s, compiled 5.98), 65 ms (int8: 6.36, 10.90) and 26 ms (int4: 9.16, 12.04),
# so 760, 1,850 and 4,600 steps of 4.84, 2.42 and 1.36 GB; rounded up.
PAYS_AFTER_BYTES = {
    "bf16": 4.0e12,  # about 830 E2B steps
    "int8": 4.5e12,  # about 1,860
    "int4": 6.5e12,  # about 4,800
}


def check_compile_option(value: Any) -> bool | str:
    """``compile`` as given to generate / the pipelines: True, False, ``"auto"`` or ``"decode"`` (the pipelines:
    the decode steps but not the encoder towers); anything else is a one-line ValueError."""
    if isinstance(value, bool) or value in (AUTO, DECODE):
        return value
    raise ValueError(f"compile must be True, False, 'auto' or 'decode', got {value!r}")


def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights one batch-1 decode step of a Gemma 3n model's text decoder reads: every parameter and buffer
    except the row-gathered per-layer table, and the token table once (as the tied LM head), or not at all when a
    quantized copy of the LM head is what the step reads."""
    lm = model.language_model
    vocab = lm.config.vocab_size
    skip = {id(lm.embed_tokens_per_layer.weight)}
    tensors = {id(t): t for t in list(lm.parameters()) + list(lm.buffers())}
    head_copies = [
        t
        for i, t in tensors.items()
        if i not in skip and i != id(lm.embed_tokens.weight) and t.dim() >= 1 and t.shape[0] == vocab
    ]
    if head_copies:  # a quantized LM head: the token table itself is only row-gathered
        skip.add(id(lm.embed_tokens.weight))
    return sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in skip)


def weight_format(model: Any) -> str | None:
    """``"int4"``, ``"int8"`` or ``"bf16"`` (also fp16) for the text decoder's large weights; None for float32."""
    dtypes = {t.dtype for t in model.language_model.parameters()} | {t.dtype for t in model.language_model.buffers()}
    if torch.uint8 in dtypes:  # torch's CPU int4 packing
        return "int4"
    if torch.int8 in dtypes:
        return "int8"
    if dtypes & {torch.bfloat16, torch.float16}:
        return "bf16"
    return None


def planned_decode_steps(prompts: int, batch_size: int, max_new_tokens: int) -> int:
    """Decode steps a job of ``prompts`` prompts in batches of ``batch_size`` runs at most."""
    return math.ceil(prompts / max(batch_size, 1)) * max_new_tokens


def compile_pays(model: Any, steps: int) -> bool:
    """Whether ``steps`` decode steps of ``model`` are enough for compiling them to pay (see the module docstring)."""
    if getattr(model, "language_model", None) is None or not hasattr(model.language_model, "embed_tokens_per_layer"):
        return False  # the compiled step and these thresholds are Gemma 3n's
    if next(model.parameters()).device.type != "cpu":
        return False
    fmt = weight_format(model)
    if fmt is None:
        return False
    return steps * decode_weight_bytes(model) >= PAYS_AFTER_BYTES[fmt]


def resolve_compile(model: Any, compile: Any, steps: int) -> bool | str:
    """``compile`` with ``"auto"`` decided for a job of ``steps`` planned decode steps: ``"decode"`` when compiling
    the decode steps pays, else False; the other values as given."""
    compile = check_compile_option(compile)
    if compile == AUTO:
        return DECODE if compile_pays(model, steps) else False
    return compile
