"""What the commands share: option groups, the parser class that shows defaults, reading an ``.h5ad``, checking ``--out``.

Standard library only at import time: ``scbert --help`` loads no numerical library.
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default unless its help already says it or it has none (``None``, ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser (and sub-command parsers) that show defaults with :class:`HelpFormatter`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class DeprecatedAlias(argparse.Action):
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


def add_command(
    sub: argparse._SubParsersAction, name: str, summary: str, description: str, *, cells: str | None = None
) -> argparse.ArgumentParser:
    """Register command ``name``: ``summary`` is its line in ``scbert --help``, ``description`` opens its own help.

    With ``cells``, it also takes the ``.h5ad`` to read as its first argument (``IN.h5ad``, helped with ``cells``).
    """
    parser = sub.add_parser(name, help=summary, description=description)
    if cells is not None:
        parser.add_argument("input", type=Path, metavar="IN.h5ad", help=cells)
    return parser


def data_options(parser: argparse.ArgumentParser) -> None:
    """What a command that reads an ``.h5ad`` takes last: the input options, ``--device`` and the verbosity."""
    input_options(parser)
    compute_options(parser)


def input_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input (see scbert.pp.bin)")
    group.add_argument(
        "--layer", help="read this layer instead of X (default: the input of the file's last scbert.pp.bin, else X)"
    )
    group.add_argument("--use-raw", action="store_true", default=None, help="read adata.raw.X instead of X")
    group.add_argument("--gene-key", help="var column with gene symbols or Ensembl IDs (default: var_names)")


def stream_options(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--chunk-size`` and ``--overwrite`` of the commands that stream an ``.h5ad`` (annotate, embed)."""
    parser.add_argument(
        "--batch-size", type=int, help="cells per forward pass (default: sized to the device and model)"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        help="cells read, computed and saved at a time (default: 8192); memory holds one chunk. Completed chunks "
        "are kept in OUT.h5ad.partial/ until the output is written, so an interrupted run continues where it "
        "stopped when run again. Under torchrun --nproc-per-node N each process takes a contiguous share.",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5ad")


def stream_kwargs(args: argparse.Namespace) -> dict:
    """The input and compute options of a streamed command, as keyword arguments."""
    keys = ("gene_key", "layer", "use_raw", "batch_size", "chunk_size", "device")
    return {k: getattr(args, k) for k in keys}


def compute_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: CUDA when available, else CPU)")
    verbosity_options(parser)


def verbosity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars")


def setup(args: argparse.Namespace) -> None:
    from .._settings import settings

    settings.verbosity = 3 if args.verbose else 0 if args.quiet else 2  # messages go to stderr (see _logging)
    if getattr(args, "device", None):
        settings.device = args.device


def check_input(path: Path) -> None:
    """Refuse an input that is not an .h5ad file, naming it (before any work)."""
    from .._paths import is_hdf5

    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected an .h5ad file (e.g. written by adata.write_h5ad).")
    if not is_hdf5(path):
        raise ValueError(
            f"{path} is not an .h5ad file (not HDF5). Convert it first, e.g. with scanpy: "
            "sc.read_10x_mtx(...), sc.read_csv(...) or anndata.read_zarr(...), then .write_h5ad('data.h5ad')."
        )


def _class_weight(text: str) -> str | None:
    if text not in ("balanced", "sampled", "none"):
        raise argparse.ArgumentTypeError(f"expected balanced, sampled or none, got {text!r}")
    return None if text == "none" else text


def training_options(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that fine-tune, as in ``tl.finetune`` (``--class-weight none`` is None)."""
    parser.add_argument(
        "--epochs",
        type=int,
        help="maximum fine-tuning epochs (default: 20 for a new model, 20 from trained weights; a new model "
        "trained on more than 600 cells takes fewer, about 12,000 cells seen, at least 6)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="cells per training step")
    parser.add_argument(
        "--lr", type=float, help="peak learning rate (default: 0.001 for a new model, 0.0001 from trained weights)"
    )
    parser.add_argument(
        "--class-weight",
        type=_class_weight,
        default="sampled",
        metavar="{sampled,balanced,none}",
        help="rare types: sampled (the first half of the epochs take the cells as they come, the rest draw every "
        "class equally often), balanced (the loss weighted by "
        "inverse class frequency) or none (default: sampled)",
    )
    parser.add_argument(
        "--select-on",
        choices=("balanced_probability", "macro_f1", "loss", "accuracy"),
        default="balanced_probability",
        help="validation metric that selects the epoch (default: balanced_probability, the probability of the "
        "true type averaged over each type's cells, then over the types)",
    )


def threshold(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number, got {text!r}") from None


def read_h5ad(path: Path):  # noqa: ANN201 - an AnnData (anndata is imported only here)
    """Read an ``.h5ad`` file, with a plain error when it is none."""
    import anndata as ad

    check_input(path)
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} could not be read as an .h5ad file ({type(e).__name__}: {e}).") from e


#: What each command writes at --out: a file with this suffix, or a folder.
OUTPUTS = {
    "annotate": ".h5ad",
    "benchmark": "report folder",
    "embed": ".h5ad",
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
    from .._paths import check_writable

    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; --out takes the name of the .h5ad file to write.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it.")
    check_writable(path)
