"""The ``scbert`` shell command: demo, finetune, annotate, pretrain, benchmark."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input (see scbert.pp.bin)")
    group.add_argument("--layer", help="read this layer instead of X")
    group.add_argument("--use-raw", action="store_true", default=None, help="read adata.raw.X")
    group.add_argument("--gene-key", help="var column with gene symbols or Ensembl IDs (default: var_names)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    _verbosity(parser)


def _verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="scbert",
        description="scBERT cell type annotation on AnnData (.h5ad) files.",
    )
    parser.add_argument("--version", action="version", version=f"scbert-tl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="fine-tune a compact model on scanpy's pbmc68k_reduced and annotate held-out cells",
        description="Fine-tune a compact scBERT on 80%% of scanpy's bundled pbmc68k_reduced, annotate the other "
        "20%%, compare with L1 logistic regression, and write an h5ad and a figure.",
    )
    demo.add_argument("--out", type=Path, default=Path("scbert_demo"), help="output folder (default: scbert_demo)")
    demo.add_argument("--epochs", type=int, default=15, help="maximum fine-tuning epochs (default: 15)")
    demo.add_argument("--seed", type=int, default=0)
    _common(demo)

    ft = sub.add_parser(
        "finetune",
        help="train a cell type classifier on a labelled .h5ad",
        description="Train a cell type classifier on labelled cells and save the model directory.",
    )
    ft.add_argument("input", type=Path, metavar="IN.h5ad")
    ft.add_argument("--label-key", required=True, help="obs column with the cell types")
    ft.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="where to save the model")
    ft.add_argument(
        "--model",
        default="compact",
        help="'compact' (new CPU-sized model, default), 'scbert-panglao' (published weights) or a saved model",
    )
    ft.add_argument("--validation", type=float, default=0.1, help="held-out fraction for model selection")
    ft.add_argument(
        "--epochs", type=int, help="maximum epochs (default: finetune's, 8 for a new model, 20 from weights)"
    )
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--lr", type=float)
    ft.add_argument("--trainable", choices=["all", "original", "head"])
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    _input_options(ft)
    _common(ft)

    an = sub.add_parser(
        "annotate",
        help="predict cell types of a .h5ad with a fine-tuned model",
        description="Predict cell types (and optionally a cell embedding) and write the annotated .h5ad.",
    )
    an.add_argument("input", type=Path, metavar="IN.h5ad")
    an.add_argument("--model", required=True, help="a saved model directory")
    an.add_argument("--out", required=True, type=Path, metavar="OUT.h5ad")
    an.add_argument(
        "--unknown-threshold",
        type=_threshold,
        default="auto",
        help="'auto' (default: the model's energy-score threshold chosen on its validation cells) or a probability "
        "below which cells are 'unknown'",
    )
    an.add_argument(
        "--false-unknown-rate",
        type=float,
        help="with 'auto': the share of known cells accepted as 'unknown' on the validation cells (default: 0.05)",
    )
    an.add_argument("--key-added", default="scbert")
    an.add_argument("--embed", action="store_true", help="also write obsm['X_scbert']")
    an.add_argument("--batch-size", type=int)
    an.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5ad")
    _chunk_option(an)
    _input_options(an)
    _common(an)
    _embed_parser(sub)

    from ._benchmark import add_benchmark_parser
    from .tl._pretrain import add_pretrain_parser

    bench = add_benchmark_parser(sub)
    _input_options(bench)
    _common(bench)
    _verbosity(add_pretrain_parser(sub))
    return parser


def _setup(args: argparse.Namespace) -> None:
    from . import settings

    settings.verbosity = 3 if args.verbose else 0 if args.quiet else 2  # messages go to stderr (see _logging)
    if getattr(args, "device", None):
        settings.device = args.device


def _check_input(path: Path) -> None:
    """Refuse an input that is not an .h5ad file, naming it (before any work)."""
    from ._scbert import is_hdf5

    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected an .h5ad file (e.g. written by adata.write_h5ad).")
    if not is_hdf5(path):
        raise ValueError(
            f"{path} is not an .h5ad file (not HDF5). Convert it first, e.g. with scanpy: "
            "sc.read_10x_mtx(...), sc.read_csv(...) or anndata.read_zarr(...), then .write_h5ad('data.h5ad')."
        )


def _chunk_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-size",
        type=int,
        help="cells read, computed and saved at a time (default: 8192); memory holds one chunk. Completed chunks "
        "are kept in OUT.h5ad.partial/ until the output is written, so an interrupted run continues where it "
        "stopped when run again. Under torchrun --nproc-per-node N each process takes a contiguous share.",
    )


def _embed_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``scbert embed``: a cell embedding into a copy of the .h5ad, streamed as ``scbert annotate``."""
    em = sub.add_parser(
        "embed",
        help="embed the cells of a .h5ad with a model (for neighbours, UMAP, clustering)",
        description="Write a cell embedding (obsm[KEY]) into a copy of the .h5ad, streamed and resumable as "
        "scbert annotate.",
    )
    em.add_argument("input", type=Path, metavar="IN.h5ad", help="cells to embed")
    em.add_argument("--model", required=True, help="a trained model's folder (scbert finetune or pretrain)")
    em.add_argument("--out", required=True, type=Path, metavar="OUT.h5ad", help="embedded .h5ad to write")
    em.add_argument(
        "--representation",
        choices=["genes", "classifier"],
        default="genes",
        help="'genes': mean of the final gene vectors (default); 'classifier': the classifier's last hidden layer",
    )
    em.add_argument("--key-added", default="X_scbert", help="obsm key of the embedding (default: X_scbert)")
    em.add_argument("--batch-size", type=int, help="cells per forward pass (default: sized to the device and model)")
    em.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5ad")
    _chunk_option(em)
    _input_options(em)
    _common(em)
    return em


