"""``gemma3n slice``: write a MatFormer slice of a checkpoint, or list the published slicing presets.

gemma3n slice --list
gemma3n slice --model gemma-3n-E4B-it --preset E2B --output gemma-3n-E2B-sliced
gemma3n slice --model gemma-3n-E4B-it --ffn-dims 8192 --skip-layers 20,21,22,23,24 --output my-slice
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

_EPILOG = (
    "--ffn-dims takes one width for every kept layer or one per kept layer (after --skip-layers); "
    "--skip-layers counts layers of the original model from 0."
)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_slice_command(
    commands: Any, formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter
) -> argparse.ArgumentParser:
    """Add the ``slice`` subcommand to the ``gemma3n`` parser's subparsers (help formatted by ``formatter_class``)."""
    parser = commands.add_parser(
        "slice",
        help="write a MatFormer slice (e.g. E2B) of an E4B checkpoint, or --list the presets",
        epilog=_EPILOG,
        formatter_class=formatter_class,
    )
    parser.add_argument("--list", action="store_true", help="list the published presets and exit")
    parser.add_argument("--model", help="source checkpoint directory (e.g. a Gemma 3n E4B download)")
    parser.add_argument("--preset", help="a published configuration by name (see --list)")
    parser.add_argument("--ffn-dims", type=_int_list, metavar="W[,W...]", help="FFN widths of the kept layers")
    parser.add_argument("--skip-layers", type=_int_list, metavar="I[,I...]", help="layers of the source to drop")
    parser.add_argument("--output", help="new checkpoint directory to write")
    parser.set_defaults(func=run_slice)
    return parser


def preset_table() -> list[dict[str, Any]]:
    """One row per preset at the published E4B shape: layers kept, skipped, parameter counts."""
    return [dict(row) for row in _preset_rows()]


@functools.cache
def _preset_rows() -> tuple[dict[str, Any], ...]:
    from .config import Gemma3nConfig
    from .matformer import PRESETS, effective_parameters, plan_slice, sliced_config
    from .presets import preset_config_dict

    e4b = Gemma3nConfig.from_dict(preset_config_dict("e4b"))
    rows = []
    for preset in PRESETS.values():
        plan = plan_slice(e4b.text, preset.spec)
        rows.append(
            {
                "name": preset.name,
                "layers": len(plan.kept),
                "skipped": list(preset.spec.skip_layers),
                "wide_layers": sum(1 for w in plan.widths if w == max(plan.widths)) if len(set(plan.widths)) > 1 else 0,
                "effective_params": effective_parameters(sliced_config(e4b, plan).text),
                "published_effective_params_b": preset.published_effective_params_b,
                "published_mmlu_pt": preset.published_mmlu_pt,
            }
        )
    return tuple(rows)


def _print_list() -> None:
    print(f"{'preset':14s} {'layers':>6s}  {'skipped':14s} {'FFN widths':24s} {'params (B)':>10s} {'published':>9s}")
    from .matformer import PRESETS

    for row in preset_table():
        spec = PRESETS[row["name"]].spec
        widths = sorted(set(spec.ffn_dims)) if isinstance(spec.ffn_dims, tuple) else [spec.ffn_dims]
        if len(widths) == 1:
            described = f"all {widths[0]}"
        else:
            described = f"{row['wide_layers']} x {widths[-1]}, rest {widths[0]}"
        skipped = ",".join(map(str, row["skipped"])) or "-"
        print(
            f"{row['name']:14s} {row['layers']:6d}  {skipped:14s} {described:24s} "
            f"{row['effective_params'] / 1e9:10.3f} {row['published_effective_params_b']:9.2f}"
        )
    print(
        "params: decoder parameters used per token at the E4B shape (no embedding tables); published: Google's "
        "effective-parameter figure (google/gemma3n-slicing-configs)"
    )


def run_slice(args: argparse.Namespace) -> int:
    """Runner of ``gemma3n slice``; returns the exit status (2 with a one-line error for bad input)."""

    def fail(message: str) -> int:
        print(f"gemma3n slice: error: {message}", file=sys.stderr)
        return 2

    if args.list:
        _print_list()
        return 0
    if not args.model or not args.output:
        return fail("--model and --output are required (or use --list)")
    if args.preset and (args.ffn_dims or args.skip_layers):
        return fail("give either --preset or --ffn-dims / --skip-layers, not both")
    if not args.preset and not args.ffn_dims and not args.skip_layers:
        return fail("nothing to slice: give --preset NAME or --ffn-dims / --skip-layers")

    from .matformer_export import write_sliced_checkpoint

    if args.preset:
        matformer: Any = args.preset
    else:
        dims = args.ffn_dims
        matformer = {"ffn_dims": dims[0] if dims and len(dims) == 1 else dims, "skip_layers": args.skip_layers or []}

    def progress(message: str) -> None:
        print(f"gemma3n slice: {message}", file=sys.stderr, flush=True)

    try:
        out = write_sliced_checkpoint(args.model, args.output, matformer, progress=progress)
    except (OSError, ValueError) as err:  # missing files, bad config, impossible slice (MatformerError)
        return fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    print(out)
    return 0
