"""``scbert annotate``: predict the cell types of an ``.h5ad`` with a fine-tuned model and write the annotated file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._common import (
    check_input,
    check_output_file,
    compute_options,
    input_options,
    stream_kwargs,
    stream_options,
    threshold,
)

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the command and its options."""
    p = sub.add_parser(
        "annotate",
        help="predict cell types of a .h5ad with a fine-tuned model",
        description="Predict cell types (and optionally a cell embedding) and write the annotated .h5ad, streamed "
        "a chunk of cells at a time and resumable (see --chunk-size).",
    )
    p.add_argument("input", type=Path, metavar="IN.h5ad", help="cells to annotate")
    p.add_argument("--model", required=True, help="a fine-tuned model's folder (written by scbert finetune)")
    p.add_argument("--out", required=True, type=Path, metavar="OUT.h5ad", help="annotated .h5ad to write")
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
    p.add_argument(
        "--key-added",
        default="scbert",
        help="obs column of the predicted types (also KEY_confidence, KEY_novelty, obsm KEY_probabilities, uns KEY)",
    )
    p.add_argument("--embed", action="store_true", help="also write a cell embedding to obsm['X_scbert']")
    stream_options(p)
    input_options(p)
    compute_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from .._scbert import ScBERT
    from ..tl._files import annotate_file

    check_output_file(args.out, overwrite=args.overwrite)
    check_input(args.input)
    model = ScBERT.load(args.model)
    counts = annotate_file(
        args.input,
        args.out,
        model,
        unknown_threshold=args.unknown_threshold,
        false_unknown_rate=args.false_unknown_rate,
        key_added=args.key_added,
        embed_key="X_scbert" if args.embed else None,
        **stream_kwargs(args),
    )
    if counts is not None:  # the process that wrote the output (process 0 under torchrun)
        print(f"Annotated {int(counts.sum())} cells -> {args.out}")
        print(counts[counts > 0].to_string())  # the classes that got cells
    return 0