def _threshold(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number, got {text!r}") from None


def _read(path: Path):
    import anndata as ad

    _check_input(path)
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} could not be read as an .h5ad file ({type(e).__name__}: {e}).") from e


def check_output_file(path: Path, *, overwrite: bool) -> None:
    """Raise before any work when ``path`` cannot receive an output file."""
    from ._scbert import check_writable

    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; --out takes the name of the .h5ad file to write.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it.")
    check_writable(path)


def _finetune(args: argparse.Namespace) -> int:
    from . import tl
    from ._scbert import check_model_target

    check_model_target(args.out.expanduser(), overwrite=args.overwrite)  # before the work, not after it
    adata = _read(args.input)
    model = tl.finetune(
        adata,
        args.label_key,
        model=args.model,
        validation=args.validation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        trainable=args.trainable,
        rng=args.seed,
        gene_key=args.gene_key,
        layer=args.layer,
        use_raw=args.use_raw,
    )
    model.save(args.out, overwrite=args.overwrite)
    v = model.provenance["validation"]
    print(
        f"Saved {model!r} to {args.out} (selected epoch {model.provenance['selected_epoch']}: validation "
        f"accuracy {v.get('accuracy', float('nan')):.3f}, macro F1 {v.get('macro_f1', float('nan')):.3f})"
    )
    return 0


def _annotate(args: argparse.Namespace) -> int:
    from . import ScBERT
    from .tl._files import annotate_file

    check_output_file(args.out, overwrite=args.overwrite)
    _check_input(args.input)
    model = ScBERT.load(args.model)
    counts = annotate_file(
        args.input,
        args.out,
        model,
        unknown_threshold=args.unknown_threshold,
        false_unknown_rate=args.false_unknown_rate,
        key_added=args.key_added,
        embed_key="X_scbert" if args.embed else None,
        **_stream_kwargs(args),
    )
    if counts is not None:  # the process that wrote the output (process 0 under torchrun)
        print(f"Annotated {int(counts.sum())} cells -> {args.out}")
        print(counts[counts > 0].to_string())  # the classes that got cells
    return 0


def _embed(args: argparse.Namespace) -> int:
    from . import ScBERT
    from .tl._files import embed_file

    check_output_file(args.out, overwrite=args.overwrite)
    _check_input(args.input)
    model = ScBERT.load(args.model)
    n = embed_file(
        args.input,
        args.out,
        model,
        representation=args.representation,
        key_added=args.key_added,
        **_stream_kwargs(args),
    )
    if n is not None:
        print(f"Embedded {n} cells -> {args.out} (obsm[{args.key_added!r}])")
    return 0


def _stream_kwargs(args: argparse.Namespace) -> dict:
    keys = ("gene_key", "layer", "use_raw", "batch_size", "chunk_size", "device")
    return {k: getattr(args, k) for k in keys}


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo
    from ._scbert import check_writable

    check_writable(args.out)  # before the work, not after it
    run_demo(args.out, epochs=args.epochs, seed=args.seed)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from ._benchmark import run_benchmark_command

    return run_benchmark_command(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scbert`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup(args)
    handlers = {"demo": _demo, "finetune": _finetune, "annotate": _annotate, "benchmark": _benchmark, "embed": _embed}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        from .tl._pretrain import run_pretrain_command

        return run_pretrain_command(args)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"scbert {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scbert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
