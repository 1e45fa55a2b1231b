"""``scbert finetune``: train a cell type classifier on a labelled ``.h5ad`` and save the model folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ._common import (
    DEFAULT_MODEL,
    MODEL_HELP,
    add_command,
    check_input,
    data_options,
    read_h5ad,
    training_options,
)

if TYPE_CHECKING:
    import argparse

#: The command's line in `scbert --help`, and the opening of its own help.
SUMMARY = "train a cell type classifier on a labelled .h5ad"
DESCRIPTION = (
    "Train a cell type classifier on labelled cells and save the model folder. By default it starts from a new "
    "compact model, which runs offline on a laptop CPU; --model scbert-panglao starts from the published weights "
    "(a download; a GPU advisable)."
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the command and its options."""
    p = add_command(sub, "finetune", SUMMARY, DESCRIPTION, cells="labelled cells")
    p.add_argument("--label-key", required=True, help="obs column with the cell types")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument(
        "--validation",
        type=float,
        default=0.1,
        help="share of cells held out (stratified) to select the epoch and calibrate; not a test score",
    )
    training_options(p)
    p.add_argument(
        "--trainable",
        choices=["all", "original", "head"],
        help="weights trained: all, original (the published scheme: head, final norm, second-to-last block) or "
        "head (default: all for a new model, original from trained weights)",
    )
    p.add_argument(
        "--downsample",
        type=float,
        metavar="COUNTS",
        help="depth augmentation: training cells thinned to between COUNTS and their own depth, so that shallower "
        "queries are read as the same types; 0 turns it off (default: 500 for a new model, 0 from trained weights)",
    )
    p.add_argument(
        "--gene-bias",
        type=float,
        metavar="SD",
        default=0.0,
        help="with depth augmentation, the thinned cells of each step also get one capture factor per gene, "
        "exp(N(0, SD^2)), as another protocol would measure them; 0.5 for a reference and query of different "
        "protocols (default: 0, off)",
    )
    p.add_argument(
        "--mask-genes",
        type=float,
        metavar="SHARE",
        help="gene masking: each training cell hides up to SHARE of its genes behind [MASK], so that genes a query "
        "lacks are read as unknown; 0 turns it off (default: 1 for a new model, 0 from trained weights, and 0 "
        "with --genes-measured-in, whose query measures every model gene)",
    )
    p.add_argument(
        "--genes-measured-in",
        type=Path,
        metavar="QUERY.h5ad",
        help="the query the model is for: a new compact model takes its genes among those it measures (its var "
        "names, or the --gene-key column when it has one; its expression is not read)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split, the shuffling and new weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    data_options(p)
    return p


#: the options passed to tl.finetune under their own names
PASSED = (
    "model",
    "validation",
    "epochs",
    "batch_size",
    "lr",
    "class_weight",
    "select_on",
    "trainable",
    "downsample",
    "gene_bias",
    "mask_genes",
    "gene_key",
    "layer",
    "use_raw",
)


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from .. import tl
    from .._paths import check_model_target

    check_model_target(args.out.expanduser(), overwrite=args.overwrite)  # before the work, not after it
    measured = None if args.genes_measured_in is None else _query_genes(args.genes_measured_in, args.gene_key)
    adata = read_h5ad(args.input)
    model = tl.finetune(
        adata,
        args.label_key,
        rng=args.seed,
        genes_measured_in=measured,
        **{name: getattr(args, name) for name in PASSED},
    )
    model.save(args.out, overwrite=args.overwrite)
    v = model.provenance["validation"]
    print(
        f"Saved {model!r} to {args.out} (selected epoch {model.provenance['selected_epoch']}: validation "
        f"accuracy {v.get('accuracy', float('nan')):.3f}, macro F1 {v.get('macro_f1', float('nan')):.3f})"
    )
    return 0


def _query_genes(path: Path, gene_key: str | None) -> list[str]:
    """The gene identifiers of the query file: its ``gene_key`` column when it has one, else its var names."""
    import anndata as ad

    check_input(path)
    query = ad.read_h5ad(path, backed="r")  # only var is needed
    try:
        ids = query.var[gene_key] if gene_key is not None and gene_key in query.var.columns else query.var_names
        return [str(g) for g in ids]
    finally:
        query.file.close()
