"""The ``scbert`` shell command: demo, finetune, annotate, pretrain, benchmark.

At import time this module and the parsers it builds use the standard library only: scbert_tl's
heavy parts (torch, anndata, scanpy) are imported inside each command's handler, so that
``scbert --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Where fine-tuning and pretraining start, in Python and in the shell alike: a new CPU-sized model,
#: which runs offline on a laptop CPU (the published weights and a GPU are a choice: "scbert-panglao").
DEFAULT_MODEL = "compact"

MODEL_HELP = (
    "where training starts: 'compact' (a new CPU-sized model trained from scratch; runs offline on a laptop "
    "CPU), 'scbert-panglao' (the published pretrained weights: a download, the full configuration, a GPU "
    "advisable) or a saved model's folder"
)

#: Suffixes of files, refused for an output that is a folder (``--out model.h5ad`` for a model folder).
FILE_SUFFIXES = (
    ".h5ad", ".h5", ".hdf5", ".loom", ".zarr", ".csv", ".tsv", ".txt", ".json", ".md", ".png", ".pdf", ".svg", ".pt",
    ".pth", ".ckpt", ".pkl", ".npy", ".npz", ".gz", ".zip",
)  # fmt: skip


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default unless its help already says it or it has none (``None``, ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser (and sub-command parsers) that show defaults with :class:`_HelpFormatter`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new one's ``dest`` and says to use the new one."""

    def __init__(self, *args: object, new: str, **kwargs: object) -> None:
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input (see scbert.pp.bin)")
    group.add_argument(
        "--layer", help="read this layer instead of X (default: the input of the file's last scbert.pp.bin, else X)"
    )
    group.add_argument("--use-raw", action="store_true", default=None, help="read adata.raw.X instead of X")
    group.add_argument("--gene-key", help="var column with gene symbols or Ensembl IDs (default: var_names)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available, else CPU)")
    _verbosity(parser)


def _verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars")


def _parser() -> argparse.ArgumentParser:
    from ._benchmark import add_benchmark_parser
    from ._version import __version__

    parser = _Parser(
        prog="scbert",
        description="scBERT cell type annotation on AnnData (.h5ad) files.",
        epilog="Run 'scbert COMMAND --help' for a command's options. Start with 'scbert demo'.",
    )
    parser.add_argument("--version", action="version", version=f"scbert-tl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="fine-tune a compact model on scanpy's pbmc68k_reduced and annotate held-out cells",
        description="Fine-tune a compact scBERT on 80% of scanpy's bundled pbmc68k_reduced, annotate the other "
        "20%, compare with L1 logistic regression, and write an h5ad, a figure, the model and results.json.",
    )
    demo.add_argument("--out", type=Path, default=Path("scbert_demo"), metavar="DIR", help="output folder")
    demo.add_argument("--epochs", type=int, default=15, help="maximum fine-tuning epochs")
    demo.add_argument("--seed", type=int, default=0, help="seed of the 80/20 split and of the training")
    _common(demo)

    ft = sub.add_parser(
        "finetune",
        help="train a cell type classifier on a labelled .h5ad",
        description="Train a cell type classifier on labelled cells and save the model folder. By default it "
        "starts from a new compact model, which runs offline on a laptop CPU; --model scbert-panglao starts "
        "from the published weights (a download; a GPU advisable).",
    )
    ft.add_argument("input", type=Path, metavar="IN.h5ad", help="labelled cells")
    ft.add_argument("--label-key", required=True, help="obs column with the cell types")
    ft.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="model folder to write")
    ft.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    ft.add_argument(
        "--validation",
        type=float,
        default=0.1,
        help="share of cells held out (stratified) to select the epoch and calibrate; not a test score",
    )
    ft.add_argument("--epochs", type=int, help="maximum epochs (default: 8 for a new model, 20 from trained weights)")
    ft.add_argument("--batch-size", type=int, default=32, help="cells per training step")
    ft.add_argument(
        "--lr", type=float, help="peak learning rate (default: 0.001 for a new model, 0.0001 from trained weights)"
    )
    ft.add_argument(
        "--trainable",
        choices=["all", "original", "head"],
        help="weights trained: all, original (the published scheme: head, final norm, second-to-last block) or "
        "head (default: all for a new model, original from trained weights)",
    )
    ft.add_argument("--seed", type=int, default=0, help="seed of the validation split, the shuffling and new weights")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    _input_options(ft)
    _common(ft)

    an = sub.add_parser(
        "annotate",
        help="predict cell types of a .h5ad with a fine-tuned model",
        description="Predict cell types (and optionally a cell embedding) and write the annotated .h5ad.",
    )
    an.add_argument("input", type=Path, metavar="IN.h5ad", help="cells to annotate")
    an.add_argument("--model", required=True, help="a fine-tuned model's folder (written by scbert finetune)")
    an.add_argument("--out", required=True, type=Path, metavar="OUT.h5ad", help="annotated .h5ad to write")
    an.add_argument(
        "--unknown-threshold",
        type=_threshold,
        default="auto",
        help="'auto' (the model's energy-score threshold chosen on its validation cells) or a probability "
        "below which cells are 'unknown'",
    )
    an.add_argument(
        "--false-unknown-rate",
        type=float,
        help="with 'auto': the share of known cells accepted as 'unknown' on the validation cells (default: 0.05)",
    )
    an.add_argument(
        "--key-added",
        default="scbert",
        help="obs column of the predicted types (also KEY_confidence, KEY_novelty, obsm KEY_probabilities, uns KEY)",
    )
    an.add_argument("--embed", action="store_true", help="also write a cell embedding to obsm['X_scbert']")
    an.add_argument("--batch-size", type=int, help="cells per forward pass (default: sized to the device and model)")
    an.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5ad")
    _input_options(an)
    _common(an)

    bench = add_benchmark_parser(sub)
    _input_options(bench)
    _common(bench)
    _verbosity(_pretrain_parser(sub))
    return parser


