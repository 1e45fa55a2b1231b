"""``scbert annotate``: predict the cell types of an ``.h5ad`` with a fine-tuned model and write the annotated file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._common import threshold
from ._streamed import run_streamed, streamed_options, streamed_parser

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the command and its options."""
    p = streamed_parser(
        sub,
        "annotate",
        "predict cell types of a .h5ad with a fine-tuned model",
        "Predict cell types (and optionally a cell embedding) and write the annotated .h5ad, streamed "
        "a chunk of cells at a time and resumable (see --chunk-size).",
        cells="cells to annotate",
        model="a fine-tuned model's folder (written by scbert finetune)",
        out="annotated .h5ad to write",
        key_added=(
            "scbert",
            "obs column of the predicted types (also KEY_confidence, KEY_novelty, obsm KEY_probabilities, uns KEY)",
        ),
    )
    p.add_argument(
        "--unknown-threshold",
        type=threshold,
        default="auto",
        help="'auto' (the model's energy-score threshold chosen on its validation cells) or a probability "
        "below which cells are 'unknown'",
    )
    p.add_argument(
        "--false-unknown-rate",
        type=float,
        help="with 'auto': the share of known cells accepted as 'unknown' on the validation cells (default: 0.05)",
    )
    p.add_argument("--embed", action="store_true", help="also write a cell embedding to obsm['X_scbert']")
    return streamed_options(p)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    counts = run_streamed(
        args,
        "annotate_file",
        unknown_threshold=args.unknown_threshold,
        false_unknown_rate=args.false_unknown_rate,
        embed_key="X_scbert" if args.embed else None,
    )
    if counts is not None:  # the process that wrote the output (process 0 under torchrun)
        print(f"Annotated {int(counts.sum())} cells -> {args.out}")
        print(counts[counts > 0].to_string())  # the classes that got cells
    return 0
