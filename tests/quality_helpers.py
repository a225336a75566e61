"""Quality measures against fp32 logits, teacher-forced decoding, and a small *trained* Gemma 3n for them.

Random weights make a poor yardstick for quantization: the tests' random decoders (weights of std 0.1, random token
ids) amplify any perturbation layer by layer, so even bf16 alone lands at a logit cosine of 0.9989 there, and an
E2B-shaped random checkpoint at 0.50. A model trained for a few hundred steps behaves like a real one in this respect.
``train_reference_lm`` trains a Gemma3nForCausalLM with transformers (the reference implementation) on the bytes of
Python's own standard library, then writes it with ``save_pretrained``. Token ids are bytes + 3 (0-2 are pad, eos and
bos). Shared by tests/test_quantized_quality.py and benchmarks/bench_quant_quality_small.py.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

BYTE_OFFSET = 3  # ids 0, 1, 2 are pad, eos and bos
BYTE_VOCAB = 256 + BYTE_OFFSET


def python_source_bytes(subdirectory: str = "") -> bytes:
    """The ``*.py`` files of Python's standard library (top level, or one package such as ``"json"``), concatenated
    in name order. Training uses the top level; held-out text comes from a package."""
    folder = Path(sysconfig.get_paths()["stdlib"], subdirectory)
    files = sorted(folder.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python source files under {folder}")
    return b"".join(path.read_bytes() for path in files)


def byte_ids(text: bytes) -> torch.Tensor:
    """Token ids [len(text)] (int64) of ``text``: each byte + 3."""
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long() + BYTE_OFFSET


def trained_lm_config(hidden: int, **overrides):
    """A small Gemma3nTextConfig with every decoder feature (the tests' ``text_config``: sliding and global layers,
    shared KV cache, AltUp, LAuReL, per-layer inputs, activation sparsity) at width ``hidden``, over the byte
    vocabulary."""
    from conftest import text_config

    settings = dict(
        vocab_size=BYTE_VOCAB + 5,
        vocab_size_per_layer_input=BYTE_VOCAB + 5,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        head_dim=hidden // 4,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"] * 3,
        laurel_rank=16,
        hidden_size_per_layer_input=16,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
    )
    return text_config(**{**settings, **overrides})


def train_reference_lm(
    directory, config, *, steps: int, length: int, batch: int = 16, lr: float = 3e-3, seed: int = 0
) -> list[float]:
    """Train a Gemma3nForCausalLM (transformers) for ``steps`` AdamW steps on random ``length``-byte windows of the
    standard library's top-level source, ``save_pretrained`` it to ``directory``; returns the training losses."""
    from transformers import Gemma3nForCausalLM

    torch.manual_seed(seed)
    model = Gemma3nForCausalLM(config).train()
    data = byte_ids(python_source_bytes())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    # Linear warm-up, then linear decay to a tenth.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.1, 1 - step / steps)
    )
    windows = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length, (batch,), generator=windows)
        ids = torch.stack([data[start : start + length] for start in starts])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval().save_pretrained(directory)
    return losses


def held_out_batch(rows: int, length: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each [rows, length]: windows of the ``json`` package's source (not trained on), 5000
    bytes apart; row 1 is left-padded by ``padding`` positions."""
    data = byte_ids(python_source_bytes("json"))
    ids = torch.stack([data[row * 5000 : row * 5000 + length] for row in range(rows)])
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0
    ids[1, :padding] = 0
    return ids, mask


def logit_agreement(got: torch.Tensor, reference: torch.Tensor) -> dict:
    """Relative error, per-position cosine (mean, min), greedy top-1 agreement and mean KL(reference || got) of
    logits [positions, vocab] against reference logits, in float64."""
    got, reference = got.reshape(-1, got.shape[-1]).double(), reference.reshape(-1, reference.shape[-1]).double()
    cosine = F.cosine_similarity(got, reference, dim=-1)
    reference_log_probs, log_probs = reference.log_softmax(-1), got.log_softmax(-1)
    kl = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1)
    return {
        "positions": reference.shape[0],
        "rel_error": ((got - reference).norm() / reference.norm()).item(),
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "top1_agreement": (got.argmax(-1) == reference.argmax(-1)).double().mean().item(),
        "kl_mean": kl.mean().item(),
    }


def teacher_forced_decode(model, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits [B, keep, V] (float32) of the last ``keep`` positions: a prefill up to the first of them, then one
    eager decode step per position on the prompt's own tokens (the path generation runs token by token)."""
    from gemma3n.generation import cache_length_for, decode_step, prefill
    from gemma3n.text_model import KVCache

    batch, length = ids.shape
    first = length - keep  # the prefill ends at the first kept position
    positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask.bool(), 0)
    slots = cache_length_for(model, first + 1, keep, False)
    cache = KVCache(model.config.text, batch, slots, dtype=model.dtype, device="cpu")
    logits = [prefill(model, ids[:, : first + 1], mask[:, : first + 1], positions[:, : first + 1], cache)]
    for slot in range(first + 1, length):
        cache.prepare_decode(slot)
        step = decode_step(model, ids[:, slot : slot + 1], positions[:, slot : slot + 1], cache, torch.tensor(slot))
        logits.append(step)
    return torch.stack(logits, dim=1).float()
