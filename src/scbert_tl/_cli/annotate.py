"""``scbert annotate``: predict the cell types of an ``.h5ad`` with a fine-tuned model and write the annotated file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._common import check_input, check_output_file, compute_options, input_options, read_h5ad, threshold

if TYPE_CHECKING:
    import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the command and its options."""
    p = sub.add_parser(
        "annotate",
        help="predict cell types of a .h5ad with a fine-tuned model",
        description="Predict cell types (and optionally a cell embedding) and write the annotated .h5ad.",
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
    p.add_argument("--batch-size", type=int, help="cells per forward pass (default: sized to the device and model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5ad")
    input_options(p)
    compute_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from .. import tl
    from .._scbert import ScBERT

    check_output_file(args.out, overwrite=args.overwrite)
    check_input(args.input)
    model = ScBERT.load(args.model)
    adata = read_h5ad(args.input)
    kwargs = {"gene_key": args.gene_key, "layer": args.layer, "use_raw": args.use_raw, "batch_size": args.batch_size}
    tl.annotate(
        adata,
        model,
        unknown_threshold=args.unknown_threshold,
        false_unknown_rate=args.false_unknown_rate,
        key_added=args.key_added,
        **kwargs,
    )
    if args.embed:
        tl.embed(adata, model, **kwargs)
    args.out.parent.mkdir(parents=True, exist_ok=True)  # checked writable before the work
    adata.write_h5ad(args.out)
    counts = adata.obs[args.key_added].value_counts()
    print(f"Annotated {adata.n_obs} cells -> {args.out}")
    print(counts[counts > 0].to_string())  # the classes that got cells
    return 0
