"""Quantization quality on small models: int8 and int4 weight-only against fp32, on a random model written by
transformers and on a small model trained with transformers; and why int8 stays weight-only (the logit error of
fbgemm's dynamic int8 GEMM).

    python benchmarks/bench_quant_quality_small.py             # random tiny model (tests' text_config)
    python benchmarks/bench_quant_quality_small.py --trained   # trained small model (about 3 minutes to train, cached)

fbgemm's ``linear_dynamic`` streams an int8 weight about 1.5x faster than torch's weight-only int8 kernel on this CPU
(``kernel_ceilings.py``), but it also quantizes the activations: 7-bit unsigned with one scale and zero point per call
(7 bits so that AVX2's pairwise int16 sums cannot saturate). Each run loads one checkpoint with gemma3n at
``quantize="int8"`` / ``"int4"`` and compares against the fp32 model: the weight-only kernels as shipped, the same
int8 weights through fbgemm with one activation scale per row and per block of 16 rows, and int4 weight-only at each
group size the widths allow. bf16 (no quantization) is given for scale.

- Random: the tests' tiny ``text_config`` (hidden 64, weights of std 0.1) on random token ids, 4 rows x 80 tokens
  (longer than the sliding window), row 1 left-padded by 6: 314 positions. Writes ``results/quant_quality_small.*``.
  A random decoder amplifies every perturbation layer by layer (bf16 alone is at cosine 0.9989 here), so it shows
  how errors compare, not how large they are in a real model.
- Trained (``--trained``): ``tests/quality_helpers.py``'s byte-level Gemma 3n (hidden 128, 6 layers with every
  decoder feature) trained with transformers for ``--steps`` AdamW steps on the standard library's source, written
  with ``save_pretrained`` and cached under ``--cache``; 4 rows x 160 bytes of held-out source (the ``json``
  package), row 1 left-padded by 6: 634 positions. Writes ``results/quant_quality_trained.*``.

Rows marked "decode steps" measure the path generation runs token by token (on CPUs with the instructions, the 1-4
row kernels of ``gemma3n.row_kernels``): a prefill up to the first compared position, then one teacher-forced decode
step per position, compared with fp32's forward at the last positions of each row (random: 65 per row, trained: 100).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from quality_helpers import logit_agreement, teacher_forced_decode  # noqa: E402


def use_fbgemm(model: torch.nn.Module, row_block: int) -> int:
    """Route every ``Int8Linear`` of ``model`` through fbgemm's dynamic int8 GEMM on the same int8 weights."""
    from kernel_ceilings import fbgemm_pack

    from gemma3n.quantize import Int8Linear

    count = 0
    for module in model.modules():
        if not isinstance(module, Int8Linear):
            continue
        packed = fbgemm_pack(module.qweight, module.scales)

        def forward(x: torch.Tensor, packed=packed, out_features=module.out_features) -> torch.Tensor:
            rows = x.reshape(-1, x.shape[-1]).float()
            parts = [
                torch.ops.quantized.linear_dynamic(rows[i : i + row_block], packed, True)
                for i in range(0, len(rows), row_block)
            ]
            return torch.cat(parts).to(x.dtype).view(*x.shape[:-1], out_features)

        module.forward = forward
        count += 1
    return count


def measure(directory: Path, ids: torch.Tensor, mask: torch.Tensor, decoded: int, int4_groups: tuple) -> dict:
    """Every configuration's logit agreement with the fp32 model on (ids, mask), whole-prompt and decode steps."""
    import gemma3n
    from gemma3n import quantize

    real = mask.bool()

    def load(dtype: torch.dtype, mode: str | None = None, group: int | None = None):
        if group:
            quantize.DEFAULT_INT4_GROUP_SIZE = group  # the group size load(quantize="int4") uses
        return gemma3n.load(directory, dtype=dtype, quantize=mode)

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            return model(ids, attention_mask=mask).logits.float()

    full = logits(load(torch.float32))
    reference, decode_reference = full[real], full[:, -decoded:]

    def decode_steps(model) -> torch.Tensor:
        with torch.inference_mode():
            return teacher_forced_decode(model, ids, mask, decoded)

    rows: dict = {"bf16 (no quantization)": logit_agreement(logits(load(torch.bfloat16))[real], reference)}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        rows[f"int8 weight-only, {name} activations"] = logit_agreement(logits(load(dtype, "int8"))[real], reference)
        for block in (1, 16):
            model = load(dtype, "int8")
            layers = use_fbgemm(model, block)
            rows[f"int8 fbgemm dynamic, 1 scale per {block} row(s), {name}"] = {
                **logit_agreement(logits(model)[real], reference),
                "layers": layers,
            }
        for group in int4_groups:
            rows[f"int4 g{group} weight-only, {name} activations"] = logit_agreement(
                logits(load(dtype, "int4", group))[real], reference
            )
    rows["bf16 (no quantization), decode steps"] = logit_agreement(decode_steps(load(torch.bfloat16)), decode_reference)
    rows["int8 weight-only, bfloat16 activations, decode steps"] = logit_agreement(
        decode_steps(load(torch.bfloat16, "int8")), decode_reference
    )
    for group in int4_groups:
        rows[f"int4 g{group} weight-only, bfloat16 activations, decode steps"] = logit_agreement(
            decode_steps(load(torch.bfloat16, "int4", group)), decode_reference
        )
    return rows


