"""Quantization quality on a small random model: int8 and int4 weight-only against fp32, and why int8 stays
weight-only (the logit error of fbgemm's dynamic int8 GEMM).

    python benchmarks/bench_quant_quality_small.py

fbgemm's ``linear_dynamic`` streams an int8 weight about 1.5x faster than torch's weight-only int8 kernel on this CPU
(``kernel_ceilings.py``), but it also quantizes the activations: 7-bit unsigned with one scale and zero point per call
(7 bits so that AVX2's pairwise int16 sums cannot saturate). This script builds a small random Gemma 3n with
transformers (``save_pretrained``), loads it with gemma3n at ``quantize="int8"``, and compares against the fp32 model:
the weight-only kernel as shipped, and the same int8 weights through fbgemm with one activation scale per row and per
block of 16 rows; int4 weight-only with groups of 32 (the tiny widths are multiples of 32, not all of 64). bf16 (no
quantization) is given for scale. 4 rows x 80 tokens (longer than the sliding window), row 1 left-padded by 6: 314
positions. Writes ``benchmarks/results/quant_quality_small.{json,md}``.

Rows marked "decode steps" measure the path generation runs token by token (on CPUs with the instructions, the 1-4
row kernels of ``gemma3n.row_kernels``): a prefill of the first 16 tokens, then one teacher-forced decode step per
position, compared with fp32's forward at the last 65 positions of each row (260 positions).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


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


def compare(got: torch.Tensor, reference: torch.Tensor) -> dict:
    got, reference = got.double(), reference.double()
    cosine = F.cosine_similarity(got, reference, dim=-1)
    return {
        "rel_error": ((got - reference).norm() / reference.norm()).item(),
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "top1_agreement": (got.argmax(-1) == reference.argmax(-1)).double().mean().item(),
    }


def main() -> None:
    from bench_quant_quality import teacher_forced_decode
    from conftest import save_reference_lm, text_config

    import gemma3n
    from gemma3n import quantize
    from gemma3n.row_kernels import row_kernel_status

    torch.manual_seed(0)
    directory = tempfile.mkdtemp(prefix="int8-quality-")
    save_reference_lm(directory, text_config(vocab_size_per_layer_input=300))
    ids = torch.randint(3, 300, (4, 80), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    real = mask.bool()

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            return model(ids, attention_mask=mask).logits[real].float()

    reference = logits(gemma3n.load(directory, dtype=torch.float32))
    decoded_positions = 65  # the last 65 positions of every row: all real tokens (row 1's padding is its first 6)

    def decoded(model) -> torch.Tensor:
        with torch.inference_mode():
            return teacher_forced_decode(model, ids, mask, decoded_positions).reshape(-1, reference.shape[-1])

    with torch.inference_mode():
        full = gemma3n.load(directory, dtype=torch.float32)(ids, attention_mask=mask).logits.float()
    decode_reference = full[:, -decoded_positions:].reshape(-1, reference.shape[-1])
    rows: dict = {"bf16 (no quantization)": compare(logits(gemma3n.load(directory, dtype=torch.bfloat16)), reference)}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        rows[f"int8 weight-only, {name} activations"] = compare(
            logits(gemma3n.load(directory, dtype=dtype, quantize="int8")), reference
        )
        for block in (1, 16):
            model = gemma3n.load(directory, dtype=dtype, quantize="int8")
            layers = use_fbgemm(model, block)
            rows[f"int8 fbgemm dynamic, 1 scale per {block} row(s), {name}"] = {
                **compare(logits(model), reference),
                "layers": layers,
            }
        quantize.DEFAULT_INT4_GROUP_SIZE = 32
        rows[f"int4 g32 weight-only, {name} activations"] = compare(
            logits(gemma3n.load(directory, dtype=dtype, quantize="int4")), reference
        )
    rows["bf16 (no quantization), decode steps"] = compare(
        decoded(gemma3n.load(directory, dtype=torch.bfloat16)), decode_reference
    )
    for mode, label in (("int8", "int8 weight-only"), ("int4", "int4 g32 weight-only")):
        model = gemma3n.load(directory, dtype=torch.bfloat16, quantize=mode)
        rows[f"{label}, bfloat16 activations, decode steps"] = compare(decoded(model), decode_reference)
    rows["row kernels"] = {"status": row_kernel_status()}
    out = HERE / "results" / "quant_quality_small.json"
    meta = {"torch": torch.__version__, "positions": int(real.sum()), "decoded_positions": len(decode_reference)}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        f"Small random Gemma 3n (tests' text_config, written by transformers), {int(real.sum())} positions, against "
        "fp32 logits. Command: `python benchmarks/bench_quant_quality_small.py`.",
        "",
        "| configuration | rel. logit error | cosine mean (min) | top-1 agreement |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "status" in r:
            lines += ["", f"gemma3n's CPU row kernels in this run: {r['status']}."]
            continue
        lines.append(
            f"| {name} | {r['rel_error']:.4f} | {r['cosine_mean']:.5f} ({r['cosine_min']:.4f}) | "
            f"{r['top1_agreement']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