def _pretrain_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``scbert pretrain``: the options of :func:`scbert_tl.tl.pretrain` (handler: ``run_pretrain_command``)."""
    p = sub.add_parser(
        "pretrain",
        help="pretrain scBERT by masked expression modelling on .h5ad files",
        description=(
            "Pretrain scBERT by masked expression modelling on one or more .h5ad files (streamed in chunks; "
            "files without bins for the model are binned on the fly). Under torchrun every process trains on "
            "its own shard: torchrun --nproc_per_node 4 -m scbert_tl pretrain data/*.h5ad --out model"
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="H5AD", help=".h5ad files (one corpus)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--out", metavar="MODEL_DIR", help="model folder to write")
    out.add_argument("--output", dest="out", action=_DeprecatedAlias, new="--out", help=argparse.SUPPRESS)
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at --out")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=1, help="passes over the training cells")
    g.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, help="cells per micro-batch per process (default: sized to the device)")
    g.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 0.001 for a new model, 0.0001 continued)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup", type=float, default=0.05, help="warm-up steps, or a fraction (< 1) of the run")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warm-up")
    g.add_argument("--redraw-every", type=int, default=1000, help="steps between FAVOR+ projection redraws (0: fixed)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument(
        "--validation-size",
        type=float,
        help="held-out cells: a fraction < 1 or a count; 0 for none (default: 5%%, at most 2,000)",
    )
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: once per epoch)")
    g.add_argument("--checkpoint-dir", help="folder of the run's checkpoint (default: no checkpoints)")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    g.add_argument("--stop-after", type=int, help="stop after this many steps (resume later; default: run to the end)")
    g = p.add_argument_group("data and compute")
    g.add_argument("--chunk-size", type=int, default=2048, help="cells read at a time")
    g.add_argument("--shuffle-buffer", type=int, default=4, help="chunks shuffled together")
    g.add_argument("--n-genes", type=int, default=2000, help="genes of a new compact model")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: CUDA when available, else CPU)")
    g.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="autocast precision (default: bfloat16 on CUDA, float32 on CPU)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of a new model, the held-out cells, the data order, the masks"
    )
    return p


def _setup(args: argparse.Namespace) -> None:
    from . import settings

    settings.verbosity = 3 if args.verbose else 0 if args.quiet else 2  # messages go to stderr (see _logging)
    if getattr(args, "device", None):
        settings.device = args.device


def _check_input(path: Path) -> None:
    """Refuse an input that is not an .h5ad file, naming it (before any work)."""
    from ._paths import is_hdf5

    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected an .h5ad file (e.g. written by adata.write_h5ad).")
    if not is_hdf5(path):
        raise ValueError(
            f"{path} is not an .h5ad file (not HDF5). Convert it first, e.g. with scanpy: "
            "sc.read_10x_mtx(...), sc.read_csv(...) or anndata.read_zarr(...), then .write_h5ad('data.h5ad')."
        )


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


#: What each command writes at --out: a file with this suffix, or a folder.
OUTPUTS = {
    "annotate": ".h5ad",
    "benchmark": "report folder",
    "demo": "folder",
    "finetune": "model folder",
    "pretrain": "model folder",
}


def check_out_name(command: str, out: str | Path) -> None:
    """Refuse an ``--out`` whose name does not match what ``command`` writes there (before any work)."""
    path, kind = Path(out), OUTPUTS[command]
    if kind.startswith("."):
        if path.suffix.lower() != kind and not path.is_dir():  # a folder gets its own message (check_output_file)
            raise ValueError(
                f"--out {path}: scbert {command} writes an {kind} file; name it so, e.g. {path.with_suffix(kind)}."
            )
    elif path.suffix.lower() in FILE_SUFFIXES:
        raise ValueError(
            f"--out {path}: scbert {command} writes a {kind}, not a {path.suffix} file; give a folder name, "
            f"e.g. {path.with_suffix('')}."
        )


def check_output_file(path: Path, *, overwrite: bool) -> None:
    """Raise before any work when ``path`` cannot receive an output file."""
    from ._paths import check_writable

    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; --out takes the name of the .h5ad file to write.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it.")
    check_writable(path)


def _finetune(args: argparse.Namespace) -> int:
    from . import tl
    from ._paths import check_model_target

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
    from . import ScBERT, tl

    check_output_file(args.out, overwrite=args.overwrite)
    _check_input(args.input)
    model = ScBERT.load(args.model)
    adata = _read(args.input)
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


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo
    from ._paths import check_writable

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
    handlers = {"demo": _demo, "finetune": _finetune, "annotate": _annotate, "benchmark": _benchmark}
    try:
        check_out_name(args.command, args.out)
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