def random_model() -> tuple[Path, torch.Tensor, torch.Tensor, int, tuple, dict]:
    from conftest import save_reference_lm, text_config

    torch.manual_seed(0)
    directory = Path(tempfile.mkdtemp(prefix="int8-quality-"))
    save_reference_lm(directory, text_config(vocab_size_per_layer_input=300))
    ids = torch.randint(3, 300, (4, 80), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    # The tiny widths (64, 96, 128) are multiples of 32, not all of 64. 65 decoded positions: all real tokens.
    return directory, ids, mask, 65, (32,), {"model": "random tiny text_config (tests/conftest.py)"}


def trained_model(args: argparse.Namespace) -> tuple[Path, torch.Tensor, torch.Tensor, int, tuple, dict]:
    from quality_helpers import held_out_batch, train_reference_lm, trained_lm_config

    directory = args.cache / f"trained-lm-h{args.hidden}-s{args.steps}-l{args.length}"
    record = directory / "training.json"
    if not record.exists():
        print(f"training the small model ({args.steps} steps) into {directory} ...", file=sys.stderr, flush=True)
        losses = train_reference_lm(directory, trained_lm_config(args.hidden), steps=args.steps, length=args.length)
        record.write_text(json.dumps({"losses": losses}))
    losses = json.loads(record.read_text())["losses"]
    final_loss = sum(losses[-20:]) / len(losses[-20:])
    ids, mask = held_out_batch(rows=4, length=160, padding=6)
    meta = {
        "model": f"byte-level Gemma 3n, hidden {args.hidden}, 6 layers, trained {args.steps} steps on "
        f"{args.length}-byte windows (tests/quality_helpers.py)",
        "final_training_loss_nats_per_byte": final_loss,
    }
    return directory, ids, mask, 100, (32, 64), meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trained", action="store_true", help="the trained small model instead of the random one")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gemma3n-bench")
    args = parser.parse_args()

    from gemma3n.row_kernels import row_kernel_status

    torch.set_num_threads(2)
    directory, ids, mask, decoded, groups, meta = trained_model(args) if args.trained else random_model()
    rows = measure(directory, ids, mask, decoded, groups)
    command = "python benchmarks/bench_quant_quality_small.py" + (" --trained" if args.trained else "")
    positions, decoded_positions = int(mask.sum()), decoded * len(ids)
    meta |= {"torch": torch.__version__, "positions": positions, "decoded_positions": decoded_positions}
    meta |= {"row_kernels": row_kernel_status(), "command": command}
    out = HERE / "results" / ("quant_quality_trained.json" if args.trained else "quant_quality_small.json")
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        f"{meta['model']}, against fp32 logits: {positions} positions for the whole-prompt rows, {decoded_positions} "
        f"for the decode steps. Command: `{command}`.",
        "",
        "| configuration | rel. logit error | cosine mean (min) | top-1 agreement | KL(fp32 ‖ config), nats |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['rel_error']:.4f} | {r['cosine_mean']:.6f} ({r['cosine_min']:.5f}) | "
            f"{r['top1_agreement']:.3f} | {r['kl_mean']:.2e} |"
        )
    lines += ["", f"gemma3n's CPU row kernels in this run: {meta['row_kernels']}."]
    if "final_training_loss_nats_per_byte" in meta:
        loss = meta["final_training_loss_nats_per_byte"]
        lines.append(f"Training loss over the last 20 steps: {loss:.3f} nats/byte (uniform: 5.56).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
