"""Why compiled bf16 decoding picked other greedy tokens than eager decoding: rounding near-ties, not a bug.

    python benchmarks/compiled_vs_eager_bf16.py     # CPU, a few minutes (two inductor compiles)

On bench_generation's small random model (8 layers, the published 262k vocabulary) in bf16, decodes 12 greedy tokens
eagerly and through ``torch.compile`` of ``decode_step`` with inductor's ``emulate_precision_casts`` off (fused
kernels keep float32 intermediates) and on (intermediates rounded to bf16 as eager does). Then, forcing eager's tokens,
prints per step the eager top-2 logit margin, the largest compiled-vs-eager logit difference, the argmax of each and of
an fp32 run, and each bf16 run's relative error against fp32. Writes benchmarks/results/compiled_vs_eager_bf16.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import build_models  # noqa: E402

from gemma3n.generation import decode_step, prefill  # noqa: E402
from gemma3n.text_model import KVCache  # noqa: E402

PROMPT, STEPS = 32, 12


def run(step_fn, model, dtype, ids, forced=None):
    """Greedy decoding (or ``forced`` tokens): (tokens [STEPS], logits [STEPS, V]) of the steps' inputs."""
    cache = KVCache(model.config.text, 1, 256, dtype=dtype, device="cpu")
    mask, pos = torch.ones_like(ids, dtype=torch.bool), torch.arange(PROMPT)[None]
    tokens, all_logits = [], []
    with torch.inference_mode():
        logits = prefill(model, ids, mask, pos, cache)
        for i in range(STEPS):
            all_logits.append(logits[0].clone())
            token = logits.argmax(-1, keepdim=True) if forced is None else forced[i].view(1, 1)
            tokens.append(token.view(()))
            logits = step_fn(model, token, pos[:, -1:] + 1 + i, cache, torch.tensor(PROMPT + i))
    return torch.stack(tokens), torch.stack(all_logits)


def main() -> None:
    torch.set_num_threads(2)
    _, bf16 = build_models("small", "cpu", torch.bfloat16)
    _, fp32 = build_models("small", "cpu", torch.float32)
    ids = torch.randint(3, 262_144, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    eager_tokens, eager_logits = run(decode_step, bf16, torch.bfloat16, ids)
    _, fp32_logits = run(decode_step, fp32, torch.float32, ids, forced=eager_tokens)
    lines = ["# bf16 decode: compiled vs eager (small random model, 262k vocabulary)", ""]
    lines.append(f"eager greedy tokens: {eager_tokens.tolist()}")
    for emulate in (False, True):
        torch._dynamo.reset()
        step = torch.compile(decode_step, dynamic=False, options={"emulate_precision_casts": emulate})
        tokens, _ = run(step, bf16, torch.bfloat16, ids)
        _, logits = run(step, bf16, torch.bfloat16, ids, forced=eager_tokens)
        lines += ["", f"## emulate_precision_casts={emulate}", "", f"compiled greedy tokens: {tokens.tolist()}", ""]
        lines += [
            "| step | eager top-2 margin | max abs compiled - eager | argmax eager / compiled / fp32 | "
            "rel. error vs fp32: eager / compiled |",
            "|---|---|---|---|---|",
        ]
        for i in range(STEPS):
            top2 = eager_logits[i].float().topk(2).values
            diff = (logits[i] - eager_logits[i]).abs().max().item()
            errs = [((x[i] - fp32_logits[i]).norm() / fp32_logits[i].norm()).item() for x in (eager_logits, logits)]
            argmaxes = [int(x[i].argmax()) for x in (eager_logits, logits, fp32_logits)]
            lines.append(
                f"| {i} | {float(top2[0] - top2[1]):.4f} | {diff:.4f} | {' / '.join(map(str, argmaxes))} | "
                f"{errs[0]:.3e} / {errs[1]:.3e} |"
            )
        print("\n".join(lines), flush=True)
    out = Path(__file__).resolve().parent / "results" / "compiled_vs_eager_bf16.md"
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
