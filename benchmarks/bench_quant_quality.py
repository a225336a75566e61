"""Quantized E2B against fp32: logit error, cosine, greedy top-1 agreement; load + quantize time and peak RSS.

    python benchmarks/bench_quant_quality.py --model /work/cache/e2b --lock /tmp/gemma3n-heavy.lock \
        --out benchmarks/results/quant_quality_e2b.json

Each configuration runs in its own fresh process (so its peak RSS, VmHWM from /proc/self/status, is its own):
``fp32`` (the text decoder's weights cast to float32, the embedding tables left as bf16 row gathers and the LM head
computed in float32 chunk by chunk), ``bf16``, ``int8`` and ``int4`` at each ``--int4-groups`` size. The quantized and
bf16 models load the whole multimodal checkpoint (towers included) with ``gemma3n.load(path, quantize=...)``; after
the text forward pass (for ``--towers-for``) one random image and one 30 s random clip go through the vision and
audio towers, so the last peak RSS is that of the whole model in use. ``--lock`` holds a file lock per process.
Inputs: 2 rows of ``--length`` tokens (row 1 left-padded by a quarter),
longer than E2B's sliding window (512); logits of the last ``--keep`` positions of each row are compared.

The forward pass over the whole prompt takes the prefill path (many rows: weights dequantized for a float matmul).
``--decode`` also measures the decode path, which is what generation runs token by token (the 1-4 row kernels): each
non-fp32 configuration prefills up to the first kept position, then feeds the prompt's next tokens one decode step at
a time (teacher forcing), and its logits at the same kept positions are compared with fp32's forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from quality_helpers import logit_agreement, teacher_forced_decode  # noqa: E402

CHUNK_ROWS = 16384


def memory_kb() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


def inputs(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250_000, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, : length // 4] = 0
    return ids, mask


class Float32Head(torch.nn.Module):
    """The tied LM head in float32, a block of table rows at a time (the bf16 table stays memory-mapped)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1]).float()
        blocks = [rows @ self.table[i : i + CHUNK_ROWS].float().T for i in range(0, self.table.shape[0], CHUNK_ROWS)]
        return torch.cat(blocks, dim=1).view(*hidden.shape[:-1], -1)


def child(args: argparse.Namespace) -> None:
    import gemma3n
    from gemma3n import quantize as quant

    torch.set_num_threads(args.threads)
    ids, mask = inputs(args.length)
    record: dict = {"config": args.child}
    start = time.perf_counter()
    if args.child == "fp32":
        model = gemma3n.load(args.model, dtype=torch.bfloat16, text_only=True)
        lm = model.language_model
        for name, module in lm.named_children():
            if name not in ("embed_tokens", "embed_tokens_per_layer"):
                module.float()
        lm.lm_head = Float32Head(lm.embed_tokens.weight)
    else:
        mode, _, group = args.child.partition("-g")
        if group:
            quant.DEFAULT_INT4_GROUP_SIZE = int(group)  # the group size load(quantize="int4") uses
        model = gemma3n.load(args.model, quantize=None if mode == "bf16" else mode)
    record["load_s"] = time.perf_counter() - start
    record["after_load_kb"] = memory_kb()
    with torch.inference_mode():
        start = time.perf_counter()
        if args.child == "fp32":
            lm = model.language_model
            logits = lm(inputs_embeds=lm.embed(ids).float(), ple_ids=ids, attention_mask=mask, logits_to_keep=args.keep)
        else:
            logits = model(ids, attention_mask=mask, logits_to_keep=args.keep).logits
        record["forward_s"] = time.perf_counter() - start
        record["after_forward_kb"] = memory_kb()
        torch.save(logits.float(), args.logits)
        del logits
        if args.decode and args.child != "fp32":
            start = time.perf_counter()
            decoded = teacher_forced_decode(model, ids, mask, args.keep)
            record["decode_s"] = time.perf_counter() - start
            torch.save(decoded, args.logits.with_suffix(".decode.pt"))
            del decoded
        if args.towers:
            start = time.perf_counter()
            pixels = torch.rand(1, 3, 768, 768, generator=torch.Generator().manual_seed(1))
            model.vision_tower(pixels.to(model.dtype))
            features = torch.randn(1, 3000, 128, generator=torch.Generator().manual_seed(2))
            model.audio_soft_tokens(features, None)
            record["towers_s"] = time.perf_counter() - start
            record["after_towers_kb"] = memory_kb()
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/work/cache/e2b"))
    parser.add_argument("--configs", nargs="+", default=["fp32", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128"])
    parser.add_argument("--length", type=int, default=544)
    parser.add_argument("--keep", type=int, default=136)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--towers-for", nargs="*", default=["int8", "int4-g64"], help="configs that also run the towers"
    )
    parser.add_argument("--lock", default=None, help="flock this file around each configuration's process")
    parser.add_argument("--decode", action="store_true", help="also compare teacher-forced decode steps' logits")
    parser.add_argument("--towers", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_quality_e2b.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            logits = Path(tmp) / f"{config}.pt"
            cmd = [sys.executable, __file__, "--child", config, "--logits", str(logits), "--model", str(args.model)]
            cmd += ["--length", str(args.length), "--keep", str(args.keep), "--threads", str(args.threads)]
            cmd += ["--towers"] if config in args.towers_for else []
            cmd += ["--decode"] if args.decode else []
            cmd = ["flock", args.lock, *cmd] if args.lock else cmd
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{config} failed")
            results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(config, results[config], flush=True)
        if "fp32" in results:
            want = torch.load(Path(tmp) / "fp32.pt")
            mask = inputs(args.length)[1][:, -args.keep :].bool()
            for config in results:
                if config != "fp32":
                    got = torch.load(Path(tmp) / f"{config}.pt")
                    results[config]["vs_fp32"] = logit_agreement(got[mask], want[mask])
                    decoded = Path(tmp) / f"{config}.decode.pt"
                    if decoded.exists():
                        results[config]["decode_vs_fp32"] = logit_agreement(torch.load(decoded)[mask], want[mask])
    payload = {
        "model": str(args.model),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average": os.getloadavg(),
        "length": args.length,
        "keep": args.keep,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    gb = 1024**2
    lines = [
        f"E2B-shaped random checkpoint ({args.model}), torch {torch.__version__}, {args.threads} threads, load average "
        f"{tuple(round(v, 2) for v in payload['load_average'])}; {args.keep} positions x 2 rows (row 1 left-padded) "
        f"of a {args.length}-token prompt",
        "",
        "| config | load (+ quantize) s | rel. logit error vs fp32 | cosine mean (min) | top-1 agreement | "
        "peak RSS (VmHWM) after load / text forward / + image and audio towers, GiB |",
        "|---|---|---|---|---|---|",
    ]
    decode_lines = [
        "",
        "Decode path (`--decode`: teacher-forced decode steps, one token per row per step, the same positions):",
        "",
        "| config | rel. logit error vs fp32 | cosine mean (min) | top-1 agreement | s for the steps |",
        "|---|---|---|---|---|",
    ]
    for config, r in results.items():
        q = r.get("vs_fp32")
        quality = (
            f"{q['rel_error']:.4f} | {q['cosine_mean']:.5f} ({q['cosine_min']:.5f}) | "
            f"{q['top1_agreement']:.3f} of {q['positions']}"
            if q
            else "reference | | "
        )
        peaks = [r[k]["VmHWM"] / gb for k in ("after_load_kb", "after_forward_kb", "after_towers_kb") if k in r]
        lines.append(f"| {config} | {r['load_s']:.1f} | {quality} | {' / '.join(f'{p:.2f}' for p in peaks)} |")
        if d := r.get("decode_vs_fp32"):
            decode_lines.append(
                f"| {config} | {d['rel_error']:.4f} | {d['cosine_mean']:.5f} ({d['cosine_min']:.5f}) | "
                f"{d['top1_agreement']:.3f} of {d['positions']} | {r['decode_s']:.1f} |"
            )
    table = "\n".join(lines + (decode_lines if len(decode_lines) > 5 else []))
    args.out.with_suffix(".md").write_text(
        "# Weight-only quantization of E2B: quality, load time, memory\n\nCommand: `python "
        f"benchmarks/bench_quant_quality.py {' '.join(sys.argv[1:])}`\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
